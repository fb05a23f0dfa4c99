"""Tests for the encoder-decoder translator: masking, metrics, decoding."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import iwslt_dir
from conftest import to_numpy

import keras_rnn_lora
from keras_rnn_lora import seq2seq
from keras_rnn_lora import text
from keras_rnn_lora.data import iwslt2017

SRC_VOCAB, TGT_VOCAB = 40, 50


def tiny_translator(**kwargs):
    kwargs = {"embedding_dim": 8, "units": 16, **kwargs}
    return seq2seq.build_translator(SRC_VOCAB, TGT_VOCAB, **kwargs)


def random_batch(seed=0, batch=3, src_len=7, tgt_len=6):
    rng = np.random.default_rng(seed)
    src = rng.integers(4, SRC_VOCAB, (batch, src_len)).astype("int32")
    dec = rng.integers(4, TGT_VOCAB, (batch, tgt_len)).astype("int32")
    dec[:, 0] = seq2seq.START_ID
    out = np.concatenate([dec[:, 1:], np.full((batch, 1), 3, "int32")], 1)
    src[0, 4:] = 0
    dec[1, 3:], out[1, 3:] = 0, 0
    return src, dec, out


def pad(array, width):
    return np.pad(array, ((0, 0), (0, width - array.shape[1])))


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
    loss = seq2seq.MaskedSparseCrossEntropy()
    np.testing.assert_allclose(
        to_numpy(loss(out, logits)),
        to_numpy(loss(pad(out, 9), padded)),
        atol=1e-5,
    )


def test_perplexity_and_accuracy_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, TGT_VOCAB)).astype("float32")
    targets = rng.integers(1, TGT_VOCAB, (2, 5)).astype("int32")
    targets[0, 3:] = 0
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token_nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    mask = targets != 0
    expected_ce = token_nll[mask].mean()
    perplexity = seq2seq.MaskedPerplexity()
    # Two updates of uneven size: the corpus value, not a mean of batches.
    perplexity.update_state(targets[:1], logits[:1])
    perplexity.update_state(targets[1:], logits[1:])
    np.testing.assert_allclose(
        float(to_numpy(perplexity.result())), np.exp(expected_ce), rtol=1e-5
    )
    loss = seq2seq.MaskedSparseCrossEntropy()
    np.testing.assert_allclose(
        float(to_numpy(loss(targets, logits))), expected_ce, rtol=1e-5
    )
    accuracy = seq2seq.MaskedAccuracy()
    accuracy.update_state(targets, logits)
    expected_acc = (logits.argmax(-1) == targets)[mask].mean()
    np.testing.assert_allclose(float(to_numpy(accuracy.result())), expected_acc)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_incremental_decoding_equals_rerunning_the_prefix(cell):
    model = tiny_translator(cell=cell, num_layers=2, bidirectional_encoder=True)
    src, _, _ = random_batch(2)
    steps = 6
    greedy = to_numpy(seq2seq.greedy_decode(model, src, max_length=steps))
    prefix = np.full((len(src), 1), seq2seq.START_ID, "int32")
    for _ in range(steps):
        logits = to_numpy(model([src, prefix]))
        next_tokens = logits[:, -1].argmax(-1).astype("int32")
        prefix = np.concatenate([prefix, next_tokens[:, None]], 1)
    rerun = prefix[:, 1:]
    for row, expected in zip(greedy, rerun, strict=True):
        stop = list(expected).index(3) + 1 if 3 in expected else steps
        np.testing.assert_array_equal(row[:stop], expected[:stop])
        assert (row[stop:] == 0).all()


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_beam_width_one_is_greedy_and_wider_beams_score_no_lower(cell):
    model = tiny_translator(cell=cell, num_layers=2, bidirectional_encoder=True)
    src = np.random.default_rng(5).integers(4, SRC_VOCAB, (6, 7))
    greedy, greedy_scores = seq2seq.greedy_decode(
        model, src.astype("int32"), max_length=8, return_scores=True
    )
    beam1, beam1_scores = seq2seq.beam_search(model, src, 1, max_length=8)
    np.testing.assert_array_equal(to_numpy(beam1), to_numpy(greedy))
    np.testing.assert_allclose(to_numpy(beam1_scores), to_numpy(greedy_scores))
    for width in (2, 4):
        _, scores = seq2seq.beam_search(model, src, width, max_length=8)
        assert (to_numpy(scores) >= to_numpy(greedy_scores) - 1e-5).all()
    with pytest.raises(ValueError, match="`beam_width`"):
        seq2seq.beam_search(model, src, 0)


def test_compiled_decoder_matches_eager_decoding():
    model = tiny_translator(cell="gru", num_layers=2)
    src = (
        np.random.default_rng(6).integers(4, SRC_VOCAB, (4, 7)).astype("int32")
    )
    for width in (1, 3):
        expected, expected_scores = seq2seq.beam_search(model, src, width, 6)
        decoder = seq2seq.compiled_decoder(
            model, beam_width=width, max_length=6
        )
        tokens, scores = decoder(src)
        np.testing.assert_array_equal(to_numpy(tokens), to_numpy(expected))
        np.testing.assert_allclose(
            to_numpy(scores), to_numpy(expected_scores), atol=1e-5
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
    decoded = seq2seq.greedy_decode(lora_model, src, max_length=4)
    assert to_numpy(decoded).shape == (3, 4)


def test_overfits_a_real_batch_and_greedy_reproduces_a_target(tmp_path):
    pairs = iwslt2017.read_pairs("train", iwslt_dir(), max_pairs=2000)
    src_tok, tgt_tok = text.get_tokenizers(pairs, str(tmp_path), vocab_size=600)
    batch_pairs = [p for p in pairs if len(p[0]) < 40 and len(p[1]) < 40][:8]
    dataset = text.make_translation_dataset(
        batch_pairs,
        src_tok,
        tgt_tok,
        batch_size=8,
        shuffle=False,
        bucket_boundaries=None,
    )
    model = seq2seq.build_translator(
        int(src_tok.vocabulary_size()),
        int(tgt_tok.vocabulary_size()),
        embedding_dim=32,
        units=64,
    )
    seq2seq.compile_translator(model, learning_rate=0.02)
    history = model.fit(dataset, epochs=120, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.2 * losses[0]
    translations = seq2seq.translate(
        model, [p[0] for p in batch_pairs], src_tok, tgt_tok, max_length=30
    )
    assert isinstance(translations, list) and len(translations) == 8
    assert (
        sum(t == p[1] for t, p in zip(translations, batch_pairs, strict=True))
        >= 1
    )
    assert seq2seq.translate(model, [], src_tok, tgt_tok) == []


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
    model = seq2seq.compile_translator(tiny_translator(), learning_rate=0.01)
    src, dec, out = random_batch(4, batch=8)
    history = model.fit([src, dec], out, epochs=5, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert set(history.history) >= {"loss", "accuracy", "perplexity"}
    keras.backend.clear_session()


def test_corpus_scores_with_sacrebleu():
    references = ["Das ist ein kleiner Test.", "Guten Morgen, Welt!"]
    perfect = seq2seq.corpus_scores(references, references)
    assert perfect["bleu"] == pytest.approx(100.0)
    assert perfect["chrf"] == pytest.approx(100.0)
    partial = seq2seq.corpus_scores(["Das ist ein Test.", "Morgen"], references)
    assert 0 < partial["bleu"] < 100 and 0 < partial["chrf"] < 100
    with pytest.raises(ValueError, match="2 `references`"):
        seq2seq.corpus_scores(["a"], references)


DISTRIBUTED_FIT = """
import os, sys
backend = os.environ["KERAS_BACKEND"]
if backend == "tensorflow":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
import os
import subprocess
import sys

