"""Tests for model-level LoRA: conversion, trainability, merging."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import randomize_lora
from conftest import to_numpy

import keras_rnn_lora
from keras_rnn_lora import LoRAGRUCell
from keras_rnn_lora import LoRALSTMCell
from keras_rnn_lora import LoRASimpleRNNCell
from keras_rnn_lora.adapters import lora_cells

STEPS, FEATURES = 5, 4


def x_batch(seed=0, batch=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, STEPS, FEATURES)).astype("float32")


def randomize_weights(model, seed=0):
    """Non-zero everywhere, biases included: zero weights hide copy bugs."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign(rng.normal(size=w.shape).astype("float32") * 0.4)


def functional_model():
    """Every recurrent layer kind, a Bidirectional and stacked cells."""
    inputs = keras.Input((STEPS, FEATURES))
    a = keras.layers.GRU(6, return_sequences=True, name="gru")(inputs)
    b = keras.layers.LSTM(5, return_sequences=True, name="lstm")(a)
    c = keras.layers.Bidirectional(
        keras.layers.SimpleRNN(4, return_sequences=True), name="bi"
    )(b)
    d = keras.layers.RNN(
        keras.layers.StackedRNNCells(
            [keras.layers.GRUCell(4), keras.layers.LSTMCell(3)]
        ),
        name="stacked",
    )(c)
    outputs = keras.layers.Dense(2, name="head")(d)
    model = keras.Model(inputs, outputs, name="base")
    randomize_weights(model)
    return model


def sequential_model():
    model = keras.Sequential(
        [
            keras.Input((STEPS, FEATURES)),
            keras.layers.RNN(keras.layers.GRUCell(6), name="rnn"),
            keras.layers.Dense(2, name="head"),
        ],
        name="seq",
    )
    randomize_weights(model)
    return model


def nested_model():
    inner = keras.Sequential(
        [keras.Input((STEPS, FEATURES)), keras.layers.LSTM(5, name="lstm")],
        name="inner",
    )
    inputs = keras.Input((STEPS, FEATURES))
    outputs = keras.layers.Dense(2, name="head")(inner(inputs))
    model = keras.Model(inputs, outputs, name="outer")
    randomize_weights(model)
    return model


MODELS = {
    "functional": functional_model,
    "sequential": sequential_model,
    "nested": nested_model,
}
EXPECTED_CELLS = {
    "functional": {
        "gru/cell": LoRAGRUCell,
        "lstm/cell": LoRALSTMCell,
        "bi/forward/cell": LoRASimpleRNNCell,
        "bi/backward/cell": LoRASimpleRNNCell,
    },
    "sequential": {"rnn/cell": LoRAGRUCell},
    "nested": {"inner/lstm/cell": LoRALSTMCell},
}


def assert_same_outputs(model_a, model_b, x, atol=1e-5):
    np.testing.assert_allclose(
        to_numpy(model_a(x)), to_numpy(model_b(x)), atol=atol, rtol=0
    )


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_enable_lora_converts_and_keeps_outputs(kind):
    base = MODELS[kind]()
    before = [to_numpy(w) for w in base.weights]
    lora_model = keras_rnn_lora.enable_lora(base, rank=2)
    cells = lora_cells(lora_model)
    for path, cls in EXPECTED_CELLS[kind].items():
        assert type(cells[path]) is cls, path
    if kind == "functional":
        assert type(cells["stacked/cell/0"]) is LoRAGRUCell
        assert type(cells["stacked/cell/1"]) is LoRALSTMCell
    assert_same_outputs(lora_model, base, x_batch())
    # The input model is untouched and shares no variable with the copy.
    for b, w in zip(before, base.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), b)
    assert not {id(w) for w in base.weights} & {
        id(w) for w in lora_model.weights
    }


def test_two_conversions_are_independent():
    base = sequential_model()
    first = keras_rnn_lora.enable_lora(base, rank=2)
    second = keras_rnn_lora.enable_lora(base, rank=2)
    randomize_lora(lora_cells(first)["rnn/cell"], seed=3)
    x = x_batch(1)
    assert_same_outputs(second, base, x)
    assert np.abs(to_numpy(first(x)) - to_numpy(base(x))).max() > 1e-4


def test_layers_argument_narrows_conversion():
    base = functional_model()
    lora_model = keras_rnn_lora.enable_lora(base, rank=2, layers=["gru", "bi"])
    assert sorted(lora_cells(lora_model)) == [
        "bi/backward/cell",
        "bi/forward/cell",
        "gru/cell",
    ]
    with pytest.raises(ValueError, match="no layer named \\['nope'\\]"):
        keras_rnn_lora.enable_lora(base, rank=2, layers=["nope"])


def test_lora_options_reach_every_cell():
    lora_model = keras_rnn_lora.enable_lora(
        sequential_model(),
        rank=3,
        lora_alpha=6.0,
        use_rslora=True,
        lora_targets=("kernel", "recurrent"),
    )
    cell = lora_cells(lora_model)["rnn/cell"]
    assert (cell.rank, cell.lora_alpha, cell.use_rslora) == (3, 6.0, True)
    assert cell.lora_targets == ("kernel", "recurrent")


def test_errors_of_enable_lora():
    dense_only = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2)], name="mlp"
    )
    with pytest.raises(ValueError, match="no recurrent layer.*'mlp'"):
        keras_rnn_lora.enable_lora(dense_only, rank=1)
    lora_model = keras_rnn_lora.enable_lora(sequential_model(), rank=2)
    with pytest.raises(ValueError, match="already carries LoRA"):
        keras_rnn_lora.enable_lora(lora_model, rank=2)
    with pytest.raises(ValueError, match="Cell 'gru_cell[_0-9]*': .*`rank`"):
        keras_rnn_lora.enable_lora(sequential_model(), rank=99)
    # Also a ValueError, as 0.1.0 raised.
    with pytest.raises(ValueError, match="expects a keras.Model as `model`"):
        keras_rnn_lora.enable_lora(keras.layers.GRU(3), rank=1)


