"""Tests for enable_lora and to_base_model (keras_rnn_lora/convert.py)."""

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
from example_models import EXPECTED_CELLS
from example_models import FEATURES
from example_models import MODELS
from example_models import STEPS
from example_models import assert_same_outputs
from example_models import functional_model
from example_models import nested_model
from example_models import randomize_weights
from example_models import sequential_model
from example_models import x_batch

import keras_rnn_lora
from keras_rnn_lora import LoRAGRUCell
from keras_rnn_lora import LoRALSTMCell
from keras_rnn_lora.walk import lora_cells


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
    with pytest.raises(ValueError, match="Layer 'rnn': .*`rank`"):
        keras_rnn_lora.enable_lora(sequential_model(), rank=99)
    with pytest.raises(TypeError, match="expects a keras.Model as `model`"):
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


def test_an_unknown_setting_is_named():
    with pytest.raises(
        TypeError, match="unexpected keyword arguments \\['r'\\]"
    ):
        keras_rnn_lora.enable_lora(sequential_model(), r=4)
    with pytest.raises(TypeError, match="\\['lora_merged'\\]"):
        keras_rnn_lora.enable_lora(sequential_model(), rank=2, lora_merged=1)


def test_naming_a_layer_no_target_covers_gives_the_target_to_add():
    with pytest.raises(
        ValueError, match="\\['head'\\] would need `lora_targets`.*'dense'"
    ):
        keras_rnn_lora.enable_lora(sequential_model(), rank=2, layers=["head"])


def test_a_layer_is_named_when_its_rank_is_too_large():
    with pytest.raises(ValueError, match="Layer 'gru': .*`rank`.*\\(6\\)"):
        keras_rnn_lora.enable_lora(functional_model(), rank=99, layers="gru")
