"""Tests for adapter files: save_lora_weights / load_lora_weights."""

import os

import h5py
import keras
import numpy as np
import pytest
from conftest import randomize_lora
from conftest import to_numpy
from example_models import functional_model
from example_models import randomize_weights
from example_models import sequential_model
from example_models import x_batch

import keras_rnn_lora
from keras_rnn_lora.walk import lora_adapters
from keras_rnn_lora.walk import lora_cells


def trained_adapter(base, seed=0, **kwargs):
    lora_model = keras_rnn_lora.enable_lora(base, rank=2, **kwargs)
    for i, cell in enumerate(lora_cells(lora_model).values()):
        randomize_lora(cell, seed=seed + i)
    return lora_model


def test_round_trip_into_fresh_copy_of_base(tmp_path):
    base = functional_model()
    lora_model = trained_adapter(base)
    path = tmp_path / "adapter.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(lora_model, path)
    fresh = keras_rnn_lora.enable_lora(base, rank=2)
    keras_rnn_lora.load_lora_weights(fresh, path)
    x = x_batch(1)
    np.testing.assert_array_equal(to_numpy(fresh(x)), to_numpy(lora_model(x)))
    with h5py.File(path, "r") as file:
        assert "gru/cell" in file
        group = file["gru/cell"]
        assert group.attrs["rank"] == 2
        assert group.attrs["lora_targets"] == "recurrent"
        assert sorted(group) == [
            "lora_recurrent_kernel_a",
            "lora_recurrent_kernel_b",
        ]
    # Only the factors: far smaller than the model's weights.
    model_bytes = sum(to_numpy(w).nbytes for w in base.weights)
    factor_bytes = sum(
        to_numpy(w).nbytes
        for c in lora_cells(lora_model).values()
        for w in c.lora_weights
    )
    assert factor_bytes < model_bytes / 4
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_loading_into_a_merged_model_keeps_it_merged(tmp_path):
    base = sequential_model()
    path = tmp_path / "a.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(trained_adapter(base), path)
    target = keras_rnn_lora.enable_lora(base, rank=2)
    keras_rnn_lora.merge_lora(target)
    keras_rnn_lora.load_lora_weights(target, path)
    cell = lora_cells(target)["rnn/cell"]
    assert cell.lora_merged
    expected = trained_adapter(base)
    np.testing.assert_allclose(
        to_numpy(target(x_batch(2))), to_numpy(expected(x_batch(2))), atol=1e-5
    )


def test_refuses_missing_layer(tmp_path):
    base = functional_model()
    path = tmp_path / "a.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(trained_adapter(base), path)
    narrower = keras_rnn_lora.enable_lora(base, rank=2, layers=["gru"])
    with pytest.raises(ValueError, match="for layer 'bi/backward/cell'"):
        keras_rnn_lora.load_lora_weights(narrower, path)
    with pytest.warns(UserWarning, match="skipped 5: in the file only"):
        keras_rnn_lora.load_lora_weights(narrower, path, strict=False)
    wider_path = tmp_path / "narrow.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(narrower, wider_path)
    wider = keras_rnn_lora.enable_lora(base, rank=2)
    with pytest.raises(ValueError, match="has LoRA layer 'bi/backward/cell'"):
        keras_rnn_lora.load_lora_weights(wider, wider_path)


def test_refuses_wrong_rank(tmp_path):
    base = sequential_model()
    path = tmp_path / "a.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(trained_adapter(base), path)
    rank3 = keras_rnn_lora.enable_lora(base, rank=3)
    with pytest.raises(ValueError, match="Layer 'rnn/cell'.*rank=2.*rank=3"):
        keras_rnn_lora.load_lora_weights(rank3, path, strict=False)


def test_refuses_different_targets_and_alpha(tmp_path):
    base = sequential_model()
    path = tmp_path / "a.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(trained_adapter(base), path)
    both = keras_rnn_lora.enable_lora(
        base, rank=2, lora_targets=("kernel", "recurrent")
    )
    with pytest.raises(ValueError, match="lora_targets='recurrent'"):
        keras_rnn_lora.load_lora_weights(both, path)
    alpha = keras_rnn_lora.enable_lora(base, rank=2, lora_alpha=8.0)
    with pytest.raises(ValueError, match="lora_alpha=2.0 but.*lora_alpha=8.0"):
        keras_rnn_lora.load_lora_weights(alpha, path)


