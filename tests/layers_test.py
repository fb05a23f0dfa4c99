"""Tests for the whole-sequence LoRA layers (LoRASimpleRNN, LoRAGRU,
LoRALSTM)."""

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import gradients
from conftest import randomize_lora
from conftest import to_numpy
from fused_reference import patch_fused_kernels

import keras_rnn_lora
from keras_rnn_lora.walk import lora_cells

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
        go_backwards=layer.go_backwards,
    )
    reference(x_batch())
    reference.cell.set_weights(layer.cell.get_weights())
    return layer, reference


def stock_merged(layer):
    stock = layer.stock_class(UNITS, return_sequences=True)
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


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_forward_and_gradients_equal_the_cell_path(cls):
    layer, reference = pair(cls)
    assert_same_function(layer, reference)


def assert_same_function(layer, reference, atol=1e-5, input_shape=(5, 4)):
    """Forward values and gradients of every trainable weight (the LoRA
    factors) of `layer` equal those of `reference`."""
    x = x_batch(2)
    out = to_numpy(layer(x))
    np.testing.assert_allclose(out, to_numpy(reference(x)), atol=atol)
    model = keras.Sequential([keras.Input(input_shape), layer])
    reference_model = keras.Sequential([keras.Input(input_shape), reference])
    y = np.ones(out.shape, "float32")
    got = gradients(model, x, y)
    expected = gradients(reference_model, x, y)
    assert [w.name for w in model.trainable_weights] == [
        w.name for w in reference_model.trainable_weights
    ]
    for g, e in zip(got, expected, strict=True):
        assert np.abs(e).max() > 0
        np.testing.assert_allclose(g, e, atol=atol)


# -- the GPU path, with an emulated fused kernel ------------------------------

FUSED_LAYERS = [keras_rnn_lora.LoRAGRU, keras_rnn_lora.LoRALSTM]
FUSED_IDS = ["LoRAGRU", "LoRALSTM"]


def drop_the_delta(monkeypatch):
    """A broken LoRA layer: the fused path sees `W` alone."""
    for cell_cls in (keras_rnn_lora.LoRAGRUCell, keras_rnn_lora.LoRALSTMCell):
        monkeypatch.setattr(
            cell_cls,
            "effective_kernel",
            lambda self, target: getattr(
                self,
                {"kernel": "kernel", "recurrent": "recurrent_kernel"}[target],
            ),
        )


def max_difference(layer, reference):
    x = x_batch(2)
    return np.abs(to_numpy(layer(x)) - to_numpy(reference(x))).max()


@pytest.mark.parametrize("kwargs", [{}, {"go_backwards": True}])
@pytest.mark.parametrize("cls", FUSED_LAYERS, ids=FUSED_IDS)
def test_emulated_fused_path_equals_the_cell_path(cls, kwargs, monkeypatch):
    """The fused kernel computes from the kernels it is handed: the layer
    must hand it `W + s*A@B`, and A and B must get their gradients."""
    calls = patch_fused_kernels(monkeypatch)
    layer, reference = pair(cls, lora_targets=("kernel", "recurrent"), **kwargs)
    assert_same_function(layer, reference)
    assert calls[cls.stock_class.__name__.lower()] > 0


@pytest.mark.parametrize("cls", FUSED_LAYERS, ids=FUSED_IDS)
def test_emulated_fused_test_fails_when_the_delta_is_dropped(cls, monkeypatch):
    patch_fused_kernels(monkeypatch)
    layer, reference = pair(cls)
    assert max_difference(layer, reference) < 1e-5
    drop_the_delta(monkeypatch)
    assert max_difference(layer, reference) > 1e-3


