"""LoRAPlusOptimizer: B factors at `loraplus_lr_ratio` times the learning
rate, on every backend, compiled or not, through save and load."""

import math
import re

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import gradients
from conftest import randomize_lora
from conftest import to_numpy

import keras_rnn_lora
from keras_rnn_lora.lora_plus import ScaledLearningRate
from keras_rnn_lora.lora_plus import is_lora_b_factor

RATIO = 16.0
RNG = np.random.default_rng(7)
X = RNG.normal(size=(8, 3, 2)).astype("float32")
Y = RNG.normal(size=(8, 1)).astype("float32")
# The training step eager and compiled (XLA on TensorFlow, jax.jit on JAX).
# On torch, Keras' default is eager and `jit_compile=True` is torch.compile,
# over a minute for these tiny models on a CPU: a large test there.
JIT_MODES = [
    False,
    pytest.param(True, marks=pytest.mark.large) if BACKEND == "torch" else True,
]


def lora_model(mark=False):
    """A tiny LoRA model; its B factors are random, not zero."""
    model = keras.Sequential(
        [
            keras.Input((3, 2)),
            keras.layers.RNN(
                keras_rnn_lora.LoRAGRUCell(
                    4, rank=2, lora_targets=("kernel", "recurrent")
                )
            ),
            keras.layers.Dense(1, name="head"),
        ]
    )
    randomize_lora(model.layers[0].cell)
    if mark:
        keras_rnn_lora.mark_only_lora_as_trainable(
            model, trainable_layers=["head"]
        )
    return model


def twin_of(model):
    """The same model with copied values (never shared buffers)."""
    twin = keras.models.clone_model(model)
    twin.set_weights([to_numpy(w) for w in model.weights])
    for weight, twin_weight in zip(model.weights, twin.weights, strict=True):
        twin_weight.trainable = weight.trainable
    return twin


def values(weights):
    return [to_numpy(w) for w in weights]


def tensors(arrays):
    """Gradients as the backend's tensors (torch's optimizers take no
    NumPy arrays)."""
    return [
        None if a is None else keras.ops.convert_to_tensor(a, "float32")
        for a in arrays
    ]


def assert_ratio_times_the_update(model, twin, before, ratio=RATIO):
    """`model` (trained with LoRA+) moved each B factor `ratio` times as
    far as `twin` (the plain optimizer) did from the same start, and every
    other weight as far."""
    checked = set()
    for weight, twin_weight, start in zip(
        model.trainable_weights, twin.trainable_weights, before, strict=True
    ):
        delta = to_numpy(weight) - start
        twin_delta = to_numpy(twin_weight) - start
        scale = ratio if is_lora_b_factor(weight) else 1.0
        assert np.abs(twin_delta).max() > 0, weight.path
        # A delta read back from float32 weights is off by up to an ulp of
        # the weight, which the ratio multiplies.
        ulp = np.finfo("float32").eps * np.abs(start).max()
        np.testing.assert_allclose(
            delta,
            scale * twin_delta,
            rtol=1e-4,
            atol=2 * scale * ulp,
            err_msg=weight.path,
        )
        checked.add(weight.name)
    assert {"lora_kernel_b", "lora_recurrent_kernel_b"} <= checked
    assert {"lora_kernel_a", "lora_recurrent_kernel_a"} <= checked


# -- one step, numerically ----------------------------------------------------

OPTIMIZERS = {
    "Adam": lambda: keras.optimizers.Adam(0.01),
    "SGD": lambda: keras.optimizers.SGD(0.01, momentum=0.9),
}