def test_refuses_different_base_unless_not_strict(tmp_path):
    base = sequential_model()
    lora_model = trained_adapter(base)
    path = tmp_path / "a.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(lora_model, path)
    other_base = sequential_model()
    randomize_weights(other_base, seed=42)
    other = keras_rnn_lora.enable_lora(other_base, rank=2)
    with pytest.raises(ValueError, match="'rnn/cell'.*fingerprint mismatch"):
        keras_rnn_lora.load_lora_weights(other, path)
    with pytest.warns(UserWarning, match="\\['rnn/cell'\\].*fingerprint"):
        keras_rnn_lora.load_lora_weights(other, path, strict=False)
    np.testing.assert_array_equal(
        to_numpy(lora_cells(other)["rnn/cell"].lora_recurrent_kernel_b),
        to_numpy(lora_cells(lora_model)["rnn/cell"].lora_recurrent_kernel_b),
    )


def test_bad_paths(tmp_path):
    lora_model = trained_adapter(sequential_model())
    with pytest.raises(ValueError, match="`path`.*'.lora.weights.h5'"):
        keras_rnn_lora.save_lora_weights(lora_model, tmp_path / "a.h5")
    with pytest.raises(FileNotFoundError, match="No adapter file"):
        keras_rnn_lora.load_lora_weights(
            lora_model, tmp_path / "none.lora.weights.h5"
        )
    not_adapter = tmp_path / "other.lora.weights.h5"
    with h5py.File(not_adapter, "w") as file:
        file.create_dataset("x", data=np.zeros(2))
    with pytest.raises(ValueError, match="not a keras-rnn-lora adapter file"):
        keras_rnn_lora.load_lora_weights(lora_model, not_adapter)
    with pytest.raises(
        ValueError, match="`save_lora_weights` found no LoRA cell or layer"
    ):
        keras_rnn_lora.save_lora_weights(
            sequential_model(), tmp_path / "b.lora.weights.h5"
        )


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    lora_model = trained_adapter(sequential_model())
    path = tmp_path / "a.lora.weights.h5"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", fail)
    with pytest.raises(OSError, match="disk full"):
        keras_rnn_lora.save_lora_weights(lora_model, path)
    assert os.listdir(tmp_path) == []
    # An existing adapter survives a failed overwrite untouched.
    monkeypatch.undo()
    keras_rnn_lora.save_lora_weights(lora_model, path)
    before = path.read_bytes()
    monkeypatch.setattr(h5py.Group, "create_dataset", fail)
    with pytest.raises(OSError):
        keras_rnn_lora.save_lora_weights(lora_model, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.lora.weights.h5"]
    keras.backend.clear_session()


# -- hostile adapter files: refused before anything is assigned ---------------


def saved_adapter(tmp_path, base=None):
    base = base or sequential_model()
    path = tmp_path / "a.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(trained_adapter(base, seed=1), path)
    return base, path


def merged_target(base):
    target = trained_adapter(base, seed=7)
    keras_rnn_lora.merge_lora(target)
    return target, [to_numpy(w) for w in target.weights]


def assert_untouched(target, before):
    assert lora_cells(target)["rnn/cell"].lora_merged
    for b, w in zip(before, target.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), b)


def rewrite(path, edit):
    with h5py.File(path, "r+") as file:
        edit(file, file["rnn/cell"])


FACTOR = "lora_recurrent_kernel_b"


def replace_dataset(group, name, **kwargs):
    del group[name]
    group.create_dataset(name, **kwargs)


HOSTILE_EDITS = {
    "byte_strings": (
        lambda f, g: replace_dataset(
            g, FACTOR, data=np.full((2, 18), b"xx", dtype="S2")
        ),
        "dtype \\|S2; expected floating point",
    ),
    "nan_factor": (
        lambda f, g: g[FACTOR].write_direct(np.full((2, 18), np.nan, "f4")),
        "non-finite",
    ),
    "merge_overflows": (
        lambda f, g: [
            g[name].write_direct(np.full(g[name].shape, 1e30, "f4"))
            for name in g
        ],
        "merged kernel.*non-finite",
    ),
    "missing_alpha": (
        lambda f, g: g.attrs.__delitem__("lora_alpha"),
        "bad attribute 'lora_alpha': expected a finite number > 0, found "
        "nothing",
    ),
    "text_rank": (
        lambda f, g: g.attrs.__setitem__("rank", "two"),
        "bad attribute 'rank': expected an integer, found 'two'",
    ),
    "array_targets": (
        lambda f, g: g.attrs.__setitem__("lora_targets", np.zeros(3)),
        "bad attribute 'lora_targets'.*non-scalar",
    ),
    "unknown_factor": (
        lambda f, g: g.create_dataset("extra", data=np.zeros(3)),
        "holds \\['extra'\\], which are not factors",
    ),
    "huge_wrong_shape": (
        lambda f, g: replace_dataset(
            g, FACTOR, shape=(20000, 20000), dtype="f4"
        ),
        "shape \\(20000, 20000\\)",
    ),
    "huge_unused": (
        lambda f, g: f.create_dataset("junk", shape=(20000, 20000), dtype="f4"),
        "unexpected dataset 'junk'",
    ),
    "external_link": (
        lambda f, g: g.__setitem__(
            "lora_link", h5py.ExternalLink("/etc/hostname", "/x")
        ),
        "link 'rnn/cell/lora_link'",
    ),
}


