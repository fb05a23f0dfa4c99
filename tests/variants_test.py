"""Tests for the LoRA variants on every adapter: DoRA, PiSSA and OLoRA
(keras_rnn_lora/variants.py, and the cells, layers, Keras-LoRA layers,
enable_lora, merging and adapter files that use them)."""

import keras
import numpy as np
import pytest
from cells_test import BATCH
from cells_test import CELLS
from cells_test import UNITS
from cells_test import sequences
from cells_test import small_model
from conftest import STOCK_CELLS
from conftest import gradients
from conftest import randomize_lora
from conftest import to_numpy
from example_models import functional_model
from example_models import x_batch
from fused_reference import patch_fused_kernels
from keras import ops

import keras_rnn_lora
from keras_rnn_lora import variants
from keras_rnn_lora.walk import lora_adapters

TARGETS = ("kernel", "recurrent")
KERNELS = {"kernel": "kernel", "recurrent": "recurrent_kernel"}
INITS = ("pissa", "olora")


def f64(value):
    return to_numpy(value).astype("float64")


def dora_formula(cell, target):
    """`m * (W + s*A@B) / column_norm(W + s*A@B)`, formed explicitly."""
    a, b = (f64(w) for w in cell.lora_factors(target))
    adapted = f64(cell.lora_kernel(target)) + cell.scaling * a @ b
    m = f64(cell.lora_magnitude(target))
    return adapted * m / np.linalg.norm(adapted, axis=0)


def stock_rnn(cell, kernels):
    """A stock cell in `keras.layers.RNN` with the given kernels."""
    stock = STOCK_CELLS[type(cell)](UNITS)
    rnn = keras.layers.RNN(stock, return_sequences=True)
    rnn(sequences())
    stock.kernel.assign(kernels["kernel"].astype("float32"))
    stock.recurrent_kernel.assign(kernels["recurrent"].astype("float32"))
    stock.bias.assign(to_numpy(cell.bias))
    return rnn


def dora_cell(cls, **kwargs):
    cell = cls(UNITS, rank=2, use_dora=True, lora_targets=TARGETS, **kwargs)
    rnn = keras.layers.RNN(cell, return_sequences=True)
    rnn(sequences())
    randomize_lora(cell)  # B != 0 and m far from the column norms
    for target in TARGETS:
        m = cell.lora_magnitude(target)
        m.assign(np.abs(to_numpy(m)) + 0.5)
    return cell, rnn


# -- DoRA ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_dora_step_is_the_formula_with_the_weight_formed(cls):
    cell, rnn = dora_cell(cls)
    expected = stock_rnn(cell, {t: dora_formula(cell, t) for t in TARGETS})
    x = sequences(3)
    np.testing.assert_allclose(
        to_numpy(rnn(x)), to_numpy(expected(x)), atol=1e-5
    )
    for target in TARGETS:
        np.testing.assert_allclose(
            to_numpy(cell.effective_kernel(target)),
            dora_formula(cell, target),
            atol=1e-5,
        )


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_dora_scale_is_computed_once_per_call_not_per_step(cls, monkeypatch):
    from keras_rnn_lora.merging import MergeableLoRA

    cell, rnn = dora_cell(cls)
    calls = []
    scale = MergeableLoRA.dora_scale

    def counted(self, target):
        calls.append(target)
        return scale(self, target)

    monkeypatch.setattr(MergeableLoRA, "dora_scale", counted)
    rnn(sequences(steps=7))
    assert sorted(calls) == sorted(TARGETS)  # one per target, 7 steps
    layer = keras_rnn_lora.LoRAGRU(UNITS, rank=2, use_dora=True)
    layer(sequences())
    calls.clear()
    layer(sequences(steps=7))
    assert calls == ["recurrent"]


