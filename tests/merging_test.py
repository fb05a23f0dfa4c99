"""Tests for the merge state of adapters and how it is saved
(keras_rnn_lora/merging.py), through the recurrent cells."""

import keras
import numpy as np
import pytest
from cells_test import CELLS
from cells_test import TARGETS
from cells_test import UNITS
from cells_test import assert_all_close
from cells_test import built_rnn
from cells_test import make_cell
from cells_test import outputs
from cells_test import sequences
from cells_test import small_model
from conftest import BACKEND
from conftest import randomize_lora
from conftest import to_numpy

from keras_rnn_lora import LoRAGRUCell
from keras_rnn_lora.walk import lora_adapters


@pytest.mark.parametrize("targets", TARGETS, ids="+".join)
@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_merge_unmerge_round_trip(cls, targets):
    cell = make_cell(cls, lora_targets=targets)
    rnn = built_rnn(cell, return_sequences=True)
    randomize_lora(cell)
    x = sequences(14)
    before = [to_numpy(w) for w in cell.weights]
    unmerged_out = outputs(rnn, x)
    assert not cell.lora_merged
    cell.merge_lora()
    cell.merge_lora()  # idempotent
    assert cell.lora_merged
    assert not any(w.trainable for w in cell.lora_weights)
    assert_all_close(outputs(rnn, x), unmerged_out)
    cell.unmerge_lora()
    cell.unmerge_lora()  # idempotent
    assert not cell.lora_merged
    assert all(w.trainable for w in cell.lora_weights)
    for b, w in zip(before, cell.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), b)


@pytest.mark.parametrize("method", ["merge_lora", "unmerge_lora"])
def test_merge_on_unbuilt_cell_raises(method):
    cell = make_cell(LoRAGRUCell)
    with pytest.raises(ValueError, match=f"`{method}\\(\\)`.*unbuilt cell"):
        getattr(cell, method)()


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_keras_file_round_trip(cls, merged, tmp_path):
    cell = make_cell(cls, lora_targets=("kernel", "recurrent"))
    model = small_model(cell)
    randomize_lora(cell)
    original = [to_numpy(w) for w in cell.weights]
    if merged:
        cell.merge_lora()
    x = sequences(15)
    expected = to_numpy(model(x))
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded_cell = loaded.layers[0].cell
    assert type(loaded_cell) is cls
    assert loaded_cell.lora_merged == merged
    np.testing.assert_array_equal(to_numpy(loaded(x)), expected)
    # The merged state came back with the exact pre-merge kernels.
    loaded_cell.unmerge_lora()
    for b, w in zip(original, loaded_cell.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), b)


def test_stock_weights_file_loads_into_lora_model(tmp_path):
    stock_model = small_model(keras.layers.GRUCell(UNITS))
    path = str(tmp_path / "base.weights.h5")
    stock_model.save_weights(path)
    lora_model = small_model(make_cell(LoRAGRUCell))
    lora_model.load_weights(path)
    x = sequences(17)
    np.testing.assert_allclose(
        to_numpy(lora_model(x)), to_numpy(stock_model(x)), atol=1e-6
    )


def broken_factors(cell, kind):
    """Factors that would merge into NaN or Inf: a NaN, an Inf, or finite
    values whose product overflows float32."""
    a, b = cell.lora_weights[-2:]
    a_value, b_value = to_numpy(a), to_numpy(b)
    if kind == "nan":
        a_value[0, 0] = np.nan
    elif kind == "inf":
        b_value[0, 0] = np.inf
    else:  # "overflow": every value finite, the product is not
        a_value[:] = 1e30
        b_value[:] = 1e30
    a.assign(a_value)
    b.assign(b_value)


@pytest.mark.parametrize("reset", [False, True], ids=["merge", "reset"])
@pytest.mark.parametrize("kind", ["nan", "inf", "overflow"])
@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_merge_refuses_non_finite_result_and_changes_nothing(cls, kind, reset):
    cell = make_cell(cls)
    rnn = built_rnn(cell, return_sequences=True)
    randomize_lora(cell)
    broken_factors(cell, kind)
    before = [to_numpy(w) for w in cell.weights]
    with pytest.raises(ValueError, match=f"'{cell.name}'.*non-finite"):
        cell.merge_lora(reset=reset)
    assert not cell.lora_merged
    for b, w in zip(before, cell.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), b)
    assert rnn.trainable_weights