import keras
import numpy as np
from keras_rnn_lora import seq2seq

rng = np.random.default_rng(0)
src = rng.integers(4, 40, (64, 7)).astype("int32")
dec = rng.integers(4, 50, (64, 6)).astype("int32")
out = np.roll(dec, -1, axis=1)

def build():
    model = seq2seq.build_translator(40, 50, embedding_dim=8, units=16)
    return seq2seq.compile_translator(model, learning_rate=0.01)

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
print("LOSSES", history.history["loss"])
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
    losses = eval(lines[0][len("LOSSES") :])  # a printed list of floats
    assert losses[-1] < losses[0]


def test_compiled_translator_loads_after_importing_the_package_alone(tmp_path):
    """`import keras_rnn_lora` registers the losses and metrics a compiled
    translator's `.keras` file names."""
    model = seq2seq.compile_translator(tiny_translator())
    src, dec, out = random_batch(7)
    model.fit([src, dec], out, epochs=1, verbose=0)
    path = tmp_path / "translator.keras"
    model.save(path)
    script = (
        "import sys, keras, keras_rnn_lora\n"
        "model = keras.saving.load_model(sys.argv[1])\n"
        "print('LOSS', type(model.loss).__name__)\n"
        "print('MODULES', 'keras_rnn_lora.text' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        env=dict(os.environ, KERAS_BACKEND=keras.backend.backend()),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "LOSS MaskedSparseCrossEntropy" in result.stdout, result.stderr[
        -2000:
    ]


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
    for i, lora_cell in enumerate(
        keras_rnn_lora.adapters.lora_cells(model).values()
    ):
        randomize_lora(lora_cell, seed=i)
    src, dec, out = random_batch(8)
    loss = seq2seq.MaskedSparseCrossEntropy()
    loop_logits = to_numpy(model([src, dec]))
    loop_grads = gradients(model, [src, dec], out, loss)
    loop_tokens = to_numpy(seq2seq.greedy_decode(model, src, max_length=5))
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
        to_numpy(seq2seq.greedy_decode(model, src, max_length=5)), loop_tokens
    )
    # The full-fine-tuning arm's stock layers take it too.
    calls.clear()
    tiny_translator(cell=cell)([src, dec])
    assert calls[cell] == 2
