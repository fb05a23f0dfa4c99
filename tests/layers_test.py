"""Tests for the whole-sequence LoRA layers (LoRASimpleRNN, LoRAGRU,
LoRALSTM)."""

import keras
import numpy as np
import pytest
from conftest import gradients
from conftest import randomize_lora
from conftest import to_numpy

import keras_rnn_lora
from keras_rnn_lora import layers as layers_lib
from keras_rnn_lora.adapters import lora_cells

LAYERS = [
    keras_rnn_lora.LoRASimpleRNN,
    keras_rnn_lora.LoRAGRU,
    keras_rnn_lora.LoRALSTM,
]
UNITS = 6


def x_batch(seed=0):
    return np.random.default_rng(seed).normal(size=(3, 5, 4)).astype("float32")


def pair(cls, **kwargs):
    """A LoRA layer with random factors, and the same layer run as
    `keras.layers.RNN` over its cell (the reference factored path)."""
    layer = cls(UNITS, rank=2, return_sequences=True, **kwargs)
    layer(x_batch())
    randomize_lora(layer)
    reference = keras.layers.RNN(
        layer.cell.__class__.from_config(layer.cell.get_config()),
        return_sequences=True,
    )
    reference(x_batch())
    reference.cell.set_weights(layer.cell.get_weights())
    return layer, reference


def stock_merged(layer):
    stock = layer._keras_layer(UNITS, return_sequences=True)
    stock(x_batch())
    weights = [to_numpy(layer.cell.effective_kernel(t)) for t in ("kernel",)]
    weights.append(to_numpy(layer.cell.effective_kernel("recurrent")))
    if layer.cell.bias is not None:
        weights.append(to_numpy(layer.cell.bias))
    stock.set_weights(weights)
    return stock


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_matches_stock_layer_with_merged_kernel(cls):
    layer, _ = pair(cls, lora_targets=("kernel", "recurrent"))
    x = x_batch(1)
    np.testing.assert_allclose(
        to_numpy(layer(x)), to_numpy(stock_merged(layer)(x)), atol=1e-5
    )


@pytest.mark.parametrize("fused", [False, True], ids=["cell", "fused_view"])
@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_forward_and_gradients_equal_the_cell_path(cls, fused, monkeypatch):
    """`fused_view` takes the layer's fused branch (kernels read as
    W + s*A@B through the stock layer's dispatch) even on a CPU, where Keras
    then falls back to its loop over the real cell."""
    if fused:
        monkeypatch.setattr(layers_lib, "accelerator_present", lambda: True)
    layer, reference = pair(cls)
    x, y = x_batch(2), np.ones((3, 5, UNITS), "float32")
    np.testing.assert_allclose(
        to_numpy(layer(x)), to_numpy(reference(x)), atol=1e-6
    )
    model = keras.Sequential([keras.Input((5, 4)), layer])
    reference_model = keras.Sequential([keras.Input((5, 4)), reference])
    got = gradients(model, x, y)
    expected = gradients(reference_model, x, y)
    assert [w.name for w in model.trainable_weights] == [
        w.name for w in reference_model.trainable_weights
    ]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_effective_kernel():
    layer, _ = pair(keras_rnn_lora.LoRAGRU)
    cell = layer.cell
    a, b = (to_numpy(w) for w in cell.lora_weights)
    expected = to_numpy(cell.recurrent_kernel) + cell.scaling * a @ b
    np.testing.assert_allclose(
        to_numpy(cell.effective_kernel("recurrent")), expected, atol=1e-6
    )
    np.testing.assert_array_equal(
        to_numpy(cell.effective_kernel("kernel")), to_numpy(cell.kernel)
    )
    layer.merge_lora()
    assert layer.lora_merged
    np.testing.assert_allclose(
        to_numpy(cell.effective_kernel("recurrent")), expected, atol=1e-6
    )


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_config_save_load_and_merge(cls, tmp_path):
    layer, _ = pair(cls, lora_alpha=4.0, go_backwards=True)
    config = layer.get_config()
    assert config["rank"] == 2 and config["lora_alpha"] == 4.0
    assert config["go_backwards"] and config["units"] == UNITS
    clone = cls.from_config(config)
    assert clone.get_config() == config
    model = keras.Sequential([keras.Input((5, 4)), layer])
    x = x_batch(3)
    expected = to_numpy(model(x))
    layer.merge_lora()
    np.testing.assert_allclose(to_numpy(model(x)), expected, atol=1e-5)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.layers[0]) is cls and loaded.layers[0].lora_merged
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))
    loaded.layers[0].unmerge_lora()
    np.testing.assert_allclose(to_numpy(loaded(x)), expected, atol=1e-5)


def test_fit_freezes_kernel_and_moves_factors():
    layer = keras_rnn_lora.LoRALSTM(UNITS, rank=2)
    model = keras.Sequential(
        [keras.Input((5, 4)), layer, keras.layers.Dense(1)]
    )
    kernel = to_numpy(layer.cell.recurrent_kernel)
    factors = [to_numpy(w) for w in layer.lora_weights]
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x_batch(4), np.ones((3, 1)), epochs=3, verbose=0)
    np.testing.assert_array_equal(to_numpy(layer.cell.recurrent_kernel), kernel)
    for before, w in zip(factors, layer.lora_weights, strict=True):
        assert not np.array_equal(to_numpy(w), before)


def test_enable_lora_keeps_layer_types_and_to_base_model_undoes_it():
    inputs = keras.Input((5, 4))
    h = keras.layers.GRU(UNITS, return_sequences=True, name="gru")(inputs)
    h = keras.layers.Bidirectional(keras.layers.LSTM(3), name="bi")(h)
    base = keras.Model(inputs, keras.layers.Dense(2, name="head")(h))
    lora_model = keras_rnn_lora.enable_lora(base, rank=2)
    assert type(lora_model.get_layer("gru")) is keras_rnn_lora.LoRAGRU
    assert type(lora_model.get_layer("bi").forward_layer) is (
        keras_rnn_lora.LoRALSTM
    )
    assert sorted(lora_cells(lora_model)) == [
        "bi/backward/cell",
        "bi/forward/cell",
        "gru/cell",
    ]
    x = x_batch(5)
    np.testing.assert_allclose(
        to_numpy(lora_model(x)), to_numpy(base(x)), atol=1e-5
    )
    for cell in lora_cells(lora_model).values():
        randomize_lora(cell)
    stock = keras_rnn_lora.to_base_model(lora_model)
    assert type(stock.get_layer("gru")) is keras.layers.GRU
    np.testing.assert_allclose(
        to_numpy(stock(x)), to_numpy(lora_model(x)), atol=1e-5
    )


def test_bad_arguments_use_keras_and_lora_messages():
    with pytest.raises(ValueError, match="`rank`"):
        keras_rnn_lora.LoRAGRU(4, rank=9)
    with pytest.raises(ValueError, match="use_cudnn"):
        keras_rnn_lora.LoRAGRU(4, rank=1, use_cudnn="sometimes")
