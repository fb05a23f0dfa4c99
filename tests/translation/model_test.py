"""Tests for the Translator: structure, padding, training, LoRA on it."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import to_numpy
from translators import TGT_VOCAB
from translators import pad
from translators import random_batch
from translators import tiny_translator

import keras_rnn_lora
from keras_rnn_lora.translation import decoding
from keras_rnn_lora.translation import metrics
from keras_rnn_lora.walk import lora_cells


@pytest.mark.parametrize("cell", ["simple_rnn", "gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_more_padding_changes_nothing_real(cell, bidirectional):
    model = tiny_translator(
        cell=cell, num_layers=2, bidirectional_encoder=bidirectional
    )
    src, dec, out = random_batch()
    logits = to_numpy(model([src, dec]))
    assert logits.shape == (3, 6, TGT_VOCAB)
    padded = to_numpy(model([pad(src, 12), pad(dec, 9)]))
    real = out != 0
    np.testing.assert_allclose(padded[:, :6][real], logits[real], atol=1e-5)
    loss = metrics.MaskedSparseCrossEntropy()
    np.testing.assert_allclose(
        to_numpy(loss(out, logits)),
        to_numpy(loss(pad(out, 9), padded)),
        atol=1e-5,
    )


def test_lora_on_translator_trains_only_recurrent_factors():
    model = tiny_translator(num_layers=2)
    lora_model = keras_rnn_lora.enable_lora(model, rank=2)
    keras_rnn_lora.mark_only_lora_as_trainable(lora_model)
    trainable = [w.path.split("/") for w in lora_model.trainable_weights]
    assert len(trainable) == 8  # (encoder, decoder) x 2 layers x (A, B)
    for path in trainable:
        assert path[0] in {"encoder_0", "encoder_1", "decoder_0", "decoder_1"}
        assert path[-1] in {
            "lora_recurrent_kernel_a",
            "lora_recurrent_kernel_b",
        }
    src, dec, _ = random_batch(3)
    np.testing.assert_allclose(
        to_numpy(lora_model([src, dec])), to_numpy(model([src, dec])), atol=1e-5
    )
    decoded = decoding.greedy_decode(lora_model, src, max_length=4)
    assert to_numpy(decoded).shape == (3, 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"cell": "rnn"}, "`cell`.*cell='rnn'"),
        ({"attention": "dot"}, "`attention`.*attention='dot'"),
        ({"units": 0}, "`units`.*positive integer"),
        ({"units": 15, "bidirectional_encoder": True}, "`units`.*even"),
        ({"num_layers": 0}, "`num_layers`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_translator(**kwargs)


def test_fit_on_random_batch_lowers_loss():
    model = metrics.compile_translator(tiny_translator(), learning_rate=0.01)
    src, dec, out = random_batch(4, batch=8)
    history = model.fit([src, dec], out, epochs=5, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert set(history.history) >= {"loss", "accuracy", "perplexity"}
    keras.backend.clear_session()


DISTRIBUTED_FIT = """
import json, os
backend = os.environ["KERAS_BACKEND"]
if backend == "tensorflow":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
import keras
import numpy as np
from keras_rnn_lora.translation.metrics import compile_translator
from keras_rnn_lora.translation.model import build_translator

rng = np.random.default_rng(0)
src = rng.integers(4, 40, (64, 7)).astype("int32")
dec = rng.integers(4, 50, (64, 6)).astype("int32")
out = np.roll(dec, -1, axis=1)

def build():
    model = build_translator(40, 50, embedding_dim=8, units=16)
    return compile_translator(model, learning_rate=0.01)

if backend == "tensorflow":
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        model = build()
else:
    import jax
    assert len(jax.devices()) == 2, jax.devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = build()
