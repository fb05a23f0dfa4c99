"""Tests for trainability, counting and merging a whole model
(keras_rnn_lora/training.py)."""

import keras
import numpy as np
import pytest
from conftest import randomize_lora
from conftest import to_numpy
from example_models import FEATURES
from example_models import functional_model
from example_models import sequential_model
from example_models import x_batch

import keras_rnn_lora
from keras_rnn_lora.walk import lora_cells


def test_mark_only_lora_as_trainable_then_fit_changes_only_factors():
    lora_model = keras_rnn_lora.enable_lora(functional_model(), rank=2)
    keras_rnn_lora.mark_only_lora_as_trainable(lora_model)
    factor_ids = {
        id(w) for c in lora_cells(lora_model).values() for w in c.lora_weights
    }
    assert {id(w) for w in lora_model.trainable_weights} == factor_ids
    before = {w.path: to_numpy(w) for w in lora_model.weights}
    lora_model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    lora_model.fit(
        x_batch(3, batch=8), np.ones((8, 2)), epochs=2, batch_size=4, verbose=0
    )
    for w in lora_model.weights:
        changed = not np.array_equal(to_numpy(w), before[w.path])
        assert changed == (id(w) in factor_ids), w.path


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_mark_only_lora_bias_modes(bias):
    lora_model = keras_rnn_lora.enable_lora(
        sequential_model(), rank=2, layers=["rnn"]
    )
    keras_rnn_lora.mark_only_lora_as_trainable(lora_model, bias=bias)
    names = sorted(w.path.split("/")[-1] for w in lora_model.trainable_weights)
    expected = ["bias", "lora_recurrent_kernel_a", "lora_recurrent_kernel_b"]
    if bias == "all":
        expected = ["bias", *expected]  # the Dense head's bias too
    assert names == sorted(expected)
    with pytest.raises(ValueError, match="`bias`.*Received: bias='some'"):
        keras_rnn_lora.mark_only_lora_as_trainable(lora_model, bias="some")
    with pytest.raises(ValueError, match="no LoRA cell"):
        keras_rnn_lora.mark_only_lora_as_trainable(sequential_model())


def test_lora_summary_counts(capsys):
    lora_model = keras_rnn_lora.enable_lora(sequential_model(), rank=2)
    keras_rnn_lora.mark_only_lora_as_trainable(lora_model)
    summary = keras_rnn_lora.lora_summary(lora_model)
    gru = 3 * 6 * (FEATURES + 6) + 2 * 3 * 6  # kernels + reset_after bias
    head = 6 * 2 + 2
    lora = 2 * 6 + 2 * 18
    assert {k: summary[k] for k in ("trainable", "total", "lora", "ratio")} == {
        "trainable": lora,
        "total": gru + head + lora,
        "lora": lora,
        "ratio": pytest.approx(lora / (gru + head + lora)),
    }
    line = capsys.readouterr().out.strip()
    total = gru + head + lora
    assert line.startswith(
        f"trainable: {lora:,} of {total:,} ({100 * lora / total:.2f}%)"
    )


def test_merge_and_unmerge_every_cell():
    lora_model = keras_rnn_lora.enable_lora(functional_model(), rank=2)
    for i, cell in enumerate(lora_cells(lora_model).values()):
        randomize_lora(cell, seed=i)
    x = x_batch(4)
    expected = to_numpy(lora_model(x))
    before = [to_numpy(w) for w in lora_model.weights]
    keras_rnn_lora.merge_lora(lora_model)
    assert all(c.lora_merged for c in lora_cells(lora_model).values())
    np.testing.assert_allclose(to_numpy(lora_model(x)), expected, atol=1e-5)
    keras_rnn_lora.unmerge_lora(lora_model)
    for b, w in zip(before, lora_model.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), b)
    with pytest.raises(ValueError, match="`merge_lora` found no LoRA cell"):
        keras_rnn_lora.merge_lora(sequential_model())


def test_merge_with_reset_starts_a_fresh_adapter():
    lora_model = keras_rnn_lora.enable_lora(sequential_model(), rank=2)
    cell = lora_cells(lora_model)["rnn/cell"]
    randomize_lora(cell)
    x = x_batch(5)
    expected = to_numpy(lora_model(x))
    keras_rnn_lora.merge_lora(lora_model, reset=True)
    assert not cell.lora_merged
    assert all(w.trainable for w in cell.lora_weights)
    np.testing.assert_array_equal(
        to_numpy(cell.lora_recurrent_kernel_b), np.zeros((2, 18))
    )
    np.testing.assert_allclose(to_numpy(lora_model(x)), expected, atol=1e-5)
    # The next adapter trains on the merged base.
    keras_rnn_lora.mark_only_lora_as_trainable(lora_model)
    lora_model.compile(optimizer="adam", loss="mse")
    lora_model.fit(x_batch(6, batch=8), np.ones((8, 2)), epochs=2, verbose=0)
    assert np.abs(to_numpy(cell.lora_recurrent_kernel_b)).max() > 0


def poison(cell):
    b = cell.lora_weights[1]
    value = to_numpy(b)
    value[0, 0] = np.nan
    b.assign(value)


def test_model_merge_refuses_non_finite_and_leaves_every_layer_unchanged():
    lora_model = keras_rnn_lora.enable_lora(functional_model(), rank=2)
    cells = lora_cells(lora_model)
    for i, cell in enumerate(cells.values()):
        randomize_lora(cell, seed=i)
    poison(cells["lstm/cell"])  # not the first layer: all or nothing
    before = [to_numpy(w) for w in lora_model.weights]
    for reset in (False, True):
        with pytest.raises(ValueError, match="Layer 'lstm/cell'.*non-finite"):
            keras_rnn_lora.merge_lora(lora_model, reset=reset)
        assert not any(c.lora_merged for c in cells.values())
        for b, w in zip(before, lora_model.weights, strict=True):
            np.testing.assert_array_equal(to_numpy(w), b)
    with pytest.raises(ValueError, match="Layer 'lstm/cell'.*non-finite"):
        keras_rnn_lora.to_base_model(lora_model)
