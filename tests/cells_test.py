"""Tests for the LoRA cells, run once per Keras backend."""

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import gradients
from conftest import randomize_lora
from conftest import stock_twin
from conftest import to_numpy

import keras_rnn_lora
from keras_rnn_lora import LoRAGRUCell
from keras_rnn_lora import LoRALSTMCell
from keras_rnn_lora import LoRASimpleRNNCell
from keras_rnn_lora import cell_base

CELLS = [LoRASimpleRNNCell, LoRAGRUCell, LoRALSTMCell]
TARGETS = [("recurrent",), ("kernel",), ("kernel", "recurrent")]
UNITS, FEATURES, STEPS, BATCH = 6, 4, 5, 3

# Every cell configuration the equivalence tests cover: GRU twice, for both
# `reset_after` conventions.
CELL_CONFIGS = [
    (LoRASimpleRNNCell, {}),
    (LoRAGRUCell, {"reset_after": True}),
    (LoRAGRUCell, {"reset_after": False}),
    (LoRALSTMCell, {}),
]
CONFIG_IDS = ["simple_rnn", "gru", "gru_reset_before", "lstm"]


def sequences(seed=0, batch=BATCH, steps=STEPS, features=FEATURES):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, steps, features)).astype("float32")


def make_cell(cls, rank=2, **kwargs):
    kwargs.setdefault("bias_initializer", "random_uniform")
    return cls(UNITS, rank=rank, **kwargs)


def built_rnn(cell, **rnn_kwargs):
    rnn = keras.layers.RNN(cell, **rnn_kwargs)
    rnn(sequences())
    return rnn


def outputs(layer, x, **kwargs):
    return [to_numpy(t) for t in keras.tree.flatten(layer(x, **kwargs))]


def assert_all_close(actual, expected, atol=1e-5):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, atol=atol, rtol=0)


# -- equivalence with the stock cell ------------------------------------------


@pytest.mark.parametrize("targets", TARGETS, ids="+".join)
@pytest.mark.parametrize("cls,kwargs", CELL_CONFIGS, ids=CONFIG_IDS)
def test_matches_stock_cell_with_merged_kernel(cls, kwargs, targets):
    cell = make_cell(cls, lora_targets=targets, lora_alpha=3.0, **kwargs)
    rnn = built_rnn(cell, return_sequences=True, return_state=True)
    randomize_lora(cell)
    twin = keras.layers.RNN(
        stock_twin(cell), return_sequences=True, return_state=True
    )
    x = sequences(1)
    assert_all_close(outputs(rnn, x), outputs(twin, x))


@pytest.mark.parametrize("cls,kwargs", CELL_CONFIGS, ids=CONFIG_IDS)
def test_step_is_input_projection_then_recurrent_step(cls, kwargs):
    # `input_projection` of a whole sequence is the per-step projections
    # stacked; `recurrent_step` over it gives `call`'s output and state.
    cell = make_cell(cls, lora_targets=("kernel", "recurrent"), **kwargs)
    built_rnn(cell)
    randomize_lora(cell)
    x = keras.ops.convert_to_tensor(sequences(1))
    whole = cell.input_projection(x)
    assert tuple(whole.shape) == (BATCH, STEPS, cell.gates * UNITS)
    for t in range(STEPS):
        np.testing.assert_allclose(
            to_numpy(whole[:, t]),
            to_numpy(cell.input_projection(x[:, t])),
            atol=1e-5,
        )
    state = keras.ops.full((BATCH, UNITS), 0.3)
    states = [state] * len(keras.tree.flatten(cell.state_size))
    assert_all_close(
        [to_numpy(t) for t in keras.tree.flatten(cell(x[:, 0], states))],
        [
            to_numpy(t)
            for t in keras.tree.flatten(
                cell.recurrent_step(whole[:, 0], states)
            )
        ],
    )


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_rule(use_rslora):
    cell = make_cell(LoRAGRUCell, rank=4, lora_alpha=2.0, use_rslora=use_rslora)
    expected = 2.0 / (np.sqrt(4) if use_rslora else 4)
    assert cell.scaling == pytest.approx(expected)
    rnn = built_rnn(cell, return_sequences=True)
    randomize_lora(cell)
    twin = keras.layers.RNN(stock_twin(cell), return_sequences=True)
    assert_all_close(outputs(rnn, sequences(2)), outputs(twin, sequences(2)))


