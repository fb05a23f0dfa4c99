"""Tests for the masked loss and metrics."""

import numpy as np
import pytest
from conftest import to_numpy
from translators import TGT_VOCAB
from translators import random_batch
from translators import tiny_translator

from keras_rnn_lora.translation import metrics


def test_perplexity_and_accuracy_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, TGT_VOCAB)).astype("float32")
    targets = rng.integers(1, TGT_VOCAB, (2, 5)).astype("int32")
    targets[0, 3:] = 0
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token_nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    mask = targets != 0
    expected_ce = token_nll[mask].mean()
    perplexity = metrics.MaskedPerplexity()
    # Two updates of uneven size: the corpus value, not a mean of batches.
    perplexity.update_state(targets[:1], logits[:1])
    perplexity.update_state(targets[1:], logits[1:])
    np.testing.assert_allclose(
        float(to_numpy(perplexity.result())), np.exp(expected_ce), rtol=1e-5
    )
    loss = metrics.MaskedSparseCrossEntropy()
    np.testing.assert_allclose(
        float(to_numpy(loss(targets, logits))), expected_ce, rtol=1e-5
    )
    accuracy = metrics.MaskedAccuracy()
    accuracy.update_state(targets, logits)
    expected_acc = (logits.argmax(-1) == targets)[mask].mean()
    np.testing.assert_allclose(float(to_numpy(accuracy.result())), expected_acc)


def test_sample_weight_weighs_tokens_and_sentences():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 4, TGT_VOCAB)).astype("float32")
    targets = rng.integers(1, TGT_VOCAB, (2, 4)).astype("int32")
    targets[1, 2:] = 0
    sentence_weight = np.array([0.0, 1.0], "float32")
    weighted = metrics.MaskedPerplexity()
    weighted.update_state(targets, logits, sample_weight=sentence_weight)
    only_second = metrics.MaskedPerplexity()
    only_second.update_state(targets[1:], logits[1:])
    np.testing.assert_allclose(
        to_numpy(weighted.result()), to_numpy(only_second.result()), rtol=1e-6
    )
    token_weight = np.ones((2, 4), "float32")
    token_weight[0, 1:] = 0.0
    accuracy = metrics.MaskedAccuracy()
    accuracy.update_state(targets, logits, sample_weight=token_weight)
    kept = np.array([[1, 0, 0, 0], [1, 1, 0, 0]], bool)
    expected = (logits.argmax(-1) == targets)[kept].mean()
    np.testing.assert_allclose(to_numpy(accuracy.result()), expected, rtol=1e-6)


def test_label_smoothing_in_the_loss_only():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, TGT_VOCAB)).astype("float32")
    targets = rng.integers(1, TGT_VOCAB, (2, 5)).astype("int32")
    targets[0, 3:] = 0
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    smooth = 0.9 * nll + 0.1 * -log_probs.mean(-1)
    mask = targets != 0
    loss = metrics.MaskedSparseCrossEntropy(label_smoothing=0.1)
    np.testing.assert_allclose(
        float(to_numpy(loss(targets, logits))), smooth[mask].mean(), rtol=1e-5
    )
    assert loss.get_config()["label_smoothing"] == 0.1
    model = metrics.compile_translator(tiny_translator(), label_smoothing=0.1)
    src, dec, out = random_batch(9)
    results = model.evaluate([src, dec], out, verbose=0, return_dict=True)
    logits = to_numpy(model([src, dec]))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, out[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        results["perplexity"], np.exp(nll[out != 0].mean()), rtol=1e-4
    )
    with pytest.raises(ValueError, match="`label_smoothing`"):
        metrics.MaskedSparseCrossEntropy(label_smoothing=1.0)


def test_compile_translator_wraps_adam_in_loraplus():
    import keras

    import keras_rnn_lora

    model = keras_rnn_lora.enable_lora(tiny_translator(), rank=2)
    keras_rnn_lora.mark_only_lora_as_trainable(model)
    metrics.compile_translator(model, 0.01, loraplus_lr_ratio=4.0)
    optimizer = model.optimizer
    assert isinstance(optimizer, keras_rnn_lora.LoRAPlusOptimizer)
    assert optimizer.loraplus_lr_ratio == 4.0
    inner = optimizer.optimizer
    assert isinstance(inner, keras.optimizers.Adam)
    assert inner.clipnorm == 1.0
    np.testing.assert_allclose(float(to_numpy(inner.learning_rate)), 0.01)
    src, dec, out = random_batch(3)
    before = {v.path: to_numpy(v) for v in model.trainable_weights}
    model.fit([src, dec], out, epochs=1, verbose=0)
    moved = [
        v.path
        for v in model.trainable_weights
        if not np.array_equal(before[v.path], to_numpy(v))
    ]
    assert any(p.endswith("_b") for p in moved), moved
    with pytest.raises(ValueError, match="`loraplus_lr_ratio`"):
        metrics.compile_translator(tiny_translator(), loraplus_lr_ratio=-1)
