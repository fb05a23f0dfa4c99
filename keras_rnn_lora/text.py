"""0.1.0's import path of the tokenizers and the `tf.data` pipeline, kept
so code written against it still runs; new code uses
`keras_rnn_lora.translation.preprocessing.TranslationPreprocessor`, which
owns text <-> ids. The functions below keep their 0.1.0 signatures."""

import os

from keras_rnn_lora.translation.preprocessing import DEFAULT_VOCAB_SIZE  # noqa: F401
from keras_rnn_lora.translation.preprocessing import LANGUAGES
from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor
from keras_rnn_lora.translation.preprocessing import load_tokenizer
from keras_rnn_lora.translation.preprocessing import padding_fraction  # noqa: F401
from keras_rnn_lora.translation.preprocessing import train_sentencepiece
from keras_rnn_lora.translation.tokens import END_ID  # noqa: F401
from keras_rnn_lora.translation.tokens import PAD_ID  # noqa: F401
from keras_rnn_lora.translation.tokens import SPECIAL_TOKENS  # noqa: F401
from keras_rnn_lora.translation.tokens import START_ID  # noqa: F401
from keras_rnn_lora.translation.tokens import UNK_ID  # noqa: F401


def get_tokenizers(
    pairs, directory, vocab_size=DEFAULT_VOCAB_SIZE, languages=LANGUAGES
):
    """keras-hub tokenizers for `pairs`, trained once into `directory`."""
    tokenizers = []
    for index, language in enumerate(languages):
        path = TranslationPreprocessor.model_path(
            directory, language, vocab_size
        )
        if not os.path.isfile(path):
            train_sentencepiece([p[index] for p in pairs], path, vocab_size)
        tokenizers.append(load_tokenizer(path))
    return tuple(tokenizers)


def make_translation_dataset(
    pairs, src_tokenizer, tgt_tokenizer, *, max_length=64, **kwargs
):
    """`TranslationPreprocessor.dataset` with keras-hub tokenizers."""
    preprocessor = TranslationPreprocessor(
        src_tokenizer.proto, tgt_tokenizer.proto, max_length
    )
    return preprocessor.dataset(pairs, **kwargs)