def test_lora_alpha_defaults_to_rank():
    cell = make_cell(LoRAGRUCell, rank=3)
    assert cell.lora_alpha == 3.0 and cell.scaling == 1.0


@pytest.mark.parametrize("cls,kwargs", CELL_CONFIGS, ids=CONFIG_IDS)
def test_fresh_adapter_equals_stock_cell(cls, kwargs):
    stock = cls.stock_class(UNITS, bias_initializer="random_uniform", **kwargs)
    stock_rnn = built_rnn(stock, return_sequences=True)
    lora_cell = cls.from_cell(stock, rank=2)
    lora_rnn = keras.layers.RNN(lora_cell, return_sequences=True)
    x = sequences(3)
    np.testing.assert_array_equal(
        to_numpy(lora_cell.lora_weights[1]), np.zeros((2, cls.gates * UNITS))
    )
    assert_all_close(outputs(lora_rnn, x), outputs(stock_rnn, x), atol=1e-6)


@pytest.mark.parametrize("cls,kwargs", CELL_CONFIGS, ids=CONFIG_IDS)
def test_dropout_matches_stock_cell_in_training(cls, kwargs):
    """With the same seed both cells draw the same input and recurrent
    dropout masks, so even per-gate masks (`implementation=1`) must agree."""
    dropout = {"dropout": 0.3, "recurrent_dropout": 0.3, "seed": 7}
    cell = make_cell(cls, **kwargs, **dropout)
    rnn = built_rnn(cell, return_sequences=True)
    randomize_lora(cell)
    twin = keras.layers.RNN(stock_twin(cell), return_sequences=True)
    x = sequences(4)
    # Building the LoRA layer drew one set of masks: draw one on the twin.
    twin(x)
    lora_out = outputs(rnn, x, training=True)
    stock_out = outputs(twin, x, training=True)
    assert_all_close(lora_out, stock_out)


# -- inside the Keras RNN machinery -------------------------------------------


WRAPPINGS = {
    "return_state": lambda cell: keras.layers.RNN(
        cell, return_sequences=True, return_state=True
    ),
    "go_backwards": lambda cell: keras.layers.RNN(
        cell, return_sequences=True, go_backwards=True
    ),
    "bidirectional": lambda cell: keras.layers.Bidirectional(
        keras.layers.RNN(cell, return_sequences=True)
    ),
}


@pytest.mark.parametrize("wrapping", sorted(WRAPPINGS))
@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_rnn_wrappings_match_stock(cls, wrapping):
    cell = make_cell(cls, lora_targets=("kernel", "recurrent"))
    layer = WRAPPINGS[wrapping](cell)
    x = sequences(5)
    layer(x)
    cells = (
        [layer.forward_layer.cell, layer.backward_layer.cell]
        if wrapping == "bidirectional"
        else [cell]
    )
    for i, c in enumerate(cells):
        randomize_lora(c, seed=i)
    twins = [stock_twin(c) for c in cells]
    twin_layer = WRAPPINGS[wrapping](twins[0])
    twin_layer(x)
    if wrapping == "bidirectional":
        # Bidirectional builds its halves from the config, not the instance.
        for half, twin in zip(
            (twin_layer.forward_layer, twin_layer.backward_layer),
            twins,
            strict=True,
        ):
            half.cell.set_weights(twin.get_weights())
    assert_all_close(outputs(layer, x), outputs(twin_layer, x))


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_masking_matches_stock(cls):
    x = sequences(6)
    x[0, 3:] = 0.0
    x[2, 1:] = 0.0
    lora_model = keras.Sequential(
        [
            keras.Input((STEPS, FEATURES)),
            keras.layers.Masking(0.0),
            keras.layers.RNN(make_cell(cls), return_sequences=True),
        ]
    )
    cell = lora_model.layers[-1].cell
    randomize_lora(cell)
    stock_model = keras.Sequential(
        [
            keras.Input((STEPS, FEATURES)),
            keras.layers.Masking(0.0),
            keras.layers.RNN(stock_twin(cell), return_sequences=True),
        ]
    )
    assert_all_close(outputs(lora_model, x), outputs(stock_model, x))


