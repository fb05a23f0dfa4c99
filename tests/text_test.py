"""Tests for the SentencePiece tokenizers and the translation pipeline."""

import numpy as np
import pytest
from conftest import iwslt_dir

from keras_rnn_lora import text
from keras_rnn_lora.data import iwslt2017

GERMAN = [
    "Die Staaten, über Größe und Maß: «Äpfel»!",
    "Straße, Fußgänger; Öl? Übermäßig schön – oder nicht...",
]


@pytest.fixture(scope="module")
def real_pairs():
    return iwslt2017.read_pairs("train", iwslt_dir(), max_pairs=4000)


@pytest.fixture(scope="module")
def tokenizer_dir(real_pairs, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tokenizers"))
    text.get_tokenizers(real_pairs, directory, vocab_size=2000)
    return directory


@pytest.fixture
def tokenizers(real_pairs, tokenizer_dir):
    # Loaded per test: `keras.backend.clear_session()` (run before each
    # test) drops the TF resources a loaded SentencePiece op holds.
    return text.get_tokenizers(real_pairs, tokenizer_dir, vocab_size=2000)


def test_special_ids_and_round_trip(tokenizers):
    _, german = tokenizers
    assert german.token_to_id("[PAD]") == text.PAD_ID
    assert german.token_to_id("[UNK]") == text.UNK_ID
    assert german.token_to_id("[START]") == text.START_ID
    assert german.token_to_id("[END]") == text.END_ID
    for sentence in GERMAN:
        ids = german(sentence)
        assert german.detokenize(ids) == sentence


def test_tokenizers_are_reused_not_retrained(real_pairs, tmp_path):
    text.get_tokenizers(real_pairs[:500], str(tmp_path), vocab_size=500)
    path = tmp_path / "spm_de_500.model"
    stamp = path.stat().st_mtime_ns
    text.get_tokenizers([], str(tmp_path), vocab_size=500)
    assert path.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="no text to train"):
        text.get_tokenizers([], str(tmp_path / "new"), vocab_size=500)


def test_pipeline_shapes_and_no_padding_rows(real_pairs, tokenizers):
    src, tgt = tokenizers
    dataset = text.make_translation_dataset(
        real_pairs[:600], src, tgt, batch_size=32, max_length=20
    )
    rows = 0
    for (encoder, decoder_in), decoder_out in dataset:
        encoder, decoder_in = encoder.numpy(), decoder_in.numpy()
        decoder_out = decoder_out.numpy()
        assert encoder.dtype == np.int32 and encoder.shape[1] <= 20
        assert decoder_in.shape == decoder_out.shape
        assert decoder_in.shape[1] <= 20
        assert (decoder_in[:, 0] == text.START_ID).all()
        # Teacher forcing: the inputs are the targets shifted by one step.
        shifted = decoder_out[:, :-1]
        real = shifted != text.END_ID
        assert (decoder_in[:, 1:][real] == shifted[real]).all()
        assert ((decoder_out == text.END_ID).sum(axis=1) == 1).all()
        assert (encoder != 0).any(axis=1).all()
        rows += len(encoder)
    assert 0.9 * 600 < rows <= 600


def test_bucketing_reduces_padding(real_pairs, tokenizers):
    src, tgt = tokenizers
    kwargs = {"batch_size": 64, "max_length": 64, "seed": 1}
    plain = text.make_translation_dataset(
        real_pairs, src, tgt, bucket_boundaries=None, **kwargs
    )
    bucketed = text.make_translation_dataset(real_pairs, src, tgt, **kwargs)
    plain_fraction = text.padding_fraction(plain)
    bucketed_fraction = text.padding_fraction(bucketed)
    # Measured on this data: about 0.6 without bucketing, 0.15 with.
    assert plain_fraction > 0.4
    assert bucketed_fraction < 0.25
    assert bucketed_fraction < plain_fraction / 2


def test_bad_pipeline_arguments(tokenizers):
    with pytest.raises(ValueError, match="`max_length`.*max_length=1"):
        text.make_translation_dataset([("a", "b")], *tokenizers, max_length=1)
    with pytest.raises(FileNotFoundError, match="No SentencePiece model"):
        text.load_tokenizer("/nonexistent.model")