def test_reference_kernels_reproduce_keras_own_loop(monkeypatch):
    """The emulation is faithful: stock layers give the same outputs with
    the reference kernels as with Keras' step loop."""
    x = x_batch(3)
    mask = np.ones((3, 5), bool)
    mask[0, 3:] = False
    layers = [
        keras.layers.GRU(UNITS, return_sequences=True, return_state=True),
        keras.layers.GRU(UNITS, return_sequences=True, reset_after=False),
        keras.layers.GRU(UNITS, go_backwards=True, return_sequences=True),
        keras.layers.LSTM(UNITS, return_sequences=True, return_state=True),
        keras.layers.LSTM(UNITS, go_backwards=True),
        keras.layers.Bidirectional(
            keras.layers.LSTM(UNITS, return_sequences=True)
        ),
        keras.layers.Bidirectional(keras.layers.GRU(UNITS)),
    ]
    for layer in layers:
        for m in (None, mask):
            if m is not None and isinstance(layer, keras.layers.Bidirectional):
                continue
            expected = [
                to_numpy(t) for t in keras.tree.flatten(layer(x, mask=m))
            ]
            with monkeypatch.context() as patch:
                calls = patch_fused_kernels(patch)
                got = [
                    to_numpy(t) for t in keras.tree.flatten(layer(x, mask=m))
                ]
            assert sum(calls.values()) == 1
            for g, e in zip(got, expected, strict=True):
                np.testing.assert_allclose(g, e, atol=1e-5)


def bidirectional_pair(cls, **kwargs):
    layer = keras.layers.Bidirectional(
        cls(UNITS, rank=2, return_sequences=True, **kwargs)
    )
    reference = keras.layers.Bidirectional(
        keras.layers.RNN(cls.cell_class(UNITS, rank=2), return_sequences=True)
    )
    layer(x_batch())
    reference(x_batch())
    for half in (layer.forward_layer, layer.backward_layer):
        randomize_lora(half, seed=int(half.go_backwards))
    reference.set_weights(layer.get_weights())
    return layer, reference


@pytest.mark.parametrize("cls", FUSED_LAYERS, ids=FUSED_IDS)
def test_bidirectional_fused_path_sees_the_adapter(cls, monkeypatch):
    """Keras' Bidirectional hands `cell.recurrent_kernel` to its fused
    bidirectional kernel: a LoRA layer must take the two-layer path, each
    direction on the layer's own fused path, merged or not (a function
    traced while merged must stay right after an unmerge)."""
    calls = patch_fused_kernels(monkeypatch)
    layer, reference = bidirectional_pair(cls)
    name = cls.stock_class.__name__.lower()
    calls.clear()
    assert_same_function(layer, reference)
    assert calls[f"bidirectional_{name}"] == 0 and calls[name] > 0
    expected = to_numpy(reference(x_batch(2)))
    for half in (layer.forward_layer, layer.backward_layer):
        half.merge_lora()
    calls.clear()
    np.testing.assert_allclose(to_numpy(layer(x_batch(2))), expected, atol=1e-5)
    assert calls[f"bidirectional_{name}"] == 0 and calls[name] > 0
    drop_the_delta(monkeypatch)
    for half in (layer.forward_layer, layer.backward_layer):
        half.unmerge_lora()
    assert max_difference(layer, reference) > 1e-3


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


def test_implementation_1_is_kept_and_draws_one_mask_per_gate():
    kwargs = {"dropout": 0.4, "seed": 3, "implementation": 1}
    layer = keras_rnn_lora.LoRALSTM(3, rank=1, **kwargs)
    assert layer.cell.implementation == 1
    assert layer.cell.dropout_mask_count == 4
    clone = keras_rnn_lora.LoRALSTM.from_config(layer.get_config())
    assert clone.cell.implementation == 1
    # Keras' own LSTM layer fails with implementation=1 and dropout in
    # training (its cuDNN attempt broadcasts four masks): compare with its
    # cell in keras.layers.RNN, the path the layer runs on a CPU.
    stock = keras.layers.RNN(keras.layers.LSTMCell(3, **kwargs))
    x = x_batch(4)
    layer(x), stock(x)
    stock.set_weights(layer.get_weights()[:3])  # B = 0: the same function
    np.testing.assert_allclose(
        to_numpy(layer(x, training=True)),
        to_numpy(stock(x, training=True)),
        atol=1e-6,
    )
    one_mask = keras.layers.RNN(keras.layers.LSTMCell(3, dropout=0.4, seed=3))
    one_mask(x)
    one_mask.set_weights(stock.get_weights())
    difference = to_numpy(one_mask(x, training=True)) - to_numpy(
        stock(x, training=True)
    )
    assert np.abs(difference).max() > 1e-4  # one mask per gate differs


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_sequence_output_is_contiguous_on_torch(cls, merged):
    # Keras' torch loop returns a transposed view; a Dense after a strided
    # sequence runs a broadcast batched matmul (1.7x a step, profiled). The
    # layers hand back contiguous memory; the values stay those of the loop.
    layer, reference = pair(cls)
    if merged:
        layer.merge_lora()
    x = x_batch(1)
    outputs = layer(x)
    np.testing.assert_allclose(
        to_numpy(outputs), to_numpy(reference(x)), atol=1e-5
    )
    if keras.backend.backend() == "torch":
        assert outputs.is_contiguous()