@pytest.mark.parametrize("edit", sorted(HOSTILE_EDITS))
def test_hostile_file_is_refused_before_the_model_is_touched(edit, tmp_path):
    import tracemalloc

    base, path = saved_adapter(tmp_path)
    change, match = HOSTILE_EDITS[edit]
    rewrite(path, change)
    assert path.stat().st_size < 100_000  # declared, never allocated
    target, before = merged_target(base)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match):
            keras_rnn_lora.load_lora_weights(target, path, strict=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"the loader allocated {peak / 2**20:.0f} MB"
    assert_untouched(target, before)


def test_a_good_file_still_loads_into_a_merged_model(tmp_path):
    base, path = saved_adapter(tmp_path)
    target, _ = merged_target(base)
    keras_rnn_lora.load_lora_weights(target, path)
    expected = trained_adapter(base, seed=1)
    np.testing.assert_allclose(
        to_numpy(target(x_batch(3))), to_numpy(expected(x_batch(3))), atol=1e-5
    )


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_adapter_files_respect_the_umask(umask, tmp_path):
    lora_model = trained_adapter(sequential_model())
    path = tmp_path / "a.lora.weights.h5"
    previous = os.umask(umask)
    try:
        keras_rnn_lora.save_lora_weights(lora_model, path)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# -- files are read from inside themselves, within bounds ---------------------


def _replace_with_outside_data(tmp_path, kind):
    """An adapter file whose factor is stored outside it: HDF5 external raw
    storage over a local file, or a virtual dataset over another file."""
    base, path = saved_adapter(tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(36, dtype="float32").tobytes())
    with h5py.File(path, "r+") as file:
        group = file["rnn/cell"]
        del group[FACTOR]
        if kind == "external":
            group.create_dataset(
                FACTOR,
                shape=(2, 18),
                dtype="float32",
                external=[(str(secret), 0, 36 * 4)],
            )
        else:
            other = tmp_path / "other.h5"
            with h5py.File(other, "w") as source:
                source.create_dataset("x", data=np.ones((2, 18), "float32"))
            layout = h5py.VirtualLayout(shape=(2, 18), dtype="float32")
            layout[:] = h5py.VirtualSource(str(other), "x", shape=(2, 18))
            group.create_virtual_dataset(FACTOR, layout)
    return base, path


@pytest.mark.parametrize("kind", ["external", "virtual"])
def test_factors_stored_outside_the_file_are_refused(kind, tmp_path):
    base, path = _replace_with_outside_data(tmp_path, kind)
    target, before = merged_target(base)
    with pytest.raises(ValueError, match="outside itself.*refusing"):
        keras_rnn_lora.load_lora_weights(target, path, strict=False)
    assert_untouched(target, before)


@pytest.mark.parametrize("where", ["group", "file"])
def test_an_oversized_attribute_is_refused_and_never_echoed(where, tmp_path):
    base, path = saved_adapter(tmp_path)
    huge = "x" * 2_000_000
    with h5py.File(path, "r+") as file:
        item = file["rnn/cell"] if where == "group" else file
        name = "class_name" if where == "group" else "format_version"
        item.attrs[name] = huge
    target, before = merged_target(base)
    with pytest.raises(ValueError, match="longer than 4096 bytes") as error:
        keras_rnn_lora.load_lora_weights(target, path)
    assert len(str(error.value)) < 1000
    assert_untouched(target, before)


def test_a_wrong_attribute_is_shown_cut_short(tmp_path):
    base, path = saved_adapter(tmp_path)
    with h5py.File(path, "r+") as file:
        file["rnn/cell"].attrs["class_name"] = "Y" * 3000
    with pytest.raises(ValueError, match="class_name='YYY") as error:
        keras_rnn_lora.load_lora_weights(merged_target(base)[0], path)
    assert "(3,002 characters)" in str(error.value)
    assert len(str(error.value)) < 1000


@pytest.mark.parametrize("version", [1, 99, "2"])
def test_an_unknown_format_version_is_refused(version, tmp_path):
    base, path = saved_adapter(tmp_path)
    with h5py.File(path, "r+") as file:
        file.attrs["format_version"] = version
    with pytest.raises(ValueError, match="format_version.*reads \\(2, 3\\)"):
        keras_rnn_lora.load_lora_weights(merged_target(base)[0], path)


def test_a_format_2_file_still_loads(tmp_path):
    base, path = saved_adapter(tmp_path)
    with h5py.File(path, "r+") as file:
        file.attrs["format_version"] = 2
        del file["rnn/cell"].attrs["lora_dropout"]
    loaded = keras_rnn_lora.load_lora_model(base, path)
    expected = trained_adapter(base, seed=1)
    np.testing.assert_allclose(
        to_numpy(loaded(x_batch(3))), to_numpy(expected(x_batch(3))), atol=1e-5
    )


def test_a_save_landing_during_a_load_never_mixes_two_files(tmp_path):
    """The file is read through one handle: a save that replaces it (by
    rename) while a load reads it changes nothing of what is loaded."""
    from keras_rnn_lora import adapter_file

    base = functional_model()
    path = tmp_path / "a.lora.weights.h5"
    first = trained_adapter(base, seed=1)
    keras_rnn_lora.save_lora_weights(first, path)
    second_path = tmp_path / "b.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(trained_adapter(base, seed=9), second_path)
    read = adapter_file.AdapterFile.factors
    swapped = []

    def factors_then_swap(self, header):
        values = read(self, header)
        if not swapped:  # after the first layer, the other save lands
            os.replace(second_path, path)
            swapped.append(True)
        return values

    target = trained_adapter(base, seed=30)
    try:
        adapter_file.AdapterFile.factors = factors_then_swap
        keras_rnn_lora.load_lora_weights(target, path)
    finally:
        adapter_file.AdapterFile.factors = read
    assert swapped
    np.testing.assert_allclose(
        to_numpy(target(x_batch(3))), to_numpy(first(x_batch(3))), atol=1e-5
    )


# -- one call from a base model and a file ------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"lora_targets": ("kernel", "recurrent", "dense"), "lora_alpha": 4.0},
        {"use_rslora": True, "lora_dropout": 0.1},
    ],
    ids=["default", "every_target", "rslora_dropout"],
)
def test_load_lora_model_sets_up_the_adapters_from_the_file(settings, tmp_path):
    base = functional_model()
    trained = keras_rnn_lora.enable_lora(base, rank=2, **settings)
    for i, adapter in enumerate(lora_adapters(trained).values()):
        randomize_lora(adapter, seed=i)
    path = tmp_path / "a.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(trained, path)
    loaded = keras_rnn_lora.load_lora_model(base, path)
    assert loaded is not base and not lora_adapters(base)
    assert {
        p: (type(a), a.lora_config) for p, a in lora_adapters(loaded).items()
    } == {
        p: (type(a), a.lora_config) for p, a in lora_adapters(trained).items()
    }
    np.testing.assert_allclose(
        to_numpy(loaded(x_batch(3))), to_numpy(trained(x_batch(3))), atol=1e-5
    )


