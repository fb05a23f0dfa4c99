"""Tests for named adapters and mixed batches
(keras_rnn_lora/named_adapters.py, adapter_bank.py, routing.py)."""

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import randomize_lora
from conftest import to_numpy
from example_models import STEPS
from example_models import functional_model
from example_models import x_batch

import keras_rnn_lora
from keras_rnn_lora import lora
from keras_rnn_lora import routing
from keras_rnn_lora.walk import lora_adapters

TARGETS = ("kernel", "recurrent", "dense")


def randomize_active(model, seed):
    for i, adapter in enumerate(lora_adapters(model).values()):
        randomize_lora(adapter, seed=seed + i, scale=0.3)


def randomize_banked(model, name, seed):
    rng = np.random.default_rng(seed)
    for adapter in lora_adapters(model).values():
        values = {
            factor: rng.normal(size=shape).astype("float32") * 0.3
            + (1.0 if factor.endswith("magnitude") else 0.0)
            for factor, shape in adapter.adapter_shapes(name).items()
        }
        adapter.set_adapter_values(name, values)


def three_adapters(base=None):
    """A model with "default" and "news" (same shape, activatable) and
    "wide" (rank 4 with DoRA: servable only), all non-zero."""
    base = base or functional_model()
    model = keras_rnn_lora.enable_lora(base, rank=2, lora_targets=TARGETS)
    randomize_active(model, 0)
    keras_rnn_lora.add_adapter(model, "news")
    keras_rnn_lora.add_adapter(model, "wide", rank=4, use_dora=True)
    randomize_banked(model, "news", 10)
    randomize_banked(model, "wide", 20)
    return base, model


def outputs_with(model, name, x):
    """The model's outputs with adapter `name` folded in, from a stock
    model (an independent reference for every adapter)."""
    return to_numpy(keras_rnn_lora.to_base_model(model, adapter=name)(x))


def test_one_adapter_and_no_names_is_as_before():
    model = keras_rnn_lora.enable_lora(functional_model(), rank=2)
    assert keras_rnn_lora.list_adapters(model) == ["default"]
    assert keras_rnn_lora.active_adapter(model) == "default"
    cell = lora_adapters(model)["gru/cell"]
    config = cell.get_config()
    assert config["named_adapters"] is None
    assert len(cell.weights) == 5  # kernel, recurrent kernel, bias, A, B


def test_adding_a_fresh_adapter_changes_nothing_and_lists_it():
    base, model = three_adapters()
    assert keras_rnn_lora.list_adapters(model) == ["default", "news", "wide"]
    x = x_batch(2)
    fresh = keras_rnn_lora.enable_lora(base, rank=2, lora_targets=TARGETS)
    randomize_active(fresh, 0)
    np.testing.assert_allclose(
        to_numpy(model(x)), to_numpy(fresh(x)), atol=1e-6
    )
    keras_rnn_lora.add_adapter(model, "zero")
    np.testing.assert_allclose(
        outputs_with(model, "zero", x), to_numpy(base(x)), atol=1e-5
    )


def test_set_adapter_runs_that_adapter_and_keeps_the_others():
    base, model = three_adapters()
    x = x_batch(3)
    expected = {
        name: outputs_with(model, name, x) for name in ("default", "news")
    }
    keras_rnn_lora.set_adapter(model, "news")
    assert keras_rnn_lora.active_adapter(model) == "news"
    np.testing.assert_allclose(to_numpy(model(x)), expected["news"], atol=1e-5)
    keras_rnn_lora.set_adapter(model, "default")
    np.testing.assert_allclose(
        to_numpy(model(x)), expected["default"], atol=1e-5
    )
    assert keras_rnn_lora.list_adapters(model) == ["default", "news", "wide"]


def test_training_a_named_adapter_trains_only_it():
    _, model = three_adapters()
    keras_rnn_lora.set_adapter(model, "news")
    keras_rnn_lora.mark_only_lora_as_trainable(model)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    live = {
        id(w) for a in lora_adapters(model).values() for w in a.lora_weights
    }
    assert {id(w) for w in model.trainable_weights} == live
    before = {w.path: to_numpy(w) for w in model.weights}
    model.fit(x_batch(1, batch=8), np.ones((8, 2)), epochs=2, verbose=0)
    for weight in model.weights:
        changed = not np.array_equal(to_numpy(weight), before[weight.path])
        assert changed == (id(weight) in live), weight.path


