"""Tiny translators and batches shared by the translation tests."""

import numpy as np
from conftest import iwslt_dir

from keras_rnn_lora.translation import iwslt2017
from keras_rnn_lora.translation import tokens
from keras_rnn_lora.translation.model import build_translator
from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor

SRC_VOCAB, TGT_VOCAB = 40, 50


def tiny_translator(**kwargs):
    # No dropout: equivalence tests compare training-mode gradients.
    kwargs = {"embedding_dim": 8, "units": 16, "dropout": 0.0, **kwargs}
    return build_translator(SRC_VOCAB, TGT_VOCAB, **kwargs)


def random_batch(seed=0, batch=3, src_len=7, tgt_len=6):
    rng = np.random.default_rng(seed)
    src = rng.integers(4, SRC_VOCAB, (batch, src_len)).astype("int32")
    dec = rng.integers(4, TGT_VOCAB, (batch, tgt_len)).astype("int32")
    dec[:, 0] = tokens.START_ID
    out = np.concatenate([dec[:, 1:], np.full((batch, 1), 3, "int32")], 1)
    src[0, 4:] = 0
    dec[1, 3:], out[1, 3:] = 0, 0
    return src, dec, out


def pad(array, width):
    return np.pad(array, ((0, 0), (0, width - array.shape[1])))


def train_tokenizers(directory, max_pairs, vocab_size, max_length):
    """Trains a preprocessor on the first `max_pairs` real training pairs
    into `directory` (a str) and returns the directory."""
    pairs = iwslt2017.read_pairs("train", iwslt_dir(), max_pairs=max_pairs)
    TranslationPreprocessor.train(pairs, directory, vocab_size, max_length)
    return directory


def translator_for(preprocessor, embedding_dim=16, units=32):
    """A small translator sized to `preprocessor`'s vocabularies."""
    return build_translator(
        preprocessor.source_vocabulary_size,
        preprocessor.target_vocabulary_size,
        embedding_dim=embedding_dim,
        units=units,
    )
