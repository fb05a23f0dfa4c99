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
from conftest import randomize_lora
from conftest import to_numpy

from keras_rnn_lora import LoRAGRUCell


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