def test_stacked_cells_match_stock():
    cells = [make_cell(LoRAGRUCell), make_cell(LoRALSTMCell, rank=3)]
    layer = keras.layers.RNN(
        keras.layers.StackedRNNCells(cells), return_sequences=True
    )
    layer(sequences())
    for i, c in enumerate(cells):
        randomize_lora(c, seed=i)
    twin = keras.layers.RNN(
        keras.layers.StackedRNNCells([stock_twin(c) for c in cells]),
        return_sequences=True,
    )
    x = sequences(7)
    assert_all_close(outputs(layer, x), outputs(twin, x))


def test_stateful_carries_state_between_calls():
    x = sequences(8, batch=2)
    cell = make_cell(LoRAGRUCell)
    layer = keras.layers.RNN(cell, stateful=True, return_sequences=True)
    layer(x)
    layer.reset_state()
    randomize_lora(cell)
    twin = keras.layers.RNN(
        stock_twin(cell), stateful=True, return_sequences=True
    )
    twin(x)
    twin.reset_state()
    first = outputs(layer, x[:, :2]) + outputs(layer, x[:, 2:])
    expected = outputs(twin, x[:, :2]) + outputs(twin, x[:, 2:])
    assert_all_close(first, expected)
    layer.reset_state()
    assert_all_close(outputs(layer, x[:, :2]), expected[:1])


# -- training and freezing ----------------------------------------------------


def small_model(cell):
    return keras.Sequential(
        [
            keras.Input((STEPS, FEATURES)),
            keras.layers.RNN(cell),
            keras.layers.Dense(2),
        ]
    )


@pytest.mark.parametrize("targets", TARGETS, ids="+".join)
@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_fit_updates_only_factors_and_unfrozen(cls, targets):
    cell = make_cell(cls, lora_targets=targets)
    model = small_model(cell)
    frozen = {
        name: to_numpy(getattr(cell, name))
        for name in ("kernel", "recurrent_kernel")
        if {"kernel": "kernel", "recurrent_kernel": "recurrent"}[name]
        in targets
    }
    factors = [to_numpy(w) for w in cell.lora_weights]
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    # Two epochs: with B = 0 the first step moves only B.
    x, y = sequences(9, batch=16), np.ones((16, 2), "float32")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    for name, before in frozen.items():
        np.testing.assert_array_equal(to_numpy(getattr(cell, name)), before)
    for before, weight in zip(factors, cell.lora_weights, strict=True):
        assert not np.array_equal(to_numpy(weight), before), weight.path


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_weight_counts(cls):
    cell = make_cell(cls, rank=2, lora_targets=("kernel", "recurrent"))
    built_rnn(cell)
    gates = cls.gates
    names = [w.name for w in cell.trainable_weights]
    assert "kernel" not in names and "recurrent_kernel" not in names
    assert sorted(w.name for w in cell.non_trainable_weights) == [
        "kernel",
        "recurrent_kernel",
    ]
    lora_shapes = {w.name: tuple(w.shape) for w in cell.lora_weights}
    assert lora_shapes == {
        "lora_kernel_a": (FEATURES, 2),
        "lora_kernel_b": (2, gates * UNITS),
        "lora_recurrent_kernel_a": (UNITS, 2),
        "lora_recurrent_kernel_b": (2, gates * UNITS),
    }
    bias_size = int(np.prod(cell.bias.shape))
    expected = 2 * (FEATURES + UNITS) + 2 * 2 * gates * UNITS + bias_size
    assert sum(int(np.prod(w.shape)) for w in cell.trainable_weights) == (
        expected
    )


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_gradients_reach_factors_and_equal_chain_rule(cls):
    """dL/dA = s * G @ B.T and dL/dB = s * A.T @ G, with G the gradient of
    the stock cell's merged recurrent kernel."""
    cell = make_cell(cls)
    model = small_model(cell)
    randomize_lora(cell)
    x, y = sequences(10), np.ones((BATCH, 2), "float32")
    grads = dict(
        zip(
            [w.name for w in model.trainable_weights],
            gradients(model, x, y),
            strict=True,
        )
    )
    assert "recurrent_kernel" not in grads
    if BACKEND == "torch":
        assert not cell.recurrent_kernel.value.requires_grad
    twin = small_model(stock_twin(cell))
    twin.layers[-1].set_weights(model.layers[-1].get_weights())
    twin_grads = dict(
        zip(
            [w.name for w in twin.trainable_weights],
            gradients(twin, x, y),
            strict=True,
        )
    )
    g = twin_grads["recurrent_kernel"].astype("float64")
    a, b = (to_numpy(w).astype("float64") for w in cell.lora_weights)
    s = cell.scaling
    grad_a = grads["lora_recurrent_kernel_a"]
    grad_b = grads["lora_recurrent_kernel_b"]
    assert np.abs(grad_a).max() > 0 and np.abs(grad_b).max() > 0
    np.testing.assert_allclose(grad_a, s * g @ b.T, atol=1e-5)
    np.testing.assert_allclose(grad_b, s * a.T @ g, atol=1e-5)