@pytest.mark.parametrize("jit_compile", JIT_MODES)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_one_step_moves_b_ratio_times_as_far(optimizer, jit_compile):
    model = lora_model()
    twin = twin_of(model)
    before = values(model.trainable_weights)
    model.compile(
        optimizer=keras_rnn_lora.LoRAPlusOptimizer(
            OPTIMIZERS[optimizer](), loraplus_lr_ratio=RATIO
        ),
        loss="mse",
        jit_compile=jit_compile,
    )
    twin.compile(
        optimizer=OPTIMIZERS[optimizer](), loss="mse", jit_compile=jit_compile
    )
    model.train_on_batch(X, Y)
    twin.train_on_batch(X, Y)
    assert_ratio_times_the_update(model, twin, before)


def test_a_gradient_scale_would_not_do_it():
    """The trap the wrapper exists for: Adam's step barely changes when
    the gradient is scaled 16 times, so the test above tells LoRA+ apart
    from a scaled gradient."""
    variable = keras.Variable(np.ones(3, "float32"))
    steps = []
    for scale in (1.0, RATIO):
        variable.assign(np.ones(3, "float32"))
        optimizer = keras.optimizers.Adam(0.01)
        grad = np.array([0.5, -1.0, 2.0], "float32") * scale
        optimizer.apply(tensors([grad]), [variable])
        steps.append(to_numpy(variable) - 1.0)
    np.testing.assert_allclose(steps[0], steps[1], rtol=1e-4)


def test_mixed_precision_through_the_loss_scale_optimizer():
    """Under a float16 policy `compile` wraps the LoRAPlusOptimizer in a
    LossScaleOptimizer; the step is still the ratio times Adam's."""
    keras.config.set_dtype_policy("mixed_float16")
    model = lora_model()
    twin = twin_of(model)
    before = values(model.trainable_weights)
    model.compile(
        optimizer=keras_rnn_lora.LoRAPlusOptimizer(keras.optimizers.Adam(0.01)),
        loss="mse",
    )
    twin.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    model.train_on_batch(X, Y)
    twin.train_on_batch(X, Y)
    assert_ratio_times_the_update(model, twin, before)


# -- fit ----------------------------------------------------------------------


@pytest.mark.parametrize("jit_compile", JIT_MODES)
def test_fit_trains_the_factors_and_nothing_frozen(jit_compile):
    model = lora_model(mark=True)
    frozen = values(model.non_trainable_weights)
    trained = values(model.trainable_weights)
    optimizer = keras_rnn_lora.LoRAPlusOptimizer(keras.optimizers.Adam(1e-3))
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    history = model.fit(X, Y, batch_size=2, epochs=1, verbose=0)
    assert all(math.isfinite(loss) for loss in history.history["loss"])
    for start, weight in zip(frozen, model.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(to_numpy(weight), start)
    for start, weight in zip(trained, model.trainable_weights, strict=True):
        assert not np.array_equal(to_numpy(weight), start), weight.path
    assert int(to_numpy(optimizer.iterations)) == 4
    assert int(to_numpy(optimizer.b_optimizer.iterations)) == 4


def test_recompiling_keeps_the_wrapper():
    """`mark_only_lora_as_trainable` recompiles from the compile config."""
    model = lora_model()
    model.compile(
        optimizer=keras_rnn_lora.LoRAPlusOptimizer(
            keras.optimizers.Adam(1e-3), loraplus_lr_ratio=4.0
        ),
        loss="mse",
    )
    keras_rnn_lora.mark_only_lora_as_trainable(model)
    assert isinstance(model.optimizer, keras_rnn_lora.LoRAPlusOptimizer)
    assert model.optimizer.loraplus_lr_ratio == 4.0
    model.fit(X, Y, batch_size=4, verbose=0)


@pytest.mark.skipif(
    BACKEND != "jax",
    reason="stateless_apply is JAX's training path: TensorFlow's optimizers "
    "refuse it, torch's update in place even in a StatelessScope (plain "
    "Adam too)",
)
def test_stateless_apply_matches_apply():
    """The stateless path (JAX's trainer) updates as `apply` does and
    leaves the variables as they were."""
    model = lora_model()
    model.build((None, 3, 2))
    weights = model.trainable_weights
    grads = tensors(gradients(model, X, Y))
    start = values(weights)
    optimizer = keras_rnn_lora.LoRAPlusOptimizer(keras.optimizers.Adam(0.01))
    optimizer.build(weights)
    new_weights, new_state = optimizer.stateless_apply(
        [v.value for v in optimizer.variables],
        grads,
        [w.value for w in weights],
    )
    for weight, value in zip(weights, start, strict=True):
        np.testing.assert_array_equal(to_numpy(weight), value)
    assert len(new_state) == len(optimizer.variables)
    optimizer.apply(grads)
    for weight, value in zip(weights, new_weights, strict=True):
        np.testing.assert_allclose(to_numpy(value), to_numpy(weight), rtol=1e-6)


# -- learning rates and schedules ---------------------------------------------


def test_a_schedule_is_scaled_at_every_step():
    """SGD under a decaying schedule: at step t each B factor moves
    `-ratio * lr(t) * grad`, every other weight `-lr(t) * grad`."""
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5)
    model = lora_model()
    optimizer = keras_rnn_lora.LoRAPlusOptimizer(keras.optimizers.SGD(schedule))
    model.compile(optimizer=optimizer, loss="mse")
    for step in range(2):
        grads = gradients(model, X, Y)
        before = values(model.trainable_weights)
        model.train_on_batch(X, Y)
        learning_rate = 0.1 * 0.5**step
        for weight, grad, start in zip(
            model.trainable_weights, grads, before, strict=True
        ):
            scale = RATIO if is_lora_b_factor(weight) else 1.0
            np.testing.assert_allclose(
                to_numpy(weight) - start,
                -scale * learning_rate * grad,
                rtol=1e-3,
                atol=1e-6,
                err_msg=f"step {step}: {weight.path}",
            )
    np.testing.assert_allclose(
        float(to_numpy(optimizer.b_optimizer.learning_rate)),
        RATIO * float(to_numpy(optimizer.learning_rate)),
    )