# Where Keras' stock layer projects the unmasked input sequence in one
# matmul before stepping (Keras 3.15's backend `gru`/`lstm` fallbacks).
STOCK_PRECOMPUTES_ON = {
    keras_rnn_lora.LoRASimpleRNN: (),
    keras_rnn_lora.LoRAGRU: ("jax", "torch"),
    keras_rnn_lora.LoRALSTM: ("torch",),
}


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_projects_the_whole_sequence_where_the_stock_layer_does(
    cls, masked, monkeypatch
):
    # The LoRA layer and its stock layer do equal work on every backend;
    # the one-matmul projection gives the step-by-step cell path's values.
    layer, reference = pair(cls, lora_targets=("kernel", "recurrent"))
    cell_cls = type(layer.cell)
    ranks = []
    project = cell_cls.input_projection

    def spy(self, inputs, training=False):
        ranks.append(len(inputs.shape))
        return project(self, inputs, training)

    monkeypatch.setattr(cell_cls, "input_projection", spy)
    x = x_batch(1)
    mask = (
        np.array([[1] * 5, [1, 1, 1, 0, 0], [1] * 5], bool) if masked else None
    )
    np.testing.assert_allclose(
        to_numpy(layer(x, mask=mask)),
        to_numpy(reference(x, mask=mask)),
        atol=1e-5,
    )
    fused = keras.backend.backend() == "torch" and cls is not (
        keras_rnn_lora.LoRASimpleRNN
    )
    if fused and not masked:
        # Keras' own torch loop (fed W + s*A@B) runs instead: see
        # test_torch_cpu_takes_keras_loop_where_it_is_cheaper.
        assert 3 not in ranks
        return
    whole_sequence = (
        keras.backend.backend() in STOCK_PRECOMPUTES_ON[cls] and not masked
    )
    assert (3 in ranks) == whole_sequence


@pytest.mark.skipif(BACKEND != "torch", reason="a torch CPU dispatch rule")
@pytest.mark.parametrize(
    "units,training,lora_dropout,fused",
    [
        (16, True, 0.0, True),
        (256, True, 0.0, True),
        (384, True, 0.0, False),  # the factored loop is cheaper in training
        (384, False, 0.0, True),  # inference: Keras' loop at every width
        (16, True, 0.2, False),  # the fused kernels cannot apply LoRA dropout
    ],
)
@pytest.mark.parametrize("cls", FUSED_LAYERS, ids=FUSED_IDS)
def test_torch_cpu_takes_keras_loop_where_it_is_cheaper(
    cls, units, training, lora_dropout, fused, monkeypatch
):
    """`benchmarks/torch_small_layers.py`: on torch's CPU, Keras' own loop
    fed `W + s*A@B` is faster than the factored loop up to 256 units in
    training and at every width in inference; both compute the same."""
    from keras_rnn_lora import keras_internals

    layer = cls(units, rank=2, lora_dropout=lora_dropout)
    reference = keras.layers.RNN(cls.cell_class(units, rank=2))
    x = x_batch(1)
    layer(x)
    reference(x)
    randomize_lora(layer)
    reference.set_weights(layer.get_weights())
    module = keras_internals.fused_kernel_module()
    name = cls.stock_class.__name__.lower()
    calls = []
    kernel = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    out = layer(x, training=training)
    assert bool(calls) == fused
    if not lora_dropout:
        np.testing.assert_allclose(
            to_numpy(out), to_numpy(reference(x)), atol=1e-5
        )


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_mixed_precision_matches_the_cell_path(cls):
    # The layers step the cell without `Layer.__call__`: under a mixed
    # policy the step still computes in bfloat16 from float32 variables.
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer, reference = pair(cls, lora_targets=("kernel", "recurrent"))
    x = x_batch(1)
    outputs, expected = layer(x), reference(x)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    np.testing.assert_allclose(
        to_numpy(keras.ops.cast(outputs, "float32")),
        to_numpy(keras.ops.cast(expected, "float32")),
        atol=2e-2,
    )
    assert all(w.dtype == "float32" for w in layer.cell.lora_weights)