@pytest.mark.skipif(
    BACKEND == "torch",
    reason="jit_compile on torch is torch.compile: minutes of C++ compile "
    "per graph on a CPU, so the suite runs torch eagerly",
)
def test_fit_with_jit_compile():
    cell = make_cell(LoRAGRUCell, lora_targets=("kernel", "recurrent"))
    model = small_model(cell)
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    x, y = sequences(11, batch=16), np.ones((16, 2), "float32")
    before = to_numpy(cell.recurrent_kernel)
    history = model.fit(x, y, epochs=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    np.testing.assert_array_equal(to_numpy(cell.recurrent_kernel), before)


def test_lora_dropout_only_in_training():
    cell = make_cell(LoRAGRUCell, lora_dropout=0.5, seed=3)
    rnn = built_rnn(cell, return_sequences=True)
    randomize_lora(cell)
    twin = keras.layers.RNN(stock_twin(cell), return_sequences=True)
    x = sequences(12)
    assert_all_close(outputs(rnn, x), outputs(twin, x))
    trained = outputs(rnn, x, training=True)[0]
    assert np.abs(trained - outputs(twin, x)[0]).max() > 1e-3
    # A new mask per call (per sequence), the same mask across steps.
    assert np.abs(trained - outputs(rnn, x, training=True)[0]).max() > 1e-6
    model = small_model(make_cell(LoRALSTMCell, lora_dropout=0.2))
    model.compile(optimizer="adam", loss="mse")
    model.fit(sequences(13), np.ones((BATCH, 2)), epochs=2, verbose=0)


# -- serialization ------------------------------------------------------------


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_get_config_round_trip(cls):
    cell = cls(
        5,
        rank=3,
        lora_alpha=6.0,
        use_rslora=True,
        lora_dropout=0.1,
        lora_targets=("recurrent", "kernel"),
        lora_a_initializer="glorot_uniform",
        lora_b_initializer="ones",
        dropout=0.2,
        activation="relu",
    )
    config = cell.get_config()
    assert config["lora_targets"] == ["kernel", "recurrent"]
    clone = cls.from_config(config)
    assert clone.get_config() == config
    assert clone.units == 5 and clone.rank == 3 and clone.use_rslora
    assert clone.scaling == pytest.approx(6.0 / np.sqrt(3))
    serialized = keras.saving.serialize_keras_object(cell)
    assert serialized["module"] == "keras_rnn_lora.cells"
    assert isinstance(keras.saving.deserialize_keras_object(serialized), cls)


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_from_cell_carries_config_and_copies_weights(cls):
    stock_cls = cls.stock_class
    stock = stock_cls(UNITS, activation="relu", name="encoder_cell")
    stock_rnn = built_rnn(stock)
    lora_cell = cls.from_cell(stock, rank=2, lora_alpha=4.0)
    assert lora_cell.name == "encoder_cell"
    assert lora_cell.get_config()["activation"] == "relu"
    assert lora_cell.lora_alpha == 4.0
    x = sequences(16)
    lora_rnn = keras.layers.RNN(lora_cell)
    assert_all_close(outputs(lora_rnn, x), outputs(stock_rnn, x), atol=1e-6)
    # The copy is independent: moving the LoRA cell leaves the stock one.
    stock_kernel = to_numpy(stock.kernel)
    lora_cell.kernel.assign(np.zeros(stock.kernel.shape, "float32"))
    np.testing.assert_array_equal(to_numpy(stock.kernel), stock_kernel)
    unbuilt = cls.from_cell(stock_cls(UNITS), rank=1)
    assert not unbuilt.built and unbuilt.rank == 1


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_stock_cell_arguments_rebuild_the_stock_cell(cls):
    """Read from attributes (no serializer), they must say everything the
    cell's own config says, for every argument a stock cell takes."""
    stock_cls = cls.stock_class
    stock = stock_cls(
        UNITS,
        activation="relu",
        kernel_initializer=keras.initializers.Orthogonal(gain=2.0, seed=1),
        kernel_regularizer="l2",
        recurrent_constraint="non_neg",
        use_bias=False,
        dropout=0.25,
        recurrent_dropout=0.5,
        seed=7,
        dtype="mixed_bfloat16",
        trainable=False,
        name="encoder_cell",
    )
    arguments = cell_base.stock_cell_arguments(stock)
    assert stock_cls(**arguments).get_config() == stock.get_config()
    lora_config = cls(rank=2, **arguments).get_config()
    assert {k: lora_config[k] for k in stock.get_config()} == (
        stock.get_config()
    )

    class Subclass(stock_cls):  # an argument not kept as an attribute
        def __init__(self, units, extra=1, **kwargs):
            super().__init__(units, **kwargs)

    subclassed = Subclass(UNITS, extra=3, dropout=0.5)
    arguments = cell_base.stock_cell_arguments(subclassed)
    assert Subclass(**arguments).get_config() == subclassed.get_config()


def test_from_cell_rejects_wrong_cells():
    with pytest.raises(ValueError, match="`cell`, expected a keras.layers.GRU"):
        LoRAGRUCell.from_cell(keras.layers.LSTMCell(4), rank=1)
    with pytest.raises(ValueError, match="already a LoRAGRUCell"):
        LoRAGRUCell.from_cell(LoRAGRUCell(4, rank=1), rank=1)


# -- mixed precision ----------------------------------------------------------


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_mixed_precision_forward_and_fit(cls):
    policy = "mixed_bfloat16"
    keras.config.set_dtype_policy(policy)
    cell = cls(UNITS, rank=2, lora_targets=("kernel", "recurrent"))
    model = small_model(cell)
    assert all(w.dtype == "float32" for w in cell.lora_weights)
    assert keras.backend.standardize_dtype(model(sequences(18)).dtype) == (
        "bfloat16"
    )
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(
        sequences(19, batch=8), np.ones((8, 2)), epochs=2, verbose=0
    )
    assert np.isfinite(history.history["loss"]).all()
    assert all(w.dtype == "float32" for w in cell.lora_weights)


def test_factors_stay_float32_under_bfloat16_policy():
    # Not the default orthogonal initializer: JAX has no bfloat16 QR.
    cell = LoRAGRUCell(
        UNITS, rank=2, dtype="bfloat16", recurrent_initializer="glorot_uniform"
    )
    out = keras.layers.RNN(cell, dtype="bfloat16")(sequences())
    assert cell.kernel.dtype == "bfloat16"
    assert all(w.dtype == "float32" for w in cell.lora_weights)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"


# -- argument checks ----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "`rank`.*positive integer no larger than `units`"),
        ({"rank": 7}, "`rank`.*Received: rank=7"),
        ({"rank": 2.0}, "`rank`.*Received: rank=2.0"),
        ({"rank": True}, "`rank`.*Received: rank=True"),
        ({"rank": 2, "lora_alpha": -1.0}, "`lora_alpha`.*> 0"),
        ({"rank": 2, "lora_alpha": 0}, "`lora_alpha`.*lora_alpha=0"),
        ({"rank": 2, "lora_dropout": 1.0}, "`lora_dropout`.*\\[0, 1\\)"),
        ({"rank": 2, "lora_dropout": -0.1}, "`lora_dropout`"),
        ({"rank": 2, "lora_targets": ("input",)}, "`lora_targets`"),
        ({"rank": 2, "lora_targets": ()}, "`lora_targets`.*non-empty"),
        ({"rank": 2, "use_rslora": "yes"}, "`use_rslora`.*a bool"),
    ],
)
@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_bad_arguments_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(UNITS, **kwargs)


