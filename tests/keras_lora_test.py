"""Tests for LoRA on Dense, EinsumDense and Embedding through Keras' own
LoRA (keras_rnn_lora/keras_lora.py), alone and with recurrent adapters."""

import os
import subprocess
import sys
import textwrap

import h5py
import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import randomize_lora
from conftest import to_numpy

import keras_rnn_lora
from keras_rnn_lora import LoRADense
from keras_rnn_lora import LoRAEinsumDense
from keras_rnn_lora import LoRAEmbedding
from keras_rnn_lora.walk import lora_adapters

VOCAB, STEPS = 30, 5
ALL_TARGETS = ("recurrent", "kernel", "dense", "embedding")


def delta(layer):
    a, b = (to_numpy(w).astype("float64") for w in layer.lora_weights)
    return layer.scaling * (a @ b)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_dense_equals_stock_dense_with_merged_kernel(use_rslora):
    layer = LoRADense(6, rank=2, lora_alpha=3.0, use_rslora=use_rslora)
    x = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    layer(x)
    randomize_lora(layer)
    assert layer.scaling == pytest.approx(
        3.0 / (np.sqrt(2) if use_rslora else 2)
    )
    stock = keras.layers.Dense(6)
    stock(x)
    kernel = to_numpy(layer.lora_kernel()).astype("float64") + delta(layer)
    stock.set_weights([kernel.astype("float32"), to_numpy(layer.bias)])
    np.testing.assert_allclose(
        to_numpy(layer(x)), to_numpy(stock(x)), atol=1e-5
    )


def test_embedding_equals_stock_embedding_with_merged_table():
    layer = LoRAEmbedding(VOCAB, 6, rank=3)
    ids = np.random.default_rng(1).integers(0, VOCAB, (4, STEPS))
    layer(ids)
    randomize_lora(layer)
    stock = keras.layers.Embedding(VOCAB, 6)
    stock(ids)
    table = to_numpy(layer.lora_kernel()).astype("float64") + delta(layer)
    stock.set_weights([table.astype("float32")])
    np.testing.assert_allclose(
        to_numpy(layer(ids)), to_numpy(stock(ids)), atol=1e-5
    )


def test_einsum_dense_equals_stock_with_merged_kernel():
    args = ("abc,cde->abde", (STEPS, 2, 3))
    layer = LoRAEinsumDense(*args, rank=2, bias_axes="de")
    x = np.random.default_rng(2).normal(size=(4, STEPS, 5)).astype("float32")
    layer(x)
    randomize_lora(layer)
    stock = keras.layers.EinsumDense(*args, bias_axes="de")
    stock(x)
    kernel = to_numpy(layer.lora_kernel()).astype("float64")
    a, b = (to_numpy(w).astype("float64") for w in layer.lora_weights)
    kernel = kernel + layer.scaling * np.matmul(a, b)
    stock.set_weights([kernel.astype("float32"), to_numpy(layer.bias)])
    np.testing.assert_allclose(
        to_numpy(layer(x)), to_numpy(stock(x)), atol=1e-5
    )