def test_setting_the_learning_rate_keeps_the_ratio():
    """What `ReduceLROnPlateau` and `LearningRateScheduler` do."""
    optimizer = keras_rnn_lora.LoRAPlusOptimizer(
        keras.optimizers.Adam(0.01), loraplus_lr_ratio=8.0
    )
    optimizer.learning_rate = 0.5
    assert float(to_numpy(optimizer.learning_rate)) == 0.5
    assert float(to_numpy(optimizer.optimizer.learning_rate)) == 0.5
    assert float(to_numpy(optimizer.b_optimizer.learning_rate)) == 4.0
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5)
    optimizer.learning_rate = schedule
    assert float(to_numpy(optimizer.learning_rate)) == pytest.approx(0.1)
    b_rate = float(to_numpy(optimizer.b_optimizer.learning_rate))
    assert b_rate == pytest.approx(0.8)


def test_a_learning_rate_callback_keeps_the_ratio():
    """Keras' callbacks set `optimizer.learning_rate`; an absolute value
    must not reach the B factors' optimizer as it is."""
    model = lora_model()
    optimizer = keras_rnn_lora.LoRAPlusOptimizer(keras.optimizers.Adam(0.01))
    model.compile(optimizer=optimizer, loss="mse")
    scheduler = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.002)
    model.fit(X, Y, batch_size=8, callbacks=[scheduler], verbose=0)
    lr = float(to_numpy(optimizer.learning_rate))
    b_lr = float(to_numpy(optimizer.b_optimizer.learning_rate))
    assert lr == pytest.approx(0.002)
    assert b_lr == pytest.approx(RATIO * 0.002)


