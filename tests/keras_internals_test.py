"""The Keras internals this project relies on are where it expects them
(keras_rnn_lora/keras_internals.py): a missing or changed one fails here,
naming the symbol."""

import importlib

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_rnn_lora import keras_internals


@pytest.mark.parametrize(
    "name,owner", keras_internals.PRIVATE_NAMES, ids=lambda x: str(x)
)
def test_each_private_name_exists(name, owner):
    attribute = name.split(".", 1)[1]
    if isinstance(owner, str):  # a backend's module, by path
        module, _, member = owner.rpartition(".")
        if "tensorflow" in owner:
            pytest.importorskip("tensorflow")
        if "jax" in owner:
            pytest.importorskip("jax")
        try:
            owner = importlib.import_module(owner)
        except ModuleNotFoundError:
            owner = getattr(importlib.import_module(module), member)
    # An attribute set in `__init__` is looked for on a default instance.
    found = hasattr(owner, attribute) or (
        isinstance(owner, type) and hasattr(owner(), attribute)
    )
    assert found, (
        f"Keras {keras.__version__} has no {name}, which "
        "keras_rnn_lora/keras_internals.py relies on (read from Keras "
        f"{keras_internals.KERAS_VERSION_READ})."
    )


@pytest.mark.parametrize(
    "layer,input_shape,public,factor",
    [
        (keras.layers.Dense(3), (None, 4), "kernel", "lora_kernel_b"),
        (
            keras.layers.EinsumDense("ab,bc->ac", 3),
            (None, 4),
            "kernel",
            "lora_kernel_b",
        ),
        (
            keras.layers.Embedding(5, 3),
            (None,),
            "embeddings",
            "lora_embeddings_b",
        ),
    ],
    ids=["Dense", "EinsumDense", "Embedding"],
)
def test_raw_weights_are_the_variables_under_keras_own_lora(
    layer, input_shape, public, factor
):
    layer.build(input_shape)
    layer.enable_lora(2)
    raw = keras_internals.raw_weight(layer)
    name = keras_internals.RAW_WEIGHT_ATTRIBUTES[type(layer)]
    assert isinstance(raw, keras.Variable) and not raw.trainable, (
        f"{type(layer).__name__}.{name} is not the frozen variable under "
        "Keras' own LoRA any more"
    )
    b = getattr(layer, factor)
    b.assign(np.ones(b.shape, "float32"))  # the public weight moves, not raw
    assert not np.allclose(to_numpy(getattr(layer, public)), to_numpy(raw))


def test_lstm_gate_math_is_keras_own():
    cell = keras.layers.LSTMCell(3)
    cell.build((None, 2))
    rng = np.random.default_rng(0)
    z = [rng.normal(size=(2, 3)).astype("float32") for _ in range(4)]
    c_tm1 = rng.normal(size=(2, 3)).astype("float32")
    c, o = keras_internals.lstm_carry_and_output(cell, z, c_tm1)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    expected_c = sigmoid(z[1]) * c_tm1 + sigmoid(z[0]) * np.tanh(z[2])
    np.testing.assert_allclose(to_numpy(c), expected_c, atol=1e-5)
    np.testing.assert_allclose(to_numpy(o), sigmoid(z[3]), atol=1e-5)


@pytest.mark.parametrize(
    "layer_class", list(keras_internals.STOCK_PRECOMPUTES_ON)
)
def test_the_precompute_table_names_stock_layers(layer_class):
    assert issubclass(layer_class, keras.layers.RNN)


def test_the_fused_kernel_module_has_the_entry_points():
    module = keras_internals.fused_kernel_module()
    for name in ("gru", "lstm"):
        assert callable(getattr(module, name, None)), (
            f"keras.src.backend.{name}, which the fused-path tests patch, "
            "is gone"
        )


def test_the_atomic_backup_writes_keras_own_files(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    backup = keras_internals.AtomicBackupAndRestore(
        str(tmp_path / "backup"), delete_checkpoint=False
    )
    model.fit(
        np.ones((4, 2)),
        np.ones((4, 1)),
        epochs=2,
        callbacks=[backup],
        verbose=0,
    )
    files = sorted(p.name for p in (tmp_path / "backup").iterdir())
    assert files == ["latest.weights.h5", "training_metadata.json"], files


@pytest.mark.parametrize(
    "learning_rate",
    [0.25, keras.optimizers.schedules.ExponentialDecay(0.5, 10, 0.9)],
    ids=["float", "schedule"],
)
def test_the_learning_rate_argument_is_what_the_optimizer_was_given(
    learning_rate,
):
    optimizer = keras.optimizers.Adam(learning_rate)
    kept = keras_internals.learning_rate_argument(optimizer)
    if isinstance(learning_rate, float):
        assert isinstance(kept, keras.Variable)
        assert float(to_numpy(kept)) == learning_rate
    else:
        assert kept is learning_rate


def test_global_norm_clipping_is_keras_own():
    grads = [keras.ops.convert_to_tensor([3.0, 0.0]), None]
    grads.append(keras.ops.convert_to_tensor([4.0]))
    clipped = keras_internals.clip_by_global_norm(grads, 1.0)
    assert clipped[1] is None
    np.testing.assert_allclose(to_numpy(clipped[0]), [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(clipped[2]), [0.8], rtol=1e-6)