def mixed_model():
    """Embedding, GRU and Dense: every kind of adapter in one model."""
    tokens = keras.Input((STEPS,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, 8, name="embed")(tokens)
    x = keras.layers.GRU(6, return_sequences=True, name="gru")(x)
    x = keras.layers.Dense(5, activation="tanh", name="hidden")(x)
    outputs = keras.layers.Dense(VOCAB, name="logits")(x)
    model = keras.Model(tokens, outputs, name="mixed")
    rng = np.random.default_rng(3)
    for w in model.weights:
        w.assign(rng.normal(size=w.shape).astype("float32") * 0.4)
    return model


def tokens_batch(seed=4, batch=8):
    return np.random.default_rng(seed).integers(1, VOCAB, (batch, STEPS))


def lora_mixed(**kwargs):
    model = keras_rnn_lora.enable_lora(
        mixed_model(), rank=2, lora_targets=ALL_TARGETS, **kwargs
    )
    for i, adapter in enumerate(lora_adapters(model).values()):
        randomize_lora(adapter, seed=i)
    return model


def test_enable_lora_targets_by_type_and_by_name():
    model = keras_rnn_lora.enable_lora(
        mixed_model(), rank=2, lora_targets=ALL_TARGETS
    )
    assert {p: type(a).__name__ for p, a in lora_adapters(model).items()} == {
        "embed": "LoRAEmbedding",
        "gru/cell": "LoRAGRUCell",
        "hidden": "LoRADense",
        "logits": "LoRADense",
    }
    assert lora_adapters(model)["gru/cell"].lora_targets == (
        "kernel",
        "recurrent",
    )
    x = tokens_batch()
    np.testing.assert_allclose(
        to_numpy(model(x)), to_numpy(mixed_model()(x)), atol=1e-5
    )
    only = keras_rnn_lora.enable_lora(
        mixed_model(), rank=2, lora_targets="dense", layers=["logits"]
    )
    assert sorted(lora_adapters(only)) == ["logits"]
    default = keras_rnn_lora.enable_lora(mixed_model(), rank=2)
    assert sorted(lora_adapters(default)) == ["gru/cell"]
    summary = keras_rnn_lora.lora_summary(model, print_fn=None)
    assert summary["layers"]["logits"] == {
        "class_name": "LoRADense",
        "rank": 2,
        "lora": 2 * 5 + 2 * VOCAB,
        "merged": False,
    }
    assert summary["lora"] == sum(r["lora"] for r in summary["layers"].values())


def test_fit_moves_only_the_factors():
    model = lora_mixed()
    keras_rnn_lora.mark_only_lora_as_trainable(model)
    factor_ids = {
        id(w) for a in lora_adapters(model).values() for w in a.lora_weights
    }
    assert {id(w) for w in model.trainable_weights} == factor_ids
    before = {w.path: to_numpy(w) for w in model.weights}
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(tokens_batch(), tokens_batch(5), epochs=2, verbose=0)
    for w in model.weights:
        changed = not np.array_equal(to_numpy(w), before[w.path])
        assert changed == (id(w) in factor_ids), w.path


def test_merge_unmerge_exact_and_refuses_non_finite():
    model = lora_mixed()
    x = tokens_batch()
    expected = to_numpy(model(x))
    before = [to_numpy(w) for w in model.weights]
    keras_rnn_lora.merge_lora(model)
    keras_rnn_lora.merge_lora(model)  # idempotent
    assert all(a.lora_merged for a in lora_adapters(model).values())
    np.testing.assert_allclose(to_numpy(model(x)), expected, atol=1e-5)
    keras_rnn_lora.unmerge_lora(model)
    for b, w in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), b)
    embed = lora_adapters(model)["embed"]
    b = to_numpy(embed.lora_weights[1])
    b[0, 0] = np.inf
    embed.lora_weights[1].assign(b)
    snapshot = [to_numpy(w) for w in model.weights]
    with pytest.raises(ValueError, match="Layer 'embed'.*non-finite"):
        keras_rnn_lora.merge_lora(model)
    for s, w in zip(snapshot, model.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), s)


def test_adapter_file_round_trip_and_refusals(tmp_path):
    base = mixed_model()
    model = keras_rnn_lora.enable_lora(base, rank=2, lora_targets=ALL_TARGETS)
    for i, adapter in enumerate(lora_adapters(model).values()):
        randomize_lora(adapter, seed=i)
    path = tmp_path / "mixed.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(model, path)
    fresh = keras_rnn_lora.enable_lora(base, rank=2, lora_targets=ALL_TARGETS)
    keras_rnn_lora.merge_lora(fresh)  # loads into a merged model too
    keras_rnn_lora.load_lora_weights(fresh, path)
    x = tokens_batch()
    np.testing.assert_allclose(
        to_numpy(fresh(x)), to_numpy(model(x)), atol=1e-5
    )
    other_rank = keras_rnn_lora.enable_lora(
        base, rank=3, lora_targets=ALL_TARGETS
    )
    with pytest.raises(ValueError, match="Layer 'embed'.*rank=2.*rank=3"):
        keras_rnn_lora.load_lora_weights(other_rank, path)
    narrower = keras_rnn_lora.enable_lora(base, rank=2)
    with pytest.raises(ValueError, match="for layer 'embed'"):
        keras_rnn_lora.load_lora_weights(narrower, path)


def test_keras_file_keeps_the_adapter_apart(tmp_path):
    """Keras alone folds a Dense adapter into the kernel on save and zeroes
    it on load; these layers keep base and factors apart, merged or not."""
    model = lora_mixed()
    keras_rnn_lora.merge_lora(model)
    x = tokens_batch()
    expected = to_numpy(model(x))
    path = tmp_path / "mixed.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(to_numpy(loaded(x)), expected)
    keras_rnn_lora.unmerge_lora(model)
    keras_rnn_lora.unmerge_lora(loaded)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    factors = lora_adapters(loaded)["logits"].lora_weights
    assert np.abs(to_numpy(factors[1])).max() > 0


