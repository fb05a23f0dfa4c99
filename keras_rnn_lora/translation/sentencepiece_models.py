"""The translator's SentencePiece models: training one on text (unigram,
the special ids of `tokens.py`, every character covered) and loading one
as a keras-hub tokenizer."""

import io
import os

import sentencepiece

from keras_rnn_lora import files
from keras_rnn_lora.translation.tokens import END_ID
from keras_rnn_lora.translation.tokens import PAD_ID
from keras_rnn_lora.translation.tokens import SPECIAL_TOKENS
from keras_rnn_lora.translation.tokens import START_ID
from keras_rnn_lora.translation.tokens import UNK_ID

DEFAULT_VOCAB_SIZE = 8000
# SentencePiece's names for the special pieces (ids fixed in `tokens.py`).
_PIECES = dict(zip(("pad", "unk", "bos", "eos"), SPECIAL_TOKENS, strict=True))


def train_sentencepiece(lines, model_path, vocab_size=DEFAULT_VOCAB_SIZE):
    """Trains a unigram SentencePiece model on `lines` and writes it to
    `model_path` (atomically). Ids: `[PAD]`=0, `[UNK]`=1, `[START]`=2,
    `[END]`=3; every character of the data is covered."""
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError("Received no text to train a tokenizer on (`lines`).")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=1.0,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=START_ID,
        eos_id=END_ID,
        **{f"{kind}_piece": piece for kind, piece in _PIECES.items()},
        # Small corpora cannot always fill the vocabulary: shrink, don't fail.
        hard_vocab_limit=False,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    files.write_bytes(model_path, model.getvalue())
    return model_path


def load_tokenizer(model_path):
    """A keras-hub `SentencePieceTokenizer` for a model file."""
    import keras_hub

    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"No SentencePiece model at {model_path}")
    return keras_hub.tokenizers.SentencePieceTokenizer(proto=model_path)
