"""Shared test helpers: backend-neutral gradients, stock twins, fixtures."""

import atexit
import os
import shutil
import tempfile

import keras
import numpy as np
import pytest

import keras_rnn_lora
from keras_rnn_lora.lora import LORA_CONFIG_KEYS

BACKEND = keras.backend.backend()


def _share_jax_compilations():
    """On JAX, most of the suite's time is XLA compiling the same functions
    again: every test builds fresh models, and every run of the main job
    compiles its training step in each of its job processes. A persistent
    compilation cache for this session (passed to subprocesses through the
    environment) turns a repeat compilation into a load; same program, same
    executable. A cache the user configured is kept; this one is removed
    when the session ends."""
    if BACKEND != "jax" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import jax

    directory = tempfile.mkdtemp(prefix="keras-rnn-lora-jax-cache-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    settings = {
        "jax_compilation_cache_dir": directory,
        "jax_persistent_cache_min_compile_time_secs": 0,
    }
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
        jax.config.update(name, value)


_share_jax_compilations()

STOCK_CELLS = {
    keras_rnn_lora.LoRASimpleRNNCell: keras.layers.SimpleRNNCell,
    keras_rnn_lora.LoRAGRUCell: keras.layers.GRUCell,
    keras_rnn_lora.LoRALSTMCell: keras.layers.LSTMCell,
}


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts with a clean session, float32 and a fixed seed."""
    keras.backend.clear_session()
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


def to_numpy(x):
    return np.array(keras.ops.convert_to_numpy(x))


def randomize_lora(layer_or_cell, seed=0, scale=0.3):
    """Sets every LoRA factor to random non-zero values (B = 0 hides bugs)."""
    rng = np.random.default_rng(seed)
    for weight in layer_or_cell.lora_weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32") * scale)


def stock_twin(lora_cell):
    """A stock Keras cell whose kernels are `W + s*A@B` of `lora_cell`."""
    stock_cls = STOCK_CELLS[type(lora_cell)]
    config = lora_cell.get_config()
    for key in LORA_CONFIG_KEYS:
        config.pop(key)
    twin = stock_cls.from_config(config)
    twin.build((None, lora_cell.kernel.shape[0]))
    for name in ("kernel", "recurrent_kernel", "bias"):
        value = getattr(lora_cell, name)
        if value is None:
            continue
        value = to_numpy(value).astype("float64")
        target = {"kernel": "kernel", "recurrent_kernel": "recurrent"}.get(name)
        if target in lora_cell.lora_targets and not lora_cell.lora_merged:
            a, b = lora_cell.lora_factors(target)
            value = value + lora_cell.scaling * (
                to_numpy(a).astype("float64") @ to_numpy(b).astype("float64")
            )
        getattr(twin, name).assign(value.astype("float32"))
    return twin


def gradients(model, x, y, loss_fn=None):
    """Gradients of a mean-squared loss w.r.t. `model.trainable_weights`,
    as numpy arrays, computed with the backend's own autodiff."""
    loss_fn = loss_fn or keras.losses.MeanSquaredError()
    weights = model.trainable_weights
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, weights)
        return [None if g is None else to_numpy(g) for g in grads]
    if BACKEND == "jax":
        import jax

        trainable = [w.value for w in weights]
        frozen = [v.value for v in model.non_trainable_variables]

        def compute_loss(trainable_values):
            out, _ = model.stateless_call(
                trainable_values, frozen, x, training=True
            )
            return loss_fn(y, out)

        return [to_numpy(g) for g in jax.grad(compute_loss)(trainable)]
    if BACKEND == "torch":
        for w in model.weights:
            w.value.grad = None
        loss = loss_fn(y, model(x, training=True))
        loss.backward()
        return [
            None if w.value.grad is None else to_numpy(w.value.grad)
            for w in weights
        ]
    raise NotImplementedError(BACKEND)


def iwslt_dir():
    """The IWSLT 2017 copy for data tests: fails under CI when missing."""
    path = os.environ.get("IWSLT2017_DIR")
    if path and os.path.isdir(path):
        return path
    if os.environ.get("CI"):
        pytest.fail(
            "IWSLT2017_DIR is not set to an existing folder under CI "
            f"(IWSLT2017_DIR={path!r})"
        )
    pytest.skip("IWSLT2017_DIR not set: real-data test skipped outside CI")