def test_weight_decay_follows_each_group_and_its_exclusions():
    a = keras.Variable(np.ones(2, "float32"), name="lora_kernel_a")
    b = keras.Variable(np.ones(2, "float32"), name="lora_kernel_b")
    c = keras.Variable(np.ones(2, "float32"), name="lora_embeddings_b")
    optimizer = keras_rnn_lora.LoRAPlusOptimizer(
        keras.optimizers.SGD(0.01, weight_decay=0.5), loraplus_lr_ratio=4.0
    )
    optimizer.exclude_from_weight_decay(var_names=["lora_embeddings"])
    optimizer.apply(tensors([np.zeros(2)] * 3), [a, b, c])
    np.testing.assert_allclose(to_numpy(a), [0.995, 0.995], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(b), [0.98, 0.98], rtol=1e-6)
    np.testing.assert_array_equal(to_numpy(c), [1.0, 1.0])


def test_a_scheduled_learning_rate_cannot_be_set_to_a_number():
    """Keras' own refusal, before the twin changes."""
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5)
    optimizer = keras_rnn_lora.LoRAPlusOptimizer(
        keras.optimizers.Adam(schedule)
    )
    with pytest.raises(TypeError, match="not settable"):
        optimizer.learning_rate = 0.5
    b_rate = float(to_numpy(optimizer.b_optimizer.learning_rate))
    assert b_rate == pytest.approx(1.6)


def test_the_scaled_schedule_round_trips():
    schedule = ScaledLearningRate(
        keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5), 3.0
    )
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(schedule)
    )
    assert isinstance(restored, ScaledLearningRate)
    assert restored.get_config() == schedule.get_config()
    np.testing.assert_allclose(float(to_numpy(restored(2))), 3.0 * 0.025)


def test_global_clipnorm_clips_over_all_the_gradients():
    """As the optimizer alone would: one norm over both groups."""
    a = keras.Variable(np.zeros(2, "float32"), name="lora_kernel_a")
    b = keras.Variable(np.zeros(2, "float32"), name="lora_kernel_b")
    optimizer = keras_rnn_lora.LoRAPlusOptimizer(
        keras.optimizers.SGD(1.0, global_clipnorm=1.0), loraplus_lr_ratio=2.0
    )
    grad_a = np.array([3.0, 0.0], "float32")
    grad_b = np.array([0.0, 4.0], "float32")  # the global norm is 5
    optimizer.apply(tensors([grad_a, grad_b]), [a, b])
    np.testing.assert_allclose(to_numpy(a), [-0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(b), [0.0, -1.6], rtol=1e-6)


# -- saving -------------------------------------------------------------------


@pytest.mark.parametrize(
    "learning_rate",
    [1e-2, keras.optimizers.schedules.ExponentialDecay(1e-2, 1, 0.9)],
    ids=["float", "schedule"],
)
def test_training_resumes_identically_after_save_and_load(
    learning_rate, tmp_path
):
    model = lora_model(mark=True)
    model.compile(
        optimizer=keras_rnn_lora.LoRAPlusOptimizer(
            keras.optimizers.Adam(learning_rate)
        ),
        loss="mse",
    )
    model.fit(X, Y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "lora_plus.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    optimizer = loaded.optimizer
    assert isinstance(optimizer, keras_rnn_lora.LoRAPlusOptimizer)
    assert optimizer.loraplus_lr_ratio == RATIO
    assert int(to_numpy(optimizer.iterations)) == 2
    for saved, restored in zip(
        model.optimizer.variables, optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(to_numpy(restored), to_numpy(saved))
    model.train_on_batch(X, Y)
    loaded.train_on_batch(X, Y)
    for weight, restored in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(restored), to_numpy(weight))


# -- configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    "learning_rate",
    [3e-3, keras.optimizers.schedules.CosineDecay(1e-3, 100)],
    ids=["float", "schedule"],
)
def test_get_config_round_trip(learning_rate):
    optimizer = keras_rnn_lora.LoRAPlusOptimizer(
        keras.optimizers.AdamW(learning_rate, weight_decay=0.01),
        loraplus_lr_ratio=8,
        name="plus",
    )
    config = optimizer.get_config()
    restored = keras_rnn_lora.LoRAPlusOptimizer.from_config(config)
    assert restored.get_config() == config
    assert config["loraplus_lr_ratio"] == 8.0
    assert type(restored.optimizer) is type(optimizer.optimizer)
    assert restored.b_optimizer.weight_decay == 0.01
    # Registered: no custom_objects needed.
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(optimizer)
    )
    assert again.get_config() == config


