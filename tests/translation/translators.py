"""Tiny translators and batches shared by the translation tests."""

import numpy as np

from keras_rnn_lora.translation import tokens
from keras_rnn_lora.translation.model import build_translator

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