def test_single_target_string_is_accepted():
    cell = LoRAGRUCell(UNITS, rank=1, lora_targets="kernel")
    assert cell.lora_targets == ("kernel",)


# -- regularizers on frozen kernels -------------------------------------------


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_kernel_regularizers_apply_to_the_effective_kernel(cls):
    """Keras only collects losses of trainable weights: the frozen kernels'
    regularizers act on W + s*A@B, so they equal the stock loss while B = 0
    and their gradient reaches the factors."""
    regularizers = {
        "kernel_regularizer": keras.regularizers.L2(0.1),
        "recurrent_regularizer": keras.regularizers.L1(0.05),
    }
    cell = make_cell(cls, lora_targets=("kernel", "recurrent"), **regularizers)
    model = small_model(cell)

    def stock_loss():
        twin = stock_twin(cell)
        return float(
            to_numpy(regularizers["kernel_regularizer"](twin.kernel))
            + to_numpy(
                regularizers["recurrent_regularizer"](twin.recurrent_kernel)
            )
        )

    fresh = sum(float(to_numpy(loss)) for loss in model.losses)
    assert fresh == pytest.approx(stock_loss(), rel=1e-5) and fresh > 0
    randomize_lora(cell)
    randomized = sum(float(to_numpy(loss)) for loss in model.losses)
    assert randomized == pytest.approx(stock_loss(), rel=1e-5)
    assert randomized != pytest.approx(fresh, rel=1e-3)
    # Only the regularization loss: its gradient moves A and B.
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=lambda y, p: 0.0 * p
    )
    before = [to_numpy(w) for w in cell.lora_weights]
    model.fit(sequences(21), np.zeros((BATCH, 2)), epochs=1, verbose=0)
    for b, w in zip(before, cell.lora_weights, strict=True):
        assert not np.array_equal(to_numpy(w), b), w.name
    # Merged, the factors are frozen like the kernel: no loss from either.
    cell.merge_lora()
    assert model.losses == [] or all(
        float(to_numpy(loss)) == 0 for loss in model.losses
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: LoRAGRUCell(UNITS, r=2),
        lambda: keras_rnn_lora.LoRAGRU(UNITS, r=2),
        lambda: keras_rnn_lora.LoRADense(UNITS, r=2),
    ],
    ids=["cell", "layer", "dense"],
)
def test_an_unknown_argument_is_named_with_the_class(make):
    with pytest.raises(ValueError, match="passed to LoRA\\w+: \\{'r': 2\\}"):
        make()


@pytest.mark.parametrize(
    "cls",
    [*CELLS, keras_rnn_lora.LoRAGRU, keras_rnn_lora.LoRADense],
    ids=lambda c: c.__name__,
)
def test_a_missing_rank_says_to_pass_it(cls):
    with pytest.raises(TypeError, match=f"{cls.__name__} needs the LoRA rank"):
        cls(UNITS)
