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
    if bias == "all":  # the Dense head trains its bias, not its kernel
        with pytest.warns(UserWarning, match="\\['head'\\] now train some"):
            keras_rnn_lora.mark_only_lora_as_trainable(lora_model, bias=bias)
    else:
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


# -- enable, mark, compile and fit in any order -------------------------------


def _data():
    return x_batch(3, batch=8), np.ones((8, 2), "float32")


def _compiled(model):
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def _fit(model):
    x, y = _data()
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)


def _enable(base):
    lora_model = keras_rnn_lora.enable_lora(base, rank=2)
    for i, cell in enumerate(lora_cells(lora_model).values()):
        randomize_lora(cell, seed=i)
    return lora_model


def _run(order, base):
    """Runs the calls `order` names on `base`; returns the LoRA model and
    its weights just before the last `fit`."""
    model, before = base, None
    steps = order.split(", ")
    for i, step in enumerate(steps):
        if step in ("compiled base", "compile"):
            _compiled(model)
        elif step == "enable":
            model = _enable(model)
        elif step == "mark":
            keras_rnn_lora.mark_only_lora_as_trainable(model)
        elif step == "fit":
            if i == len(steps) - 1:
                before = {w.path: to_numpy(w) for w in model.weights}
            _fit(model)
    return model, before


@pytest.mark.parametrize(
    "order",
    [
        "enable, mark, compile, fit",
        "enable, compile, mark, fit",
        "compiled base, enable, mark, fit",
        "enable, compile, fit, mark, fit",
    ],
)
def test_mark_then_fit_trains_only_the_factors_in_any_order(order):
    lora_model, before = _run(order, sequential_model())
    factors = {
        id(w) for c in lora_cells(lora_model).values() for w in c.lora_weights
    }
    assert {id(w) for w in lora_model.trainable_weights} == factors
    for w in lora_model.weights:
        changed = not np.array_equal(to_numpy(w), before[w.path])
        assert changed == (id(w) in factors), w.path


def test_enable_lora_compiles_like_the_base_without_building_the_optimizer():
    base = _compiled(sequential_model())
    _fit(base)
    lora_model = keras_rnn_lora.enable_lora(base, rank=2)
    assert lora_model.compiled and not lora_model.optimizer.built
    assert lora_model.get_compile_config() == base.get_compile_config()
    assert not keras_rnn_lora.enable_lora(sequential_model(), rank=2).compiled


def test_a_model_that_cannot_recompile_asks_for_compile():
    def local_loss(y, p):  # a closure: its compile config cannot rebuild it
        return keras.ops.mean((y - p) ** 2)

    lora_model = _enable(sequential_model())
    lora_model.compile(optimizer="adam", loss=local_loss)
    with pytest.warns(UserWarning, match="call `model.compile"):
        keras_rnn_lora.mark_only_lora_as_trainable(lora_model)
    x, y = _data()
    with pytest.raises(ValueError, match="compile"):
        lora_model.fit(x, y, verbose=0)


# -- what is frozen survives saving -------------------------------------------


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_trainability_survives_keras_save_and_load(bias, tmp_path):
    lora_model = _compiled(_enable(functional_model()))
    keras_rnn_lora.mark_only_lora_as_trainable(
        lora_model, bias=bias, trainable_layers=["head"]
    )
    expected = sorted(w.path for w in lora_model.trainable_weights)
    assert "head/kernel" in expected
    _fit(lora_model)
    path = tmp_path / "m.keras"
    lora_model.save(path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", UserWarning
        )  # "Skipping variable loading ..."
        loaded = keras.saving.load_model(path)
    assert sorted(w.path for w in loaded.trainable_weights) == expected
    before = {w.path: to_numpy(w) for w in loaded.weights}
    _fit(loaded)
    for w in loaded.weights:
        changed = not np.array_equal(to_numpy(w), before[w.path])
        assert changed == (w.path in expected), w.path


def test_trainable_layers_train_fully_beside_the_adapters():
    lora_model = _enable(functional_model())
    keras_rnn_lora.mark_only_lora_as_trainable(
        lora_model, trainable_layers="head"
    )
    names = {w.path for w in lora_model.trainable_weights}
    assert {"head/kernel", "head/bias"} <= names
    assert not any(n.startswith("gru/") and "lora" not in n for n in names)
    # Naming an adapted layer trains its unadapted weights, never its
    # adapted kernel.
    keras_rnn_lora.mark_only_lora_as_trainable(
        lora_model, trainable_layers=["gru"]
    )
    gru = {w.path.split("/")[-1] for w in lora_model.trainable_weights}
    assert {"kernel", "bias"} <= gru and "recurrent_kernel" not in gru
    with pytest.raises(ValueError, match="no layer named \\['nope'\\]"):
        keras_rnn_lora.mark_only_lora_as_trainable(
            lora_model, trainable_layers=["nope"]
        )


def test_setting_trainable_on_an_adapted_layer_keeps_its_kernel_frozen():
    lora_model = _enable(sequential_model())
    lora_model.trainable = False
    lora_model.trainable = True
    cell = lora_cells(lora_model)["rnn/cell"]
    assert not cell.recurrent_kernel.trainable
    assert all(w.trainable for w in cell.lora_weights)


def test_lora_summary_prints_a_table_by_layer():
    lora_model = _enable(functional_model())
    lines = []
    keras_rnn_lora.lora_summary(lora_model, print_fn=lines.append, by_layer=1)
    header = next(line for line in lines if line.startswith("adapter"))
    assert header.split() == [
        "adapter",
        "class",
        "rank",
        "targets",
        "LoRA",
        "params",
        "merged",
    ]
    rows = [line for line in lines if line.startswith("gru/cell")]
    assert rows and "LoRAGRUCell" in rows[0] and "recurrent" in rows[0]
    assert lines[-1].startswith("trainable: ")