def test_disable_adapters_runs_the_base_model_and_restores():
    base, model = three_adapters()
    x = x_batch(4)
    with_adapter = to_numpy(model(x))
    for merged in (False, True):
        if merged:
            keras_rnn_lora.merge_lora(model)
        with keras_rnn_lora.disable_adapters(model):
            np.testing.assert_allclose(
                to_numpy(model(x)), to_numpy(base(x)), atol=1e-5
            )
        np.testing.assert_allclose(to_numpy(model(x)), with_adapter, atol=1e-5)
    with pytest.raises(RuntimeError, match="inside"):
        with keras_rnn_lora.disable_adapters(model):
            raise RuntimeError("inside")
    np.testing.assert_allclose(to_numpy(model(x)), with_adapter, atol=1e-5)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_a_mixed_batch_gives_each_example_its_own_adapter(policy):
    """Each example equals the same example run alone with its adapter
    folded in; an example with no adapter equals the base model. Every
    target type: GRU, LSTM, bidirectional SimpleRNN, stacked cells, Dense."""
    keras.config.set_dtype_policy(policy)
    base, model = three_adapters()
    x = x_batch(5, batch=4)
    chosen = ["news", None, "wide", "default"]
    mixed = to_numpy(keras_rnn_lora.call_with_adapters(model, x, chosen))
    atol = 1e-5 if policy == "float32" else 5e-2
    for row, name in enumerate(chosen):
        expected = outputs_with(model, name or "base", x[row : row + 1])
        np.testing.assert_allclose(
            mixed[row : row + 1].astype("float32"), expected, atol=atol
        )
    # Indices work as names do.
    by_index = keras_rnn_lora.call_with_adapters(model, x, [1, -1, 2, 0])
    np.testing.assert_allclose(to_numpy(by_index), mixed, atol=1e-6)


def test_a_mixed_batch_through_embeddings_and_einsum_dense():
    tokens = keras.Input((STEPS,), dtype="int32")
    h = keras.layers.Embedding(20, 6, name="emb")(tokens)
    h = keras.layers.GRU(5, return_sequences=True, name="gru")(h)
    h = keras.layers.EinsumDense("abc,cd->abd", (STEPS, 3), name="ein")(h)
    base = keras.Model(tokens, h)
    model = keras_rnn_lora.enable_lora(
        base, rank=2, lora_targets=("recurrent", "embedding", "einsum_dense")
    )
    randomize_active(model, 1)
    keras_rnn_lora.add_adapter(model, "b", rank=3)
    randomize_banked(model, "b", 2)
    ids = np.random.default_rng(0).integers(1, 20, (3, STEPS)).astype("int32")
    chosen = ["b", None, "default"]
    mixed = to_numpy(keras_rnn_lora.call_with_adapters(model, ids, chosen))
    for row, name in enumerate(chosen):
        np.testing.assert_allclose(
            mixed[row : row + 1],
            outputs_with(model, name or "base", ids[row : row + 1]),
            atol=1e-5,
        )