def formed_column_norms(kernel, a, b, scaling):
    """The column norms of `W + s*A@B` with the kernel formed (what
    `variants.column_norms_by_blocks` computes one block at a time)."""
    adapted = ops.cast(kernel, "float32") + scaling * ops.matmul(
        ops.cast(a, "float32"), ops.cast(b, "float32")
    )
    axes = tuple(range(len(adapted.shape) - 1))
    return ops.sqrt(ops.sum(ops.square(adapted), axis=axes))


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_column_norms_by_blocks_are_the_formed_kernels(
    shape, dtype, monkeypatch
):
    monkeypatch.setattr(variants, "BLOCK_VALUES", 9)  # blocks of one row
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=shape)
    a = rng.normal(size=(*shape[:-1], 2))
    b = rng.normal(size=(2, shape[-1]))
    kernel_in = ops.convert_to_tensor(kernel.astype("float32"), dtype)
    got = variants.column_norms_by_blocks(
        kernel_in, a.astype("float32"), b.astype("float32"), 0.7
    )
    kernel = to_numpy(ops.cast(kernel_in, "float32")).astype("float64")
    adapted = (kernel + 0.7 * a @ b).reshape(-1, shape[-1])
    assert to_numpy(got).dtype == np.float32
    np.testing.assert_allclose(
        to_numpy(got), np.linalg.norm(adapted, axis=0), rtol=1e-5
    )


def test_column_norms_hold_where_the_adapter_nearly_cancels_a_column():
    # A = W's first column, s*B[0, 0] = -(1 - 1e-4): that column of
    # W + s*A@B is 1e-4 of W's. Expanding |W_j + s*A B_j|^2 into separate
    # terms loses it to rounding (the result could even floor to zero).
    rng = np.random.default_rng(4)
    kernel = rng.normal(size=(64, 2)).astype("float32")
    a = kernel[:, :1].copy()
    b = np.array([[-(1 - 1e-4), 0.3]], "float32")
    got = to_numpy(variants.column_norms_by_blocks(kernel, a, b, 1.0))
    adapted = kernel.astype("float64") + a.astype("float64") @ b
    np.testing.assert_allclose(got, np.linalg.norm(adapted, axis=0), rtol=1e-2)


def dora_model_gradients(cls, monkeypatch, zero_column=False):
    cell = cls(UNITS, rank=2, use_dora=True, lora_targets=TARGETS)
    model = small_model(cell)
    if zero_column:  # a dead unit: a fresh adapter's column is all zero
        for target in TARGETS:
            kernel = cell.lora_kernel(target)
            value = to_numpy(kernel)
            value[:, 0] = 0.0
            kernel.assign(value)
            cell.initialize_from_base()
    else:
        randomize_lora(cell)
    x, y = sequences(), np.ones((BATCH, 2), "float32")
    names = [w.name for w in model.trainable_weights]
    by_blocks = dict(zip(names, gradients(model, x, y), strict=True))
    monkeypatch.setattr(variants, "column_norms_by_blocks", formed_column_norms)
    formed = dict(zip(names, gradients(model, x, y), strict=True))
    return by_blocks, formed


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_dora_gradients_are_those_of_the_formed_kernel(cls, monkeypatch):
    monkeypatch.setattr(variants, "BLOCK_VALUES", 2 * 3 * UNITS)
    by_blocks, formed = dora_model_gradients(cls, monkeypatch)
    assert any("magnitude" in name for name in by_blocks)
    for name, value in by_blocks.items():
        assert np.abs(value).max() > 0, name
        np.testing.assert_allclose(
            value, formed[name], rtol=1e-4, atol=1e-6, err_msg=name
        )


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_dora_gradients_stay_finite_at_a_zero_column(cls, monkeypatch):
    by_blocks, _ = dora_model_gradients(cls, monkeypatch, zero_column=True)
    for name, value in by_blocks.items():
        assert np.isfinite(value).all(), name


@pytest.mark.parametrize("init", ["default", *INITS])
def test_a_fresh_variant_adapter_leaves_the_model_unchanged(init):
    base = functional_model()
    x = x_batch(2)
    for kwargs in ({"lora_init": init}, {"lora_init": init, "use_dora": True}):
        lora_model = keras_rnn_lora.enable_lora(
            base,
            rank=2,
            lora_targets=("kernel", "recurrent", "dense"),
            **kwargs,
        )
        np.testing.assert_allclose(
            to_numpy(lora_model(x)), to_numpy(base(x)), atol=1e-5
        )