def test_merge_refuses_overflow_of_a_float16_kernel():
    """Finite in float32, infinite once cast to the kernel's float16."""
    # Not the default orthogonal initializer: no float16 QR on torch CPU.
    cell = LoRAGRUCell(
        UNITS, rank=2, dtype="float16", recurrent_initializer="glorot_uniform"
    )
    keras.layers.RNN(cell, dtype="float16")(sequences())
    a, b = cell.lora_weights
    a.assign(np.full(a.shape, 300.0, "float32"))
    b.assign(np.full(b.shape, 300.0, "float32"))
    with pytest.raises(ValueError, match="non-finite"):
        cell.merge_lora()
    assert not cell.lora_merged


@pytest.mark.parametrize(
    "saved_merged,loaded_merged",
    [(True, False), (False, True), (True, True), (False, False)],
    ids=["merged-into-unmerged", "unmerged-into-merged", "both", "neither"],
)
@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_weights_file_restores_function_in_any_merge_state(
    cls, saved_merged, loaded_merged, tmp_path
):
    """A `.weights.h5` file says which state it holds: loading it into a
    twin in the other state neither applies the delta twice nor drops it,
    and the twin keeps its own state."""
    source = small_model(make_cell(cls, lora_targets=("kernel", "recurrent")))
    source_cell = source.layers[0].cell
    randomize_lora(source_cell)
    x = sequences(20)
    expected = to_numpy(source(x))
    base = {t: source_cell.base_kernel(t) for t in source_cell.lora_targets}
    if saved_merged:
        source_cell.merge_lora()
    path = str(tmp_path / "model.weights.h5")
    source.save_weights(path)
    twin = small_model(make_cell(cls, lora_targets=("kernel", "recurrent")))
    twin_cell = twin.layers[0].cell
    if loaded_merged:
        twin_cell.merge_lora()
    twin.load_weights(path)
    assert twin_cell.lora_merged == loaded_merged
    np.testing.assert_allclose(to_numpy(twin(x)), expected, atol=1e-5)
    twin_cell.unmerge_lora()
    np.testing.assert_allclose(to_numpy(twin(x)), expected, atol=1e-5)
    for target, kernel in base.items():
        np.testing.assert_array_equal(twin_cell.base_kernel(target), kernel)


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    source = small_model(make_cell(LoRAGRUCell))
    path = str(tmp_path / "model.weights.h5")
    source.save_weights(path)
    other = small_model(
        make_cell(LoRAGRUCell, lora_targets=("kernel", "recurrent"))
    )
    with pytest.raises(ValueError, match="lack the factors"):
        other.load_weights(path)


def test_set_lora_factors_checks_before_assigning():
    cell = make_cell(LoRAGRUCell)
    built_rnn(cell)
    randomize_lora(cell)
    cell.merge_lora()
    before = [to_numpy(w) for w in cell.weights]
    a, b = (to_numpy(w) for w in cell.lora_weights)
    bad_b = b.copy()
    bad_b[0, 0] = np.nan
    names = [w.name for w in cell.lora_weights]
    for values, match in (
        ({names[0]: a, names[1]: bad_b}, "non-finite"),
        ({names[0]: a}, "has the factors"),
        ({names[0]: a, names[1]: b[:1]}, "has shape"),
    ):
        with pytest.raises(ValueError, match=match):
            cell.set_lora_factors(values)
        for expected, w in zip(before, cell.weights, strict=True):
            np.testing.assert_array_equal(to_numpy(w), expected)
    cell.set_lora_factors({names[0]: a * 2, names[1]: b})
    assert cell.lora_merged
    cell.unmerge_lora()
    np.testing.assert_array_equal(to_numpy(cell.lora_weights[0]), a * 2)


# -- what a layer computes reaches every compiled function --------------------


def _adapted(seed=0):
    """A model with every kind of adapter (recurrent cells, input kernels,
    Keras' Dense), compiled, with non-zero factors."""
    from example_models import functional_model

    import keras_rnn_lora

    lora_model = keras_rnn_lora.enable_lora(
        functional_model(),
        rank=2,
        lora_targets=("kernel", "recurrent", "dense"),
    )
    for i, adapter in enumerate(lora_adapters(lora_model).values()):
        randomize_lora(adapter, seed=seed + i)
    lora_model.compile(optimizer="adam", loss="mse")
    return lora_model