def _compiled_routed_call(model):
    """`routed_call(model, x, ids)` compiled once: a `tf.function` on
    TensorFlow, `jax.jit` over the model's variables on JAX, eager on
    torch."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(
            lambda x, ids: keras_rnn_lora.routed_call(model, x, ids)
        )
    if BACKEND == "jax":
        import jax

        variables = model.variables

        @jax.jit
        def run(values, x, ids):
            with keras.StatelessScope(
                state_mapping=list(zip(variables, values, strict=True))
            ):
                return keras_rnn_lora.routed_call(model, x, ids)

        return lambda x, ids: run([v.value for v in variables], x, ids)
    return lambda x, ids: keras_rnn_lora.routed_call(model, x, ids)


def test_a_mixed_batch_inside_a_compiled_function():
    _, model = three_adapters()
    x = x_batch(6, batch=3)
    ids = np.array([2, -1, 1], "int32")
    expected = to_numpy(keras_rnn_lora.routed_call(model, x, ids))
    got = _compiled_routed_call(model)(x, ids)
    np.testing.assert_allclose(to_numpy(got), expected, atol=1e-5)


def test_a_compiled_mixed_batch_follows_set_adapter():
    """Which adapter is active is a variable value: a function compiled
    while "default" was active still routes every name to its own factors
    after `set_adapter` swaps the live variables."""
    _, model = three_adapters()
    x = x_batch(6, batch=4)
    ids = np.array([0, 1, 2, -1], "int32")  # default, news, wide, base
    run = _compiled_routed_call(model)
    before = to_numpy(run(x, ids))
    keras_rnn_lora.set_adapter(model, "news")
    np.testing.assert_allclose(to_numpy(run(x, ids)), before, atol=1e-5)
    eager = to_numpy(keras_rnn_lora.routed_call(model, x, ids))
    np.testing.assert_allclose(eager, before, atol=1e-5)
    for row, name in enumerate(["default", "news", "wide", "base"]):
        np.testing.assert_allclose(
            before[row : row + 1],
            outputs_with(model, name, x[row : row + 1]),
            atol=1e-5,
        )


def test_named_adapters_survive_keras_files_and_adapter_files(tmp_path):
    base, model = three_adapters()
    keras_rnn_lora.set_adapter(model, "news")
    x = x_batch(7, batch=3)
    chosen = ["wide", "default", None]
    expected = to_numpy(keras_rnn_lora.call_with_adapters(model, x, chosen))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert keras_rnn_lora.list_adapters(loaded) == ["default", "news", "wide"]
    assert keras_rnn_lora.active_adapter(loaded) == "news"
    np.testing.assert_allclose(
        to_numpy(keras_rnn_lora.call_with_adapters(loaded, x, chosen)),
        expected,
        atol=1e-6,
    )
    every = tmp_path / "all.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(model, every, adapter="all")
    rebuilt = keras_rnn_lora.load_lora_model(base, every)
    assert sorted(keras_rnn_lora.list_adapters(rebuilt)) == [
        "default",
        "news",
        "wide",
    ]
    assert keras_rnn_lora.active_adapter(rebuilt) == "news"  # as saved
    np.testing.assert_allclose(
        to_numpy(keras_rnn_lora.call_with_adapters(rebuilt, x, chosen)),
        expected,
        atol=1e-5,
    )
    one = tmp_path / "wide.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(model, one, adapter="wide")
    twin = keras_rnn_lora.enable_lora(base, rank=2, lora_targets=TARGETS)
    keras_rnn_lora.add_adapter(twin, "wide", rank=4, use_dora=True)
    keras_rnn_lora.load_lora_weights(twin, one, adapter="wide")
    np.testing.assert_allclose(
        to_numpy(keras_rnn_lora.call_with_adapters(twin, x[:1], ["wide"])),
        expected[:1],
        atol=1e-5,
    )


def test_merge_and_to_base_model_take_the_adapter_to_fold_in():
    base, model = three_adapters()
    x = x_batch(8)
    news = outputs_with(model, "news", x)
    np.testing.assert_allclose(
        outputs_with(model, "base", x), to_numpy(base(x)), atol=1e-5
    )
    keras_rnn_lora.merge_lora(model, adapter="news")
    assert keras_rnn_lora.active_adapter(model) == "news"
    np.testing.assert_allclose(to_numpy(model(x)), news, atol=1e-5)
    with pytest.raises(ValueError, match="call_with_adapters.*unmerge"):
        keras_rnn_lora.call_with_adapters(model, x, ["news"] * len(x))
    keras_rnn_lora.unmerge_lora(model)
    with pytest.raises(ValueError, match="reset=True.*named adapter"):
        keras_rnn_lora.merge_lora(model, reset=True)
    with pytest.raises(ValueError, match="reset=True.*named adapter"):
        keras_rnn_lora.merge_lora(model, reset=True, adapter="default")
    assert keras_rnn_lora.active_adapter(model) == "news"  # refused: as was


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: keras_rnn_lora.add_adapter(m, "news"), "already has"),
        (lambda m: keras_rnn_lora.add_adapter(m, "a b"), "`name`"),
        (lambda m: keras_rnn_lora.add_adapter(m, "base"), "reserved"),
        (lambda m: keras_rnn_lora.add_adapter(m, "v1.2"), "`name`"),
        (
            lambda m: keras_rnn_lora.call_with_adapters(m, x_batch(), [0, 1]),
            "2 adapter ids for a batch of",
        ),
        (lambda m: keras_rnn_lora.add_adapter(m, "all"), "reserved"),
        (
            lambda m: keras_rnn_lora.enable_lora(
                functional_model(), rank=2, adapter_name="base"
            ),
            "reserved",
        ),
        (
            lambda m: keras_rnn_lora.call_with_adapters(
                m, x_batch(), [True] * 3
            ),
            "invalid adapter True",
        ),
        (
            lambda m: keras_rnn_lora.add_adapter(m, "x", lora_init="pissa"),
            "`lora_init`",
        ),
        (lambda m: keras_rnn_lora.set_adapter(m, "nope"), "no adapter 'nope'"),
        (lambda m: keras_rnn_lora.set_adapter(m, "base"), "disable_adapters"),
        (
            lambda m: keras_rnn_lora.set_adapter(m, "wide"),
            "differs from the trainable one in \\['rank'",
        ),
        (lambda m: keras_rnn_lora.delete_adapter(m, "default"), "is active"),
        (
            lambda m: keras_rnn_lora.call_with_adapters(
                m, x_batch(), ["zz"] * 3
            ),
            "Unknown adapter 'zz' for example 0",
        ),
        (
            lambda m: keras_rnn_lora.call_with_adapters(m, x_batch(), [7] * 3),
            "invalid adapter 7",
        ),
        (
            lambda m: keras_rnn_lora.to_base_model(m, adapter="nope"),
            "`adapter`",
        ),
        (
            lambda m: keras_rnn_lora.save_lora_weights(
                m, "/tmp/x.lora.weights.h5", adapter="nope"
            ),
            "`adapter`",
        ),
    ],
)
def test_errors_name_what_is_wrong(call, match):
    _, model = three_adapters()
    with pytest.raises(ValueError, match=match):
        call(model)


def test_delete_adapter_removes_its_weights():
    _, model = three_adapters()
    count = len(model.weights)
    keras_rnn_lora.delete_adapter(model, "wide")
    assert keras_rnn_lora.list_adapters(model) == ["default", "news"]
    assert len(model.weights) < count
    assert not any("adapter__wide__" in w.name for w in model.weights)


def test_a_failed_mixed_call_does_not_feed_the_next():
    """Each cell caches one call's per-example factors; a call that failed
    inside Keras' loop never reset that cache."""
    _, model = three_adapters()
    x = x_batch(8, batch=4)
    chosen = ["default", None, "news", "default"]
    expected = to_numpy(keras_rnn_lora.call_with_adapters(model, x, chosen))
    # Four ids for three examples, past the checks: the backend's own error
    # (its type differs per backend) comes from inside the loop.
    names = keras_rnn_lora.list_adapters(model)
    with pytest.raises(Exception):  # noqa: B017
        with routing.routed(names, np.array([1, 1, 1, 1], "int32")):
            model(x[:3], training=False)
    got = to_numpy(keras_rnn_lora.call_with_adapters(model, x, chosen))
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_weights_loaded_into_a_twin_bring_their_active_adapter(tmp_path):
    """The weights hold the live variables of the adapter active when they
    were saved; a twin left on another adapter takes that one on."""
    base, model = three_adapters()
    keras_rnn_lora.set_adapter(model, "news")
    x = x_batch(9, batch=3)
    expected = {
        name: outputs_with(model, name, x) for name in ("default", "news")
    }
    model.save_weights(tmp_path / "m.weights.h5")
    _, twin = three_adapters(base)
    twin.load_weights(tmp_path / "m.weights.h5")
    assert keras_rnn_lora.active_adapter(twin) == "news"
    np.testing.assert_allclose(to_numpy(twin(x)), expected["news"], atol=1e-5)
    keras_rnn_lora.set_adapter(twin, "default")
    np.testing.assert_allclose(
        to_numpy(twin(x)), expected["default"], atol=1e-5
    )