def test_dora_magnitude_starts_at_the_column_norms():
    base = functional_model()
    lora_model = keras_rnn_lora.enable_lora(base, rank=2, use_dora=True)
    cell = lora_adapters(lora_model)["gru/cell"]
    np.testing.assert_allclose(
        to_numpy(cell.lora_magnitude("recurrent")),
        np.linalg.norm(
            to_numpy(base.get_layer("gru").cell.recurrent_kernel), axis=0
        ),
        rtol=1e-6,
    )


@pytest.mark.parametrize("layer", ["dense", "einsum_dense"])
def test_dora_on_keras_own_lora_layers_is_the_formula(layer):
    if layer == "dense":
        adapter = keras_rnn_lora.LoRADense(5, rank=2, use_dora=True)
    else:
        adapter = keras_rnn_lora.LoRAEinsumDense(
            "ab,bc->ac", 5, rank=2, use_dora=True
        )
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    adapter(x)
    randomize_lora(adapter)
    m = adapter.lora_magnitude()
    m.assign(np.abs(to_numpy(m)) + 0.5)
    expected = x.astype("float64") @ dora_formula(adapter, "kernel")
    if getattr(adapter, "bias", None) is not None:
        expected += f64(adapter.bias)
    np.testing.assert_allclose(to_numpy(adapter(x)), expected, atol=1e-5)


def test_dora_on_an_embedding_is_refused():
    with pytest.raises(
        ValueError, match="`use_dora`, expected False.*Embedding"
    ):
        keras_rnn_lora.LoRAEmbedding(10, 4, rank=2, use_dora=True)
    inputs = keras.Input((3,), dtype="int32")
    model = keras.Model(
        inputs, keras.layers.Embedding(10, 4, name="emb")(inputs)
    )
    with pytest.raises(ValueError, match="Layer 'emb':.*`use_dora`"):
        keras_rnn_lora.enable_lora(
            model, rank=2, lora_targets="embedding", use_dora=True
        )


# -- PiSSA and OLoRA ----------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_principal_init_keeps_the_outputs_and_the_kernel(cls, init):
    """The frozen kernel is the residual: residual + s*A@B is the original
    kernel, and the outputs are unchanged at initialization."""
    stock = STOCK_CELLS[cls](UNITS)
    stock_layer = keras.layers.RNN(stock, return_sequences=True)
    x = sequences(4)
    expected = to_numpy(stock_layer(x))
    cell = cls.from_cell(stock, rank=2, lora_init=init, lora_targets=TARGETS)
    rnn = keras.layers.RNN(cell, return_sequences=True)
    rnn(x)
    cell.initialize_from_base()  # from_cell copied the weights after build
    for target in TARGETS:
        a, b = (f64(w) for w in cell.lora_factors(target))
        assert np.abs(b).max() > 0  # not B = 0: the leading part
        original = f64(getattr(stock, KERNELS[target]))
        np.testing.assert_allclose(
            f64(cell.lora_kernel(target)) + cell.scaling * a @ b,
            original,
            atol=1e-5,
        )
    np.testing.assert_allclose(to_numpy(rnn(x)), expected, atol=1e-5)


def test_pissa_takes_the_top_singular_vectors():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(6, 12))
    a, b = variants.principal_factors(kernel, 2, 0.5, "pissa")
    u, s, vt = np.linalg.svd(kernel, full_matrices=False)
    np.testing.assert_allclose(
        0.5 * a.astype("float64") @ b, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5
    )
    q, r = np.linalg.qr(kernel)
    a, b = variants.principal_factors(kernel, 2, 0.5, "olora")
    np.testing.assert_allclose(a, q[:, :2], atol=1e-6)
    np.testing.assert_allclose(b, r[:2], atol=1e-6)