def _user_function(model):
    """A compiled function a user writes around the model: a `tf.function`
    on TensorFlow, a `jax.jit` over the model's state on JAX (the
    variables' values go in as arguments), the model itself on torch."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda x: model(x))
    if BACKEND == "jax":
        import jax

        variables = model.variables

        @jax.jit
        def run(values, x):
            with keras.StatelessScope(
                state_mapping=list(zip(variables, values, strict=True))
            ):
                return model(x)

        return lambda x: run([v.value for v in variables], x)
    return model


def _change(name, model, tmp_path):
    import keras_rnn_lora

    if name == "merge":
        keras_rnn_lora.merge_lora(model)
    elif name == "unmerge":
        keras_rnn_lora.unmerge_lora(model)
    elif name == "merge(reset=True)":
        keras_rnn_lora.merge_lora(model, reset=True)
    elif name == "adapter load":
        path = tmp_path / "other.lora.weights.h5"
        other = _adapted(seed=50)
        keras_rnn_lora.save_lora_weights(other, path)
        keras_rnn_lora.load_lora_weights(model, path, strict=False)
    elif name == "mark_only_lora_as_trainable":
        keras_rnn_lora.mark_only_lora_as_trainable(model)


CHANGES = [
    "merge",
    "unmerge",
    "merge(reset=True)",
    "adapter load",
    "mark_only_lora_as_trainable",
]


@pytest.mark.parametrize("start_merged", [False, True], ids=["from", "merged"])
@pytest.mark.parametrize("change", CHANGES)
def test_functions_compiled_before_a_change_compute_after_it(
    change, start_merged, tmp_path
):
    """`predict`, `evaluate` and a user's compiled function, traced before
    a merge, an unmerge, a reset, an adapter load or a change of what
    trains, compute the model as it is after it (non-zero factors)."""
    from example_models import x_batch

    import keras_rnn_lora

    model = _adapted()
    if start_merged:
        keras_rnn_lora.merge_lora(model)
    x = x_batch(3, batch=4)
    y = np.zeros((4, 2), "float32")
    user = _user_function(model)
    model.predict(x, verbose=0)  # trace everything before the change
    model.evaluate(x, y, verbose=0)
    to_numpy(user(x))
    _change(change, model, tmp_path)
    # The reference: a fresh stock model of the changed one.
    expected = to_numpy(keras_rnn_lora.to_base_model(model)(x))
    np.testing.assert_allclose(to_numpy(model(x)), expected, atol=1e-5)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-5)
    np.testing.assert_allclose(to_numpy(user(x)), expected, atol=1e-5)
    mse = float(np.mean(expected**2))
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0), mse, rtol=1e-4)


def test_fit_after_a_reset_trains_the_fresh_adapter_only():
    """A model fitted, merged with `reset=True`, then fitted again without
    recompiling by hand: the new adapter learns, the merged kernels stay."""
    from example_models import x_batch

    import keras_rnn_lora

    model = _adapted()
    keras_rnn_lora.mark_only_lora_as_trainable(model)
    x, y = x_batch(3, batch=8), np.ones((8, 2), "float32")
    model.fit(x, y, epochs=1, verbose=0)
    keras_rnn_lora.merge_lora(model, reset=True)
    adapters = lora_adapters(model).values()
    kernels = {
        id(a): [to_numpy(a.lora_kernel(t)) for t in a.lora_targets]
        for a in adapters
    }
    model.fit(x, y, epochs=2, verbose=0)
    for adapter in adapters:
        for kernel, before in zip(
            (adapter.lora_kernel(t) for t in adapter.lora_targets),
            kernels[id(adapter)],
            strict=True,
        ):
            np.testing.assert_array_equal(to_numpy(kernel), before)
        assert np.any(to_numpy(adapter.lora_weights[1]) != 0)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), to_numpy(model(x)), atol=1e-5
    )


def test_merged_live_factors_are_zero_and_the_adapter_is_kept():
    cell = make_cell(LoRAGRUCell)
    built_rnn(cell)
    randomize_lora(cell)
    values = cell.factor_values()
    cell.merge_lora()
    a, b = cell.lora_weights
    assert not np.any(to_numpy(b))
    for name, value in cell.factor_values().items():
        np.testing.assert_array_equal(value, values[name])


def test_unmerge_keeps_a_factor_the_user_froze():
    cell = make_cell(LoRAGRUCell)
    built_rnn(cell)
    cell.lora_weights[0].trainable = False
    cell.merge_lora()
    cell.unmerge_lora()
    assert [w.trainable for w in cell.lora_weights] == [False, True]


# -- a merged layer rebuilt from its config -----------------------------------


def _merged_clone():
    from example_models import sequential_model
    from example_models import x_batch

    import keras_rnn_lora

    model = keras_rnn_lora.enable_lora(sequential_model(), rank=2)
    randomize_lora(lora_adapters(model)["rnn/cell"])
    keras_rnn_lora.merge_lora(model)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    x = x_batch(2)
    return model, clone, x


def test_a_merged_clone_computes_the_merged_model():
    import keras_rnn_lora

    model, clone, x = _merged_clone()
    np.testing.assert_allclose(
        to_numpy(clone(x)), to_numpy(model(x)), atol=1e-6
    )
    base = keras_rnn_lora.to_base_model(clone)
    np.testing.assert_allclose(to_numpy(base(x)), to_numpy(model(x)), atol=1e-6)


@pytest.mark.parametrize("call", ["unmerge_lora", "save_lora_weights"])
def test_a_merged_clone_says_what_it_lacks(call, tmp_path):
    """`set_weights` carries the merged kernel, not the adapter it merged:
    unmerging or saving the adapter says so, and how to keep it."""
    import keras_rnn_lora

    _, clone, _ = _merged_clone()
    before = [to_numpy(w) for w in clone.weights]
    with pytest.raises(ValueError, match="not known here.*`set_weights`"):
        if call == "unmerge_lora":
            keras_rnn_lora.unmerge_lora(clone)
        else:
            keras_rnn_lora.save_lora_weights(
                clone, tmp_path / "a.lora.weights.h5"
            )
    for b, w in zip(before, clone.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), b)


def test_a_merged_clone_saves_and_loads_its_merged_function(tmp_path):
    model, clone, x = _merged_clone()
    clone.save(tmp_path / "clone.keras")
    loaded = keras.saving.load_model(tmp_path / "clone.keras")
    np.testing.assert_allclose(
        to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-6
    )


# -- half-precision kernels ---------------------------------------------------


def test_merging_into_a_bfloat16_kernel_is_refused():
    from example_models import sequential_model
    from example_models import x_batch

    import keras_rnn_lora

    model = keras_rnn_lora.enable_lora(
        sequential_model(), rank=2, base_dtype="bfloat16"
    )
    cell = lora_adapters(model)["rnn/cell"]
    randomize_lora(cell, scale=0.02)
    before = [to_numpy(w) for w in model.weights]
    for reset in (False, True):
        with pytest.raises(ValueError, match="bfloat16 kernel.*round away"):
            keras_rnn_lora.merge_lora(model, reset=reset)
    for b, w in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), b)
    with pytest.raises(ValueError, match="dtype='float32'"):
        keras_rnn_lora.to_base_model(model)
    base = keras_rnn_lora.to_base_model(model, dtype="float32")
    assert base.get_layer("rnn").cell.recurrent_kernel.dtype == "float32"
    x = x_batch(2)
    np.testing.assert_allclose(
        to_numpy(base(x)), to_numpy(model(x)).astype("float32"), atol=0.05
    )
    # The float32 kernel holds the whole update.
    a, b = (to_numpy(w).astype("float64") for w in cell.lora_weights)
    expected = to_numpy(cell.recurrent_kernel).astype("float64")
    expected += cell.scaling * a @ b
    np.testing.assert_allclose(
        to_numpy(base.get_layer("rnn").cell.recurrent_kernel),
        expected,
        rtol=1e-6,
        atol=1e-7,
    )
    # A fresh adapter (B = 0) merges: nothing to lose.
    fresh = keras_rnn_lora.enable_lora(
        sequential_model(), rank=2, base_dtype="bfloat16"
    )
    keras_rnn_lora.merge_lora(fresh, reset=True)


def test_a_stock_weights_file_says_how_to_load_it(tmp_path):
    """Keras keys a weights file by class name: a stock model's file cannot
    reach the LoRA layers, and the error says what to do instead."""
    from example_models import functional_model

    import keras_rnn_lora

    base = functional_model()
    path = tmp_path / "base.weights.h5"
    base.save_weights(path)
    lora_model = keras_rnn_lora.enable_lora(base, rank=2)
    with pytest.raises(
        ValueError, match="found no stored weights.*enable_lora"
    ):
        lora_model.load_weights(path)