def test_a_refused_add_adapter_changes_no_layer():
    model = keras_rnn_lora.enable_lora(
        functional_model(), rank=2, lora_targets=TARGETS
    )
    with pytest.raises(ValueError, match="needs another conversion"):
        keras_rnn_lora.add_adapter(model, "sub", lora_targets=("recurrent",))
    assert keras_rnn_lora.list_adapters(model) == ["default"]
    keras_rnn_lora.add_adapter(model, "other")
    assert keras_rnn_lora.list_adapters(model) == ["default", "other"]


def test_an_adapter_on_some_kernels_rebuilds_from_its_file(tmp_path):
    base = functional_model()
    model = keras_rnn_lora.enable_lora(
        base, rank=2, lora_targets=("kernel", "recurrent")
    )
    keras_rnn_lora.add_adapter(model, "sub", lora_targets=("recurrent",))
    randomize_banked(model, "sub", 3)
    x = x_batch(4, batch=2)
    expected = outputs_with(model, "sub", x)
    path = tmp_path / "all.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(model, path, adapter="all")
    rebuilt = keras_rnn_lora.load_lora_model(base, path)
    np.testing.assert_allclose(
        outputs_with(rebuilt, "sub", x), expected, atol=1e-5
    )


def test_one_string_is_not_a_list_of_adapters():
    _, model = three_adapters()
    with pytest.raises(TypeError, match="not a string"):
        keras_rnn_lora.call_with_adapters(model, x_batch(), "news")