def test_already_lora_layers_are_not_wrapped_twice():
    inputs = keras.Input((STEPS, FEATURES))
    a = keras.layers.RNN(LoRAGRUCell(6, rank=2), return_sequences=True)(inputs)
    b = keras.layers.GRU(4, name="plain")(a)
    model = keras.Model(inputs, b)
    randomize_weights(model)
    randomize_lora(model.layers[1].cell, seed=5)
    converted = keras_rnn_lora.enable_lora(model, rank=1)
    cells = lora_cells(converted)
    assert cells["plain/cell"].rank == 1
    kept = [c for p, c in cells.items() if p != "plain/cell"]
    assert len(kept) == 1 and kept[0].rank == 2
    assert_same_outputs(converted, model, x_batch(2))


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
    assert summary == {
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


# -- merging and back to stock Keras ---------------------------------------


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


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_to_base_model_equals_lora_model(merged):
    lora_model = keras_rnn_lora.enable_lora(
        functional_model(), rank=2, lora_targets=("kernel", "recurrent")
    )
    for i, cell in enumerate(lora_cells(lora_model).values()):
        randomize_lora(cell, seed=i)
    if merged:
        keras_rnn_lora.merge_lora(lora_model)
    base = keras_rnn_lora.to_base_model(lora_model)
    assert not lora_cells(base)
    assert len(base.weights) == len(functional_model().weights)
    assert_same_outputs(base, lora_model, x_batch(7))


def test_to_base_model_loads_without_this_library(tmp_path):
    lora_model = keras_rnn_lora.enable_lora(nested_model(), rank=2)
    randomize_lora(lora_cells(lora_model)["inner/lstm/cell"])
    base = keras_rnn_lora.to_base_model(lora_model)
    x = x_batch(8)
    model_path = tmp_path / "base.keras"
    base.save(model_path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", to_numpy(lora_model(x)))
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["keras_rnn_lora"] = None  # importing it now fails
        import keras, numpy as np
        model = keras.saving.load_model({str(model_path)!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        expected = np.load({str(tmp_path / "expected.npy")!r})
        got = keras.ops.convert_to_numpy(model(x))
        np.testing.assert_allclose(got, expected, atol=1e-5)
        print("loaded-ok")
        """
    )
    env = dict(os.environ, KERAS_BACKEND=BACKEND, PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "loaded-ok" in result.stdout, result.stderr[-2000:]


def test_lora_model_round_trips_through_keras_file(tmp_path):
    lora_model = keras_rnn_lora.enable_lora(functional_model(), rank=2)
    for i, cell in enumerate(lora_cells(lora_model).values()):
        randomize_lora(cell, seed=i)
    path = tmp_path / "lora.keras"
    lora_model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        to_numpy(loaded(x_batch(9))), to_numpy(lora_model(x_batch(9)))
    )


def test_bfloat16_base_keeps_factors_float32_and_trains():
    base = functional_model()
    lora_model = keras_rnn_lora.enable_lora(base, rank=2, base_dtype="bfloat16")
    cells = lora_cells(lora_model)
    for cell in cells.values():
        assert cell.kernel.dtype == "bfloat16"
        assert cell.recurrent_kernel.dtype == "bfloat16"
        assert all(w.dtype == "float32" for w in cell.lora_weights)
    assert lora_model.get_layer("head").kernel.dtype == "bfloat16"
    x = x_batch(10)
    np.testing.assert_allclose(
        to_numpy(lora_model(x)).astype("float32"),
        to_numpy(base(x)),
        atol=0.1,
    )
    keras_rnn_lora.mark_only_lora_as_trainable(lora_model)
    lora_model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    history = lora_model.fit(
        x_batch(11, batch=8), np.ones((8, 2)), epochs=3, verbose=0
    )
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert all(
        w.dtype == "float32" for c in cells.values() for w in c.lora_weights
    )


# -- refusing non-finite merges, clear errors ---------------------------------


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


@pytest.mark.parametrize(
    "function",
    [
        "enable_lora",
        "merge_lora",
        "unmerge_lora",
        "to_base_model",
        "mark_only_lora_as_trainable",
        "lora_summary",
    ],
)
def test_model_functions_name_a_wrong_model_argument(function):
    call = getattr(keras_rnn_lora, function)
    args = (2,) if function == "enable_lora" else ()
    for bad in (None, "model", keras.layers.GRU(3)):
        with pytest.raises(TypeError, match=f"`{function}` expects a keras"):
            call(bad, *args)


def test_enable_lora_explains_subclassed_models():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.gru = keras.layers.GRU(4)
            self.head = keras.layers.Dense(2)

        def call(self, x):
            return self.head(self.gru(x))

    model = Subclassed()
    model(x_batch())
    with pytest.raises(ValueError, match="subclassed keras.Model.*LoRAGRU"):
        keras_rnn_lora.enable_lora(model, rank=2)


@pytest.mark.parametrize("base_dtype", ["int8", "float8", "uint16", 3, "bad"])
def test_enable_lora_validates_base_dtype(base_dtype):
    with pytest.raises(ValueError, match="`base_dtype`, expected a floating"):
        keras_rnn_lora.enable_lora(
            sequential_model(), rank=2, base_dtype=base_dtype
        )
