"""Tests for the TranslationPreprocessor: tokenizers, text <-> ids and the
translation pipeline."""

import numpy as np
import pytest
from conftest import iwslt_dir

from keras_rnn_lora.translation import iwslt2017
from keras_rnn_lora.translation import tokens
from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor
from keras_rnn_lora.translation.preprocessing import padding_fraction
from keras_rnn_lora.translation.sentencepiece_models import load_tokenizer

GERMAN = [
    "Die Staaten, über Größe und Maß: «Äpfel»!",
    "Straße, Fußgänger; Öl? Übermäßig schön – oder nicht...",
]


@pytest.fixture(scope="module")
def real_pairs():
    return iwslt2017.read_pairs("train", iwslt_dir(), max_pairs=4000)


@pytest.fixture(scope="module")
def preprocessor_dir(real_pairs, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tokenizers"))
    TranslationPreprocessor.train(real_pairs, directory, vocab_size=2000)
    return directory


@pytest.fixture
def preprocessor(preprocessor_dir):
    # Loaded per test: `keras.backend.clear_session()` (run before each
    # test) drops the TF resources a loaded SentencePiece op holds.
    return TranslationPreprocessor.load(preprocessor_dir)


def test_special_ids_and_round_trip(preprocessor):
    german = preprocessor.target_tokenizer
    for piece, token_id in tokens.SPECIAL_TOKENS.items():
        assert german.token_to_id(piece) == token_id
    for sentence in GERMAN:
        ids = german(sentence)
        assert german.detokenize(ids) == sentence
    # The preprocessor's own text <-> ids agrees with keras-hub's.
    ids = preprocessor.target.tokenize([GERMAN[0]]).to_tensor().numpy()
    assert preprocessor.target_texts(ids) == [GERMAN[0]]


def test_tokenizers_are_reused_not_retrained(real_pairs, tmp_path):
    TranslationPreprocessor.train(real_pairs[:500], str(tmp_path), 500)
    path = tmp_path / "spm_de_500.model"
    stamp = path.stat().st_mtime_ns
    TranslationPreprocessor.train([], str(tmp_path), vocab_size=500)
    assert path.stat().st_mtime_ns == stamp
    assert TranslationPreprocessor.load(str(tmp_path)).vocab_size == 500
    with pytest.raises(ValueError, match="no text to train"):
        TranslationPreprocessor.train([], str(tmp_path / "new"), 500)


def test_pipeline_shapes_and_no_padding_rows(real_pairs, preprocessor_dir):
    preprocessor = TranslationPreprocessor.load(preprocessor_dir)
    short = TranslationPreprocessor(
        preprocessor.source_proto, preprocessor.target_proto, max_length=20
    )
    dataset = short.dataset(real_pairs[:600], batch_size=32)
    rows = 0
    for (encoder, decoder_in), decoder_out in dataset:
        encoder, decoder_in = encoder.numpy(), decoder_in.numpy()
        decoder_out = decoder_out.numpy()
        assert encoder.dtype == np.int32 and encoder.shape[1] <= 20
        assert decoder_in.shape == decoder_out.shape
        assert decoder_in.shape[1] <= 20
        assert (decoder_in[:, 0] == tokens.START_ID).all()
        # Teacher forcing: the inputs are the targets shifted by one step.
        shifted = decoder_out[:, :-1]
        real = shifted != tokens.END_ID
        assert (decoder_in[:, 1:][real] == shifted[real]).all()
        assert ((decoder_out == tokens.END_ID).sum(axis=1) == 1).all()
        assert (encoder != 0).any(axis=1).all()
        rows += len(encoder)
    assert 0.9 * 600 < rows <= 600


@pytest.mark.parametrize("bucketed", [True, False])
def test_dataset_declares_its_number_of_batches(
    real_pairs, preprocessor, bucketed
):
    import tensorflow as tf

    boundaries = {} if bucketed else {"bucket_boundaries": None}
    pairs = real_pairs[:700] + [("", "leer"), ("empty", "")]  # dropped
    dataset = preprocessor.dataset(pairs, batch_size=64, seed=3, **boundaries)
    declared = int(dataset.cardinality())
    assert declared == sum(1 for _ in dataset) == sum(1 for _ in dataset)
    # Another shuffling order, the same number of batches.
    again = preprocessor.dataset(pairs, batch_size=64, seed=4, **boundaries)
    assert int(again.cardinality()) == declared
    lazy = preprocessor.dataset(pairs, count_batches=False, **boundaries)
    assert int(lazy.cardinality()) == tf.data.UNKNOWN_CARDINALITY


def test_fit_on_the_dataset_warns_of_nothing(real_pairs, preprocessor):
    import warnings

    from keras_rnn_lora.translation import build_translator
    from keras_rnn_lora.translation import compile_translator

    dataset = preprocessor.dataset(real_pairs[:64], batch_size=32)
    model = build_translator(
        preprocessor.source_vocabulary_size,
        preprocessor.target_vocabulary_size,
        embedding_dim=8,
        units=8,
    )
    compile_translator(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(dataset, epochs=2, shuffle=False, verbose=0)
    assert not [w for w in caught if "ran out of data" in str(w.message)]


def test_bucketing_reduces_padding(real_pairs, preprocessor):
    kwargs = {"batch_size": 64, "seed": 1}
    plain = preprocessor.dataset(real_pairs, bucket_boundaries=None, **kwargs)
    bucketed = preprocessor.dataset(real_pairs, **kwargs)
    plain_fraction = padding_fraction(plain)
    bucketed_fraction = padding_fraction(bucketed)
    # Measured on this data: about 0.6 without bucketing, 0.15 with.
    assert plain_fraction > 0.4
    assert bucketed_fraction < 0.25
    assert bucketed_fraction < plain_fraction / 2


def test_bucketed_batches_have_one_shape_per_bucket(real_pairs, preprocessor):
    # Padded to each batch's longest pair, the batches had almost as many
    # shapes as batches, and JAX compiled its training step for each.
    dataset = preprocessor.dataset(
        real_pairs[:1000], batch_size=16, bucket_boundaries=(12, 8, 24, 500)
    )
    widths = {
        (int(source.shape[1]), int(inputs.shape[1]), int(targets.shape[1]))
        for (source, inputs), targets in dataset
    }
    limit = preprocessor.max_length
    assert widths == {(w, w, w) for w in (7, 11, 23, limit)}


@pytest.mark.parametrize("boundaries", [(8, 0), (8, 2.5), "8", 8])
def test_invalid_bucket_boundaries_are_named(preprocessor, boundaries):
    with pytest.raises(ValueError, match="bucket_boundaries"):
        preprocessor.dataset([("a", "b")], bucket_boundaries=boundaries)


def test_source_batch_and_target_texts(preprocessor):
    batch = preprocessor.source_batch(["Thank you.", "", "word " * 200])
    assert batch.dtype == np.int32 and batch.shape[1] % 16 == 0
    assert (batch[1] == 0).all()  # an empty sentence is all padding
    assert (batch[2] != 0).sum() == preprocessor.max_length
    ids = np.array([[5, 6, tokens.END_ID, 7], [tokens.END_ID, 8, 0, 0]])
    texts = preprocessor.target_texts(ids)
    assert (
        texts[1] == "" and texts[0] == preprocessor.target_texts(ids[:1, :2])[0]
    )


def test_bad_arguments(preprocessor):
    with pytest.raises(ValueError, match="`max_length`.*max_length=1"):
        TranslationPreprocessor(
            preprocessor.source_proto, preprocessor.target_proto, max_length=1
        )
    with pytest.raises(FileNotFoundError, match="No SentencePiece model"):
        load_tokenizer("/nonexistent.model")
    with pytest.raises(FileNotFoundError, match="No preprocessor.json"):
        TranslationPreprocessor.load("/nonexistent")


def test_tokenizers_survive_seeding_after_loading(preprocessor_dir):
    # Seeding clears TensorFlow's eager caches, and with them the resources
    # the SentencePiece ops hold: tokenizers loaded before were gone.
    import keras

    preprocessor = TranslationPreprocessor.load(preprocessor_dir)
    sentences = ["Hello world.", GERMAN[0]]
    batch = preprocessor.source_batch(sentences)
    texts = preprocessor.target_texts(batch)
    pairs = list(zip(sentences, sentences, strict=True))
    before = list(preprocessor.dataset(pairs, shuffle=False))
    vocabulary = preprocessor.source_vocabulary_size
    keras.utils.set_random_seed(7)
    assert preprocessor.source_vocabulary_size == vocabulary
    np.testing.assert_array_equal(preprocessor.source_batch(sentences), batch)
    assert preprocessor.target_texts(batch) == texts
    after = list(preprocessor.dataset(pairs, shuffle=False))
    for (old_inputs, old_targets), (new_inputs, new_targets) in zip(
        before, after, strict=True
    ):
        for old, new in zip(
            [*old_inputs, old_targets], [*new_inputs, new_targets], strict=True
        ):
            np.testing.assert_array_equal(old.numpy(), new.numpy())
