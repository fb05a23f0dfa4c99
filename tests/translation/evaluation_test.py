"""Tests for translating text and BLEU/chrF."""

import pytest
from conftest import iwslt_dir
from translators import train_tokenizers
from translators import translator_for

from keras_rnn_lora.translation import decoding
from keras_rnn_lora.translation import evaluation
from keras_rnn_lora.translation import iwslt2017
from keras_rnn_lora.translation import metrics
from keras_rnn_lora.translation.model import build_translator
from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor


def test_overfits_a_real_batch_and_greedy_reproduces_a_target(tmp_path):
    pairs = iwslt2017.read_pairs("train", iwslt_dir(), max_pairs=2000)
    preprocessor = TranslationPreprocessor.train(
        pairs, str(tmp_path), vocab_size=600, max_length=30
    )
    batch_pairs = [p for p in pairs if len(p[0]) < 40 and len(p[1]) < 40][:8]
    dataset = preprocessor.dataset(
        batch_pairs, batch_size=8, shuffle=False, bucket_boundaries=None
    )
    model = build_translator(
        preprocessor.source_vocabulary_size,
        preprocessor.target_vocabulary_size,
        embedding_dim=32,
        units=64,
        dropout=0.0,  # memorizing 8 pairs: regularization only slows it
    )
    metrics.compile_translator(model, learning_rate=0.02)
    history = model.fit(dataset, epochs=120, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[-1] < 0.2 * losses[0]
    translations = evaluation.translate(
        model, preprocessor, [p[0] for p in batch_pairs]
    )
    assert isinstance(translations, list) and len(translations) == 8
    assert (
        sum(t == p[1] for t, p in zip(translations, batch_pairs, strict=True))
        >= 1
    )
    assert evaluation.translate(model, preprocessor, []) == []
    # Beam search, and a compiled decoder, agree on what was learned.
    decoder = decoding.compiled_decoder(model, 2, preprocessor.max_length)
    beam = evaluation.translate(
        model, preprocessor, [p[0] for p in batch_pairs], 2, decoder
    )
    assert sum(t == p[1] for t, p in zip(beam, batch_pairs, strict=True)) >= 1


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tokenizers"))
    return train_tokenizers(directory, 500, 300, max_length=8)


@pytest.fixture
def small_translator(tokenizer_dir):
    preprocessor = TranslationPreprocessor.load(tokenizer_dir)
    return translator_for(preprocessor, embedding_dim=8, units=8), preprocessor


def test_one_string_is_one_sentence(small_translator):
    model, preprocessor = small_translator
    sentences = ["Hello world.", "Thank you.", "Good bye."]
    expected = evaluation.translate(model, preprocessor, sentences)
    one = evaluation.translate(model, preprocessor, "Hello world.")
    assert isinstance(one, str) and one == expected[0]
    # Any batch size gives the same translations.
    batched = evaluation.translate(model, preprocessor, sentences, batch_size=1)
    assert batched == expected


@pytest.mark.parametrize("batch_size", [0, -1, True, 1.5, "8"])
def test_batch_size_must_be_a_positive_integer(small_translator, batch_size):
    model, preprocessor = small_translator
    with pytest.raises(ValueError, match="`batch_size`, expected a positive"):
        evaluation.translate(
            model, preprocessor, ["Hello."], batch_size=batch_size
        )


def test_sentences_must_be_strings(small_translator):
    model, preprocessor = small_translator
    with pytest.raises(TypeError, match="`sentences`.*int at index 1"):
        evaluation.translate(model, preprocessor, ["Hello.", 7])


def test_corpus_scores_with_sacrebleu():
    references = ["Das ist ein kleiner Test.", "Guten Morgen, Welt!"]
    perfect = evaluation.corpus_scores(references, references)
    assert perfect["bleu"] == pytest.approx(100.0)
    assert perfect["chrf"] == pytest.approx(100.0)
    partial = evaluation.corpus_scores(
        ["Das ist ein Test.", "Morgen"], references
    )
    assert 0 < partial["bleu"] < 100 and 0 < partial["chrf"] < 100
    with pytest.raises(ValueError, match="2 `references`"):
        evaluation.corpus_scores(["a"], references)


def test_score_signatures_are_those_of_corpus_scores():
    import sacrebleu

    found = evaluation.score_signatures()
    assert set(found) == {"bleu", "chrf"}
    assert "nrefs:1" in found["bleu"] and "tok:13a" in found["bleu"]
    assert f"version:{sacrebleu.__version__}" in found["bleu"]
    assert "nrefs:1" in found["chrf"] and "nc:6" in found["chrf"]


def test_a_model_that_ends_every_sentence_at_once_is_told(tmp_path):
    """A briefly trained translator's most likely first token is [END]: every
    translation is empty, and `translate` says why instead of returning
    blanks silently."""
    import numpy as np

    from keras_rnn_lora.translation.tokens import END_ID

    directory = train_tokenizers(str(tmp_path), 300, 120, 20)
    preprocessor = TranslationPreprocessor.load(directory)
    model = translator_for(preprocessor)
    logits = model.decoder.get_layer("logits")
    bias = np.zeros(logits.bias.shape, "float32")
    bias[END_ID] = 100.0  # [END] first, whatever the input
    logits.bias.assign(bias)
    with pytest.warns(evaluation.EmptyTranslationWarning, match="Every one"):
        assert evaluation.translate(model, preprocessor, ["Hello."]) == [""]
    with pytest.warns(evaluation.EmptyTranslationWarning):
        assert evaluation.translate(model, preprocessor, "Hello.") == ""
    # Empty input translates to empty output without a warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", evaluation.EmptyTranslationWarning)
        assert evaluation.translate(model, preprocessor, [""]) == [""]