# -- warnings -----------------------------------------------------------------


def test_warns_when_no_b_factor_trains():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    optimizer = keras_rnn_lora.LoRAPlusOptimizer(keras.optimizers.Adam())
    with pytest.warns(UserWarning, match="found no LoRA B factor"):
        optimizer.build(model.trainable_variables)


def test_warns_when_a_group_has_no_gradient():
    a = keras.Variable(np.zeros(2, "float32"), name="lora_kernel_a")
    b = keras.Variable(np.zeros(2, "float32"), name="lora_kernel_b")
    optimizer = keras_rnn_lora.LoRAPlusOptimizer(keras.optimizers.SGD(0.1))
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        optimizer.apply(tensors([np.ones(2), None]), [a, b])
    np.testing.assert_allclose(to_numpy(a), [-0.1, -0.1])


# -- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer", ["adam", None, keras.losses.MeanSquaredError()]
)
def test_refuses_what_is_not_an_optimizer(optimizer):
    with pytest.raises(
        ValueError, match="expected a `keras.optimizers.Optimizer` instance"
    ):
        keras_rnn_lora.LoRAPlusOptimizer(optimizer)


@pytest.mark.parametrize(
    "make_wrapper",
    [
        lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()),
        lambda: keras.optimizers.MultiOptimizer(
            keras.optimizers.OptimizerMap(keras.optimizers.Adam())
        ),
        lambda: keras_rnn_lora.LoRAPlusOptimizer(keras.optimizers.Adam()),
    ],
    ids=["LossScaleOptimizer", "MultiOptimizer", "LoRAPlusOptimizer"],
)
def test_refuses_an_optimizer_wrapper(make_wrapper):
    with pytest.raises(ValueError, match="expected an optimizer that wraps no"):
        keras_rnn_lora.LoRAPlusOptimizer(make_wrapper())


def test_refuses_a_built_optimizer():
    optimizer = keras.optimizers.Adam()
    optimizer.build([keras.Variable(np.zeros(2, "float32"))])
    with pytest.raises(ValueError, match="expected an optimizer that is not"):
        keras_rnn_lora.LoRAPlusOptimizer(optimizer)


def test_refuses_global_clipping_of_accumulated_gradients():
    optimizer = keras.optimizers.Adam(
        global_clipnorm=1.0, gradient_accumulation_steps=2
    )
    with pytest.raises(ValueError, match="cannot clip accumulated gradients"):
        keras_rnn_lora.LoRAPlusOptimizer(optimizer)


@pytest.mark.parametrize(
    "ratio", [0, -1.0, math.inf, math.nan, True, "16", None]
)
def test_refuses_a_bad_ratio(ratio):
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Received an invalid value for `loraplus_lr_ratio`, expected a "
            f"finite number > 0. Received: loraplus_lr_ratio={ratio!r}"
        ),
    ):
        keras_rnn_lora.LoRAPlusOptimizer(keras.optimizers.Adam(), ratio)


def test_apply_without_variables_needs_a_built_optimizer():
    optimizer = keras_rnn_lora.LoRAPlusOptimizer(keras.optimizers.Adam())
    with pytest.raises(ValueError, match="must already be built"):
        optimizer.apply(tensors([np.ones(2)]))


def test_apply_needs_one_gradient_per_variable():
    b = keras.Variable(np.zeros(2, "float32"), name="lora_kernel_b")
    optimizer = keras_rnn_lora.LoRAPlusOptimizer(keras.optimizers.Adam())
    with pytest.raises(ValueError, match="Received 2 gradients for 1"):
        optimizer.apply(tensors([np.ones(2)] * 2), [b])