def test_load_lora_model_refuses_what_does_not_fit(tmp_path):
    base, path = saved_adapter(tmp_path)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        keras_rnn_lora.load_lora_model(trained_adapter(base), path)
    retrained = sequential_model()
    randomize_weights(retrained, seed=5)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        keras_rnn_lora.load_lora_model(retrained, path)
    other = keras.Sequential(
        [keras.Input((5, 4)), keras.layers.GRU(6, name="other")], name="o"
    )
    with pytest.raises(
        ValueError, match="`layers`.*no layer named \\['rnn'\\]"
    ):
        keras_rnn_lora.load_lora_model(other, path)


def test_loading_into_a_model_without_adapters_points_to_load_lora_model(
    tmp_path,
):
    base, path = saved_adapter(tmp_path)
    for strict in (True, False):
        with pytest.raises(ValueError, match="`keras_rnn_lora.load_lora_model"):
            keras_rnn_lora.load_lora_weights(base, path, strict=strict)


def test_a_load_that_matches_nothing_is_an_error(tmp_path):
    _, path = saved_adapter(tmp_path)
    unrelated = keras_rnn_lora.enable_lora(functional_model(), rank=2)
    before = [to_numpy(w) for w in unrelated.weights]
    with pytest.raises(ValueError, match="matches no LoRA layer.*Nothing"):
        keras_rnn_lora.load_lora_weights(unrelated, path, strict=False)
    for b, w in zip(before, unrelated.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), b)