history = model.fit([src, dec], out, batch_size=16, epochs=4, verbose=0)
print("LOSSES" + json.dumps(history.history["loss"]))
"""


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="Keras has no data-parallel distribution for the torch backend",
)
def test_training_runs_on_two_devices(tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        CUDA_VISIBLE_DEVICES="",
    )
    result = subprocess.run(
        [sys.executable, "-c", DISTRIBUTED_FIT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [x for x in result.stdout.splitlines() if x.startswith("LOSSES")]
    assert lines, result.stderr[-3000:]
    losses = json.loads(lines[0][len("LOSSES") :])
    assert losses[-1] < losses[0]


def test_compiled_translator_loads_after_importing_the_translation_package(
    tmp_path,
):
    """`import keras_rnn_lora.translation` registers the translator and the
    losses and metrics a compiled translator's `.keras` file names; `import
    keras_rnn_lora` alone imports nothing of the application."""
    model = metrics.compile_translator(tiny_translator())
    src, dec, out = random_batch(7)
    model.fit([src, dec], out, epochs=1, verbose=0)
    path = tmp_path / "translator.keras"
    model.save(path)
    script = (
        "import sys, keras, keras_rnn_lora\n"
        "print('APPLICATION', any(m.startswith('keras_rnn_lora.translation')"
        " for m in sys.modules))\n"
        "import keras_rnn_lora.translation\n"
        "model = keras.saving.load_model(sys.argv[1])\n"
        "print('LOSS', type(model.loss).__name__)\n"
        "print('CLASS', type(model).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        env=dict(os.environ, KERAS_BACKEND=keras.backend.backend()),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "APPLICATION False" in result.stdout, result.stderr[-2000:]
    assert "LOSS MaskedSparseCrossEntropy" in result.stdout
    assert "CLASS Translator" in result.stdout


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_lora_translator_takes_the_fused_path_with_the_adapter(
    cell, monkeypatch
):
    """On a (here emulated) GPU, encoder and decoder run the fused kernel
    with W + s*A@B: the same logits, factor gradients and greedy decoding as
    the step loop."""
    from conftest import gradients
    from conftest import randomize_lora
    from fused_reference import patch_fused_kernels

    model = keras_rnn_lora.enable_lora(
        tiny_translator(cell=cell), rank=2, lora_targets=("kernel", "recurrent")
    )
    for i, lora_cell in enumerate(lora_cells(model).values()):
        randomize_lora(lora_cell, seed=i)
    src, dec, out = random_batch(8)
    loss = metrics.MaskedSparseCrossEntropy()
    loop_logits = to_numpy(model([src, dec]))
    loop_grads = gradients(model, [src, dec], out, loss)
    loop_tokens = to_numpy(decoding.greedy_decode(model, src, max_length=5))
    calls = patch_fused_kernels(monkeypatch)
    np.testing.assert_allclose(
        to_numpy(model([src, dec])), loop_logits, atol=1e-5
    )
    assert calls[cell] == 2  # the masked encoder and the decoder
    for got, expected in zip(
        gradients(model, [src, dec], out, loss), loop_grads, strict=True
    ):
        np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_array_equal(
        to_numpy(decoding.greedy_decode(model, src, max_length=5)), loop_tokens
    )
    # The full-fine-tuning arm's stock layers take it too.
    calls.clear()
    tiny_translator(cell=cell)([src, dec])
    assert calls[cell] == 2


def test_dropout_only_in_training_and_checked():
    model = tiny_translator(dropout=0.3)
    names = [
        layer.name
        for sub in (model.encoder, model.decoder)
        for layer in sub.layers
        if isinstance(layer, keras.layers.Dropout)
    ]
    assert sorted(names) == [
        "attention_dropout",
        "encoder_output_dropout",
        "source_dropout",
        "target_dropout",
    ]
    src, dec, _ = random_batch(10)
    inference = to_numpy(model([src, dec]))
    np.testing.assert_array_equal(to_numpy(model([src, dec])), inference)
    assert np.abs(to_numpy(model([src, dec], training=True)) - inference).max()
    with pytest.raises(ValueError, match="`dropout`.*dropout=1.0"):
        tiny_translator(dropout=1.0)


def test_encode_and_decode_step_are_the_model_itself():
    """The step API runs the same sub-models as training: step by step it
    gives the full model's logits."""
    model = tiny_translator(cell="lstm", num_layers=2)
    src, dec, _ = random_batch(11)
    full = to_numpy(model([src, dec]))
    state = model.encode(src)
    assert set(state) == {"encoder_tokens", "encoder_outputs", "states"}
    assert len(state["states"]) == 4  # (h, c) for each of two layers
    for t in range(dec.shape[1]):
        logits, state = model.decode_step(dec[:, t], state)
        np.testing.assert_allclose(to_numpy(logits), full[:, t], atol=1e-5)
    config = model.get_config()
    clone = type(model).from_config(config)
    assert [w.shape for w in clone.weights] == [w.shape for w in model.weights]