@pytest.mark.parametrize("init", INITS)
def test_enable_lora_decomposes_each_trained_kernel_once(init, monkeypatch):
    """Not the random kernel the new layer is built with as well: that SVD
    was thrown away (twice the conversion time at hidden 2048)."""
    calls = []
    decompose = variants.principal_factors

    def counted(kernel, *args):
        calls.append(np.asarray(kernel).shape)
        return decompose(kernel, *args)

    monkeypatch.setattr(variants, "principal_factors", counted)
    inputs = keras.Input((5, 3))
    outputs = keras.layers.GRU(UNITS, name="gru")(inputs)
    base = keras.Model(inputs, outputs)
    lora_model = keras_rnn_lora.enable_lora(
        base, rank=2, lora_init=init, lora_targets=TARGETS
    )
    assert len(calls) == len(TARGETS)
    np.testing.assert_allclose(
        to_numpy(lora_model(np.ones((2, 5, 3), "float32"))),
        to_numpy(base(np.ones((2, 5, 3), "float32"))),
        atol=1e-5,
    )


def test_principal_init_pads_a_kernel_narrower_than_the_rank():
    kernel = np.random.default_rng(1).normal(size=(2, 9))
    for init in INITS:
        a, b = variants.principal_factors(kernel, 4, 1.0, init)
        assert a.shape == (2, 4) and b.shape == (4, 9)
        np.testing.assert_allclose(a.astype("float64") @ b, kernel, atol=1e-5)


# -- merging, saving, adapter files, to_base_model ----------------------------

VARIANTS = [
    {"use_dora": True},
    {"lora_init": "pissa"},
    {"lora_init": "olora", "use_dora": True},
]
VARIANT_IDS = ["dora", "pissa", "olora+dora"]


def trained_variant(base, settings, seed=0):
    lora_model = keras_rnn_lora.enable_lora(
        base, rank=2, lora_targets=("kernel", "recurrent", "dense"), **settings
    )
    for i, adapter in enumerate(lora_adapters(lora_model).values()):
        randomize_lora(adapter, seed=seed + i, scale=0.2)
        magnitude = adapter.lora_magnitude(adapter.lora_targets[0])
        if magnitude is not None:
            magnitude.assign(np.abs(to_numpy(magnitude)) + 0.3)
    return lora_model


@pytest.mark.parametrize("settings", VARIANTS, ids=VARIANT_IDS)
def test_merge_folds_the_variant_in_and_unmerge_restores_it(settings):
    lora_model = trained_variant(functional_model(), settings)
    x = x_batch(3)
    before = [to_numpy(w) for w in lora_model.weights]
    expected = to_numpy(lora_model(x))
    keras_rnn_lora.merge_lora(lora_model)
    np.testing.assert_allclose(to_numpy(lora_model(x)), expected, atol=1e-5)
    stock = keras_rnn_lora.to_base_model(lora_model)
    np.testing.assert_allclose(to_numpy(stock(x)), expected, atol=1e-5)
    keras_rnn_lora.unmerge_lora(lora_model)
    for b, w in zip(before, lora_model.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), b)
    keras_rnn_lora.merge_lora(lora_model, reset=True)
    np.testing.assert_allclose(to_numpy(lora_model(x)), expected, atol=1e-5)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("settings", VARIANTS, ids=VARIANT_IDS)