def test_to_base_model_loads_without_this_library(tmp_path):
    model = lora_mixed()
    base = keras_rnn_lora.to_base_model(model)
    assert not lora_adapters(base)
    assert type(base.get_layer("logits")) is keras.layers.Dense
    assert type(base.get_layer("embed")) is keras.layers.Embedding
    x = tokens_batch()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", to_numpy(model(x)))
    base.save(tmp_path / "base.keras")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["keras_rnn_lora"] = None  # importing it now fails
        import keras, numpy as np
        model = keras.saving.load_model({str(tmp_path / "base.keras")!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        expected = np.load({str(tmp_path / "expected.npy")!r})
        got = keras.ops.convert_to_numpy(model(x))
        np.testing.assert_allclose(got, expected, atol=1e-5)
        print("loaded-ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, KERAS_BACKEND=BACKEND, PYTHONPATH=""),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "loaded-ok" in result.stdout, result.stderr[-2000:]


def test_bfloat16_base_keeps_keras_factors_float32():
    model = keras_rnn_lora.enable_lora(
        mixed_model(),
        rank=2,
        lora_targets=ALL_TARGETS,
        base_dtype="bfloat16",
    )
    for adapter in lora_adapters(model).values():
        assert adapter.lora_kernel("kernel").dtype == "bfloat16"
        assert all(w.dtype == "float32" for w in adapter.lora_weights)
    keras_rnn_lora.mark_only_lora_as_trainable(model)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(tokens_batch(), tokens_batch(5), epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="`lora_dropout`, expected 0"):
        LoRADense(4, rank=2, lora_dropout=0.1)
    with pytest.raises(ValueError, match="`lora_targets`"):
        LoRADense(4, rank=2, lora_targets="recurrent")
    with pytest.raises(ValueError, match="pass `rank`, not Keras' `lora_rank`"):
        LoRADense(4, rank=2, lora_rank=2)
    with pytest.raises(ValueError, match="`lora_dropout`, expected 0 with"):
        keras_rnn_lora.enable_lora(
            mixed_model(), rank=2, lora_targets="dense", lora_dropout=0.1
        )
    with pytest.raises(ValueError, match="`lora_targets`"):
        keras_rnn_lora.LoRAGRUCell(4, rank=2, lora_targets="dense")
    inputs = keras.Input((STEPS, 4))
    conv = keras.layers.Conv1D(3, 2, name="conv")
    outputs = keras.layers.GRU(3)(conv(inputs))
    conv.enable_lora(2)
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match="'conv' \\(Conv1D\\) has Keras' own"):
        keras_rnn_lora.enable_lora(model, rank=2)


@pytest.mark.parametrize("targets", [("recurrent",), ("recurrent", "dense")])
def test_keras_own_lora_is_adopted_as_an_adapter(targets, tmp_path):
    """A Dense whose Keras LoRA was enabled before `enable_lora` keeps its
    factors, trains them after `mark_only_lora_as_trainable`, and its
    adapter goes into the adapter file."""
    inputs = keras.Input((STEPS, 4))
    hidden = keras.layers.GRU(5, name="gru")(inputs)
    head = keras.layers.Dense(3, name="head")
    model = keras.Model(inputs, head(hidden))
    head.enable_lora(2, lora_alpha=4)
    rng = np.random.default_rng(0)
    for weight in (head.lora_kernel_a, head.lora_kernel_b):
        weight.assign(rng.normal(size=weight.shape).astype("float32"))
    x = np.random.default_rng(1).normal(size=(2, STEPS, 4)).astype("float32")
    expected = to_numpy(model(x))
    lora_model = keras_rnn_lora.enable_lora(model, rank=2, lora_targets=targets)
    adopted = lora_adapters(lora_model)["head"]
    assert isinstance(adopted, LoRADense)
    assert adopted.rank == 2 and adopted.scaling == 2.0
    np.testing.assert_allclose(to_numpy(lora_model(x)), expected, atol=1e-5)
    keras_rnn_lora.mark_only_lora_as_trainable(lora_model)
    assert {id(w) for w in adopted.lora_weights} <= {
        id(w) for w in lora_model.trainable_weights
    }
    path = tmp_path / "a.lora.weights.h5"
    keras_rnn_lora.save_lora_weights(lora_model, path)
    with h5py.File(path) as file:
        assert "head" in file