def test_one_adapter_of_a_file_of_several(tmp_path):
    base, model = three_adapters()
    every = tmp_path / "all.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(model, every, adapter="all")
    _, twin = three_adapters(base)
    keras_rnn_lora.set_adapter(twin, "news")
    before = {n: outputs_with(twin, n, x_batch(2)) for n in ("default", "news")}
    keras_rnn_lora.load_lora_weights(twin, every, adapter="wide")
    for name, value in before.items():  # only "wide" loaded
        np.testing.assert_array_equal(
            outputs_with(twin, name, x_batch(2)), value
        )
    np.testing.assert_allclose(
        outputs_with(twin, "wide", x_batch(2)),
        outputs_with(model, "wide", x_batch(2)),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="`adapter`"):
        keras_rnn_lora.load_lora_weights(twin, every, adapter="nope")


def test_no_mixed_batch_within_disable_adapters():
    _, model = three_adapters()
    with keras_rnn_lora.disable_adapters(model):
        with pytest.raises(ValueError, match="within `disable_adapters`"):
            keras_rnn_lora.call_with_adapters(model, x_batch(), [0, 1, -1])
    keras_rnn_lora.call_with_adapters(model, x_batch(), [0, 1, -1])


def test_a_new_rank_keeps_the_layers_scale():
    model = keras_rnn_lora.enable_lora(
        functional_model(), rank=2, lora_alpha=4.0, lora_targets=TARGETS
    )
    keras_rnn_lora.add_adapter(model, "wide", rank=8)
    keras_rnn_lora.add_adapter(model, "loud", rank=8, lora_alpha=8.0)
    keras_rnn_lora.add_adapter(model, "root", rank=8, use_rslora=True)
    cell = lora_adapters(model)["gru/cell"]
    configs = cell.get_config()["named_adapters"]
    own = cell.lora_config
    assert own.scaling == 2.0
    wide = lora.LoRAConfig(**configs["wide"])
    assert (wide.rank, wide.lora_alpha, wide.scaling) == (8, 16.0, 2.0)
    assert lora.LoRAConfig(**configs["loud"]).scaling == 1.0  # as given
    root = lora.LoRAConfig(**configs["root"])
    assert root.scaling == pytest.approx(2.0)  # alpha / sqrt(8)


def test_a_one_adapter_file_never_silently_replaces_another_adapter(tmp_path):
    """A file of adapter "news" loaded into a model of several adapters
    whose active one is "default" must name where it goes: before, it
    overwrote the active adapter and left "news" as it was."""
    _, source = three_adapters()
    x = x_batch(9, batch=2)
    news = outputs_with(source, "news", x)
    path = tmp_path / "news.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(source, path, adapter="news")
    _, target = three_adapters(functional_model())
    randomize_banked(target, "news", 99)
    before = {n: outputs_with(target, n, x) for n in ("default", "news")}
    with pytest.raises(ValueError, match="adapter='news' or adapter='default'"):
        keras_rnn_lora.load_lora_weights(target, path)
    for name, values in before.items():  # untouched
        np.testing.assert_allclose(outputs_with(target, name, x), values)
    keras_rnn_lora.load_lora_weights(target, path, adapter="news")
    np.testing.assert_allclose(outputs_with(target, "news", x), news, atol=1e-5)
    np.testing.assert_allclose(
        outputs_with(target, "default", x), before["default"]
    )
    # The active adapter's namesake, or a model of one adapter: as before.
    own = tmp_path / "default.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(source, own)
    keras_rnn_lora.load_lora_weights(target, own)
    np.testing.assert_allclose(
        outputs_with(target, "default", x),
        outputs_with(source, "default", x),
        atol=1e-5,
    )