def test_keras_file_round_trip(settings, merged, tmp_path):
    lora_model = trained_variant(functional_model(), settings)
    if merged:
        keras_rnn_lora.merge_lora(lora_model)
    x = x_batch(3)
    lora_model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(
        to_numpy(loaded(x)), to_numpy(lora_model(x)), atol=1e-6
    )
    if merged:
        keras_rnn_lora.unmerge_lora(loaded)
        keras_rnn_lora.unmerge_lora(lora_model)
        for a, b in zip(lora_model.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


@pytest.mark.parametrize("settings", VARIANTS, ids=VARIANT_IDS)
def test_adapter_file_sets_the_variant_up_on_the_base(settings, tmp_path):
    base = functional_model()
    trained = trained_variant(base, settings)
    path = tmp_path / "v.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(trained, path)
    loaded = keras_rnn_lora.load_lora_model(base, path)
    x = x_batch(3)
    np.testing.assert_allclose(
        to_numpy(loaded(x)), to_numpy(trained(x)), atol=1e-5
    )
    # Into a twin with the same variant: loads; the file's factors win.
    twin = trained_variant(base, settings, seed=40)
    keras_rnn_lora.load_lora_weights(twin, path)
    np.testing.assert_allclose(
        to_numpy(twin(x)), to_numpy(trained(x)), atol=1e-5
    )


def test_a_principal_adapter_into_a_default_model_says_what_to_do(tmp_path):
    base = functional_model()
    path = tmp_path / "p.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(
        trained_variant(base, {"lora_init": "pissa"}), path
    )
    default = keras_rnn_lora.enable_lora(
        base, rank=2, lora_targets=("kernel", "recurrent", "dense")
    )
    with pytest.raises(
        ValueError, match="lora_init='pissa'.*`keras_rnn_lora.load_lora_model"
    ):
        keras_rnn_lora.load_lora_weights(default, path, strict=False)


def test_a_dora_adapter_into_a_plain_model_is_refused(tmp_path):
    base = functional_model()
    path = tmp_path / "d.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(
        trained_variant(base, {"use_dora": True}), path
    )
    plain = keras_rnn_lora.enable_lora(
        base, rank=2, lora_targets=("kernel", "recurrent", "dense")
    )
    with pytest.raises(ValueError, match="use_dora=True but the model's layer"):
        keras_rnn_lora.load_lora_weights(plain, path)


# -- the fused (cuDNN) path ---------------------------------------------------


@pytest.mark.parametrize(
    "cls", [keras_rnn_lora.LoRAGRU, keras_rnn_lora.LoRALSTM]
)
def test_the_fused_path_receives_the_dora_kernel(cls, monkeypatch):
    """On a GPU the fused kernel is handed `m * V / norm(V)`: emulated here
    by reference kernels that compute from what they are handed; the test
    fails when the column scale is dropped."""
    layer = cls(UNITS, rank=2, use_dora=True, lora_targets=TARGETS)
    layer.return_sequences = True
    x = x_batch(2)
    layer(x)
    randomize_lora(layer)
    for target in TARGETS:
        m = layer.cell.lora_magnitude(target)
        m.assign(np.abs(to_numpy(m)) + 0.5)
    expected = stock_rnn(
        layer.cell, {t: dora_formula(layer.cell, t) for t in TARGETS}
    )
    calls = patch_fused_kernels(monkeypatch)
    np.testing.assert_allclose(
        to_numpy(layer(x)), to_numpy(expected(x)), atol=1e-5
    )
    assert calls[cls.stock_class.__name__.lower()] > 0
    monkeypatch.setattr(
        type(layer.cell),
        "effective_kernel",
        lambda self, target: self.adapted_kernel(target),
    )
    assert np.abs(to_numpy(layer(x)) - to_numpy(expected(x))).max() > 1e-3


def test_variants_in_the_config_round_trip():
    cell = keras_rnn_lora.LoRAGRUCell(
        UNITS, rank=2, use_dora=True, lora_init="olora"
    )
    config = cell.get_config()
    assert config["use_dora"] is True and config["lora_init"] == "olora"
    clone = keras_rnn_lora.LoRAGRUCell.from_config(config)
    assert clone.get_config() == config
    layer = keras_rnn_lora.LoRALSTM(UNITS, rank=2, use_dora=True)
    assert layer.get_config()["use_dora"] is True
    assert keras_rnn_lora.LoRAConfig(rank=2, use_dora=True).use_dora


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"use_dora": 1}, "`use_dora`, expected a bool"),
        ({"lora_init": "svd"}, "`lora_init`, expected one of"),
    ],
)
def test_bad_variant_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_rnn_lora.LoRAConfig(rank=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        keras_rnn_lora.LoRAGRUCell(UNITS, rank=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        keras_rnn_lora.enable_lora(functional_model(), rank=2, **kwargs)
