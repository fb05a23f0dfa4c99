"""Tests for the TF Serving export (TensorFlow backend; other backends export
through a TensorFlow-backend subprocess)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import BACKEND
from translators import train_tokenizers
from translators import translator_for

import keras_rnn_lora
from keras_rnn_lora.translation import evaluation
from keras_rnn_lora.translation import export
from keras_rnn_lora.translation import serving_versions
from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor
from keras_rnn_lora.walk import iter_layers
from keras_rnn_lora.walk import lora_cells

# Tests of the SavedModel itself run once; exports from JAX or torch models
# (through a TensorFlow-backend child process) are covered by the others.
tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="checks of the exported graph itself run on tensorflow only",
)
SENTENCES = ["Thank you so much, Chris.", "And it's truly a great honor."]
MAX_LENGTH = 12


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tokenizers"))
    return train_tokenizers(directory, 2000, 600, MAX_LENGTH)


def with_length(preprocessor, max_length):
    """The same tokenizers with another `max_length`."""
    return TranslationPreprocessor(
        preprocessor.source_proto, preprocessor.target_proto, max_length
    )


@pytest.fixture
def translator(tokenizer_dir):
    """A small LoRA translator with non-zero factors, and its preprocessor."""
    preprocessor = TranslationPreprocessor.load(tokenizer_dir)
    model = keras_rnn_lora.enable_lora(translator_for(preprocessor), rank=2)
    rng = np.random.default_rng(0)
    for cell in lora_cells(model).values():
        for w in cell.lora_weights:
            w.assign(rng.normal(size=w.shape).astype("float32") * 0.3)
    return model, preprocessor


LOAD_AND_TRANSLATE = """
import json, sys
sys.modules["keras_rnn_lora"] = None  # importing it would fail here
import tensorflow as tf
import tensorflow_text  # registers the SentencePiece ops
loaded = tf.saved_model.load(sys.argv[1])
inputs = json.loads(sys.argv[2])
out = loaded.signatures["serving_default"](text=tf.constant(inputs))
print("RESULT" + json.dumps([t.decode() for t in out["translation"].numpy()]))
"""


def run_python(script, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_export_serves_same_translations_in_a_clean_process(
    translator, tmp_path
):
    model, preprocessor = translator
    path = export.export_translator(model, preprocessor, tmp_path / "serving")
    assert path == str(tmp_path / "serving" / "iwslt_en_de" / "1")
    expected = evaluation.translate(model, preprocessor, SENTENCES)
    stdout = run_python(
        LOAD_AND_TRANSLATE, path, json.dumps(SENTENCES), cwd=tmp_path
    )
    got = json.loads(stdout.split("RESULT", 1)[1])
    assert got == expected
    # The model given is left as it was: still LoRA, still unmerged.
    cells = lora_cells(model).values()
    assert cells and not any(c.lora_merged for c in cells)


CHECK_GRAPH = """
import json, sys
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry
proto = saved_model_pb2.SavedModel()
proto.ParseFromString(open(sys.argv[1] + "/saved_model.pb", "rb").read())
ops = set()
for graph in proto.meta_graphs:
    ops |= {node.op for node in graph.graph_def.node}
    for function in graph.graph_def.library.function:
        ops |= {node.op for node in function.node_def}
function_names = {
    f.signature.name
    for g in proto.meta_graphs
    for f in g.graph_def.library.function
}
print("NONCORE" + json.dumps(sorted(
    op for op in ops
    if op not in function_names and op_def_registry.get(op) is None
)))
"""


@tensorflow_only
def test_signatures_and_ops_are_servable(translator, tmp_path):
    model, preprocessor = translator
    path = export.export_translator(model, preprocessor, tmp_path)
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run(
        [cli, "show", "--dir", path, "--all"],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    default = shown.split("signature_def['serving_default']")[1]
    default = default.split("signature_def[")[0]
    assert "inputs['text'] tensor_info:" in default
    assert "dtype: DT_STRING" in default and "shape: (-1)" in default
    assert "outputs['translation'] tensor_info:" in default
    tokens = shown.split("signature_def['translate_tokens']")[1]
    assert "inputs['tokens']" in tokens and "dtype: DT_INT32" in tokens
    assert "shape: (-1, -1)" in tokens
    assert f"shape: (-1, {MAX_LENGTH})" in tokens
    # Every op is core TensorFlow (known without tensorflow_text loaded)
    # or one of the TF Text SentencePiece ops TF Serving links in.
    stdout = run_python(CHECK_GRAPH, path, cwd=tmp_path)
    noncore = json.loads(stdout.split("NONCORE", 1)[1])
    assert set(noncore) <= set(export.TF_TEXT_OPS), noncore


@tensorflow_only
def test_export_after_seeding(translator, tmp_path):
    import tensorflow as tf

    model, preprocessor = translator
    keras.utils.set_random_seed(5)  # clears TensorFlow's resources
    path = export.export_translator(model, preprocessor, tmp_path)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    out = serve(text=tf.constant(SENTENCES))["translation"].numpy()
    expected = evaluation.translate(model, preprocessor, SENTENCES)
    assert [t.decode() for t in out] == expected


@tensorflow_only
def test_warmup_and_hostile_inputs(translator, tmp_path):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    model, preprocessor = translator
    path = export.export_translator(model, preprocessor, tmp_path)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    warmup = os.path.join(path, "assets.extra", "tf_serving_warmup_requests")
    records = list(tf.data.TFRecordDataset(warmup))
    assert records
    for record in records:
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        inputs = tf.make_ndarray(request.inputs["text"])
        out = serve(text=tf.constant(inputs))["translation"]
        assert out.shape == inputs.shape
    hostile = [
        "",
        "   \t ",
        "word " * 2000,
        "Grüße aus Köln 🙂 — ∑ 你好",
        b"\xff\xfe\x00 broken utf-8 \xc3",
    ]
    out = serve(text=tf.constant(hostile))["translation"].numpy()
    assert out.shape == (5,)
    assert all(isinstance(t, bytes) for t in out)
    empty = serve(text=tf.constant([], tf.string))["translation"]
    assert empty.shape == (0,)
    tokens = tf.saved_model.load(path).signatures["translate_tokens"]
    ids = tokens(tokens=tf.constant([[5, 6, 7, 0]], tf.int32))["tokens"]
    assert ids.shape == (1, MAX_LENGTH)


def test_versions_and_refusal_to_overwrite(translator, tmp_path):
    model, preprocessor = translator
    first = export.export_translator(
        model, with_length(preprocessor, 4), tmp_path
    )
    second = export.export_translator(
        model, with_length(preprocessor, 4), tmp_path
    )
    assert [os.path.basename(p) for p in (first, second)] == ["1", "2"]
    stamp = os.stat(os.path.join(first, "saved_model.pb")).st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.export_translator(
            model, with_length(preprocessor, 4), tmp_path, version=1
        )
    assert os.stat(os.path.join(first, "saved_model.pb")).st_mtime_ns == stamp
    again = export.export_translator(
        model, with_length(preprocessor, 4), tmp_path, version=1, overwrite=True
    )
    assert again == first
    assert sorted(os.listdir(tmp_path / "iwslt_en_de")) == ["1", "2"]
    with pytest.raises(ValueError, match="`max_length`"):
        export.export_translator(model, with_length(preprocessor, 1), tmp_path)


def test_interrupted_export_leaves_no_version(
    translator, tmp_path, monkeypatch
):
    model, preprocessor = translator

    def crash(path, name):
        os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
        raise OSError("disk full while writing the warmup file")

    if BACKEND == "tensorflow":
        monkeypatch.setattr(export, "_write_warmup", crash)
    else:  # the export runs in a child process: make the child fail
        monkeypatch.setenv("KERAS_BACKEND_FOR_EXPORT_TEST", "1")
        monkeypatch.setattr(
            export,
            "_write_in_tensorflow_process",
            lambda *a: (_ for _ in ()).throw(OSError("child failed")),
        )
    with pytest.raises(OSError):
        export.export_translator(model, with_length(preprocessor, 4), tmp_path)
    assert os.listdir(tmp_path / "iwslt_en_de") == []
    keras.backend.clear_session()


SERVER = textwrap.dedent(
    """
    import json, sys, threading
    from http.server import BaseHTTPRequestHandler, HTTPServer
    import tensorflow as tf
    import tensorflow_text
    serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            # TF Serving's REST predict API, row format, one named input.
            assert self.path == "/v1/models/iwslt_en_de:predict", self.path
            size = int(self.headers["Content-Length"])
            body = json.loads(self.rfile.read(size))
            texts = [row["text"] if isinstance(row, dict) else row
                     for row in body["instances"]]
            out = serve(text=tf.constant(texts, tf.string))["translation"]
            reply = {"predictions": [t.decode() for t in out.numpy()]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_port, flush=True)
    server.serve_forever()
    """
)


@tensorflow_only
def test_serving_client_rest_request(translator, tmp_path):
    model, preprocessor = translator
    path = export.export_translator(model, preprocessor, tmp_path)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, path],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(server.stdout.readline())
        client = os.path.join(
            os.path.dirname(__file__),
            "..",
            "..",
            "examples",
            "serving_client.py",
        )
        result = subprocess.run(
            [
                sys.executable,
                client,
                "--rest",
                f"http://127.0.0.1:{port}",
                *SENTENCES,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.kill()
    assert result.returncode == 0, result.stderr[-2000:]
    expected = evaluation.translate(model, preprocessor, SENTENCES)
    for sentence, translation in zip(SENTENCES, expected, strict=True):
        assert f"{sentence}\n  -> {translation}" in result.stdout


# -- versions under concurrency, interrupted overwrites, stale folders --------


def dead_pid():
    process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
    )
    return int(process.stdout)


def published(path, marker):
    os.makedirs(path)
    with open(os.path.join(path, "saved_model.pb"), "w") as file:
        file.write(marker)


def test_concurrent_export_takes_the_next_version(
    translator, tmp_path, monkeypatch
):
    """Another export publishes version 1 while this one is writing: this
    one takes 2 and version 1 stays the other's."""
    model, preprocessor = translator
    model_dir = tmp_path / "iwslt_en_de"
    writer = (
        "write_savedmodel"
        if BACKEND == "tensorflow"
        else "_write_in_tensorflow_process"
    )
    real_write = getattr(export, writer)

    def write_while_another_publishes(*args):
        real_write(*args)
        published(model_dir / "1", "the other export")

    monkeypatch.setattr(export, writer, write_while_another_publishes)
    path = export.export_translator(
        model, with_length(preprocessor, 4), tmp_path
    )
    assert path == str(model_dir / "2")
    assert (model_dir / "1" / "saved_model.pb").read_text() == (
        "the other export"
    )
    # An explicit version that another export took meanwhile is refused.
    monkeypatch.setattr(
        export,
        writer,
        lambda *args: (real_write(*args), published(model_dir / "3", "x")),
    )
    with pytest.raises(FileExistsError, match="3 already exists"):
        export.export_translator(
            model, with_length(preprocessor, 4), tmp_path, version=3
        )
    assert (model_dir / "3" / "saved_model.pb").read_text() == "x"
    assert sorted(os.listdir(model_dir)) == ["1", "2", "3"]


def test_failed_overwrite_keeps_the_old_version(
    translator, tmp_path, monkeypatch
):
    model, preprocessor = translator
    first = export.export_translator(
        model, with_length(preprocessor, 4), tmp_path
    )
    before = open(os.path.join(first, "saved_model.pb"), "rb").read()
    real_rename = os.rename

    def fail_second_rename(source, target):
        if os.path.basename(source) == "export":
            raise OSError("disk failure between the two renames")
        real_rename(source, target)

    monkeypatch.setattr(serving_versions.os, "rename", fail_second_rename)
    with pytest.raises(OSError, match="between the two renames"):
        export.export_translator(
            model,
            with_length(preprocessor, 4),
            tmp_path,
            version=1,
            overwrite=True,
        )
    monkeypatch.undo()
    assert open(os.path.join(first, "saved_model.pb"), "rb").read() == before
    assert os.listdir(tmp_path / "iwslt_en_de") == ["1"]


def test_next_export_recovers_a_killed_overwrite_and_stale_staging(
    translator, tmp_path
):
    """A process killed between the two renames of an overwrite left its
    old version in a hidden folder and no version 1; another left a staging
    folder. The next export puts version 1 back and takes number 2."""
    model, preprocessor = translator
    model_dir = tmp_path / "iwslt_en_de"
    host, pid = socket.gethostname(), dead_pid()
    published(model_dir / f".old-{host}-{pid}-v1", "old version 1")
    published(model_dir / f".tmp-{host}-{pid}-abc123" / "export", "partial")
    alive = model_dir / f".tmp-{host}-{os.getpid()}-live"
    published(alive, "an export in progress in a live process")
    path = export.export_translator(
        model, with_length(preprocessor, 4), tmp_path
    )
    assert path == str(model_dir / "2")
    assert (model_dir / "1" / "saved_model.pb").read_text() == "old version 1"
    assert sorted(os.listdir(model_dir)) == sorted(["1", "2", alive.name])


@pytest.mark.parametrize("version", [True, False, 0, -1, 1.0, "2"])
def test_version_must_be_a_positive_integer(translator, tmp_path, version):
    model, preprocessor = translator
    with pytest.raises(ValueError, match="`version`, expected a positive"):
        export.export_translator(
            model, with_length(preprocessor, 4), tmp_path, version=version
        )
    assert not (tmp_path / "iwslt_en_de" / "True").exists()


@pytest.mark.parametrize(
    "where,merge",
    [("adapter", True), ("adapter", False), ("base", True), ("base", False)],
)
def test_export_refuses_a_non_finite_weight(translator, tmp_path, where, merge):
    # Unmerged (`merge=False`) or outside any adapter, nothing else checks.
    model, preprocessor = translator
    if where == "adapter":
        weight = next(iter(lora_cells(model).values())).lora_weights[1]
    else:  # a weight no adapter touches
        weight = next(w for w in model.weights if "logits" in w.path)
    value = keras.ops.convert_to_numpy(weight).copy()
    value[0, 0] = np.nan if where == "base" else np.inf
    weight.assign(value)
    with pytest.raises(ValueError, match="non-finite"):
        export.export_translator(
            model, with_length(preprocessor, 4), tmp_path, merge=merge
        )
    # Refused before anything was written.
    assert not (tmp_path / "iwslt_en_de").exists()


@tensorflow_only
def test_export_traces_without_the_fused_kernels(
    translator, tmp_path, monkeypatch
):
    """With a (here emulated) GPU the training path is fused; the serving
    graph must not be, or a CPU server could not load its cuDNN ops."""
    from fused_reference import patch_fused_kernels

    model, preprocessor = translator
    calls = patch_fused_kernels(monkeypatch)
    expected = evaluation.translate(model, preprocessor, SENTENCES)
    assert calls["gru"] > 0  # the model itself runs fused
    calls.clear()
    path = export.export_translator(model, preprocessor, tmp_path)
    assert sum(calls.values()) == 0
    layers = [
        layer for _, layer in iter_layers(model) if hasattr(layer, "use_cudnn")
    ]
    assert layers
    assert all(x.get_config().get("use_cudnn") == "auto" for x in layers)
    stdout = run_python(
        LOAD_AND_TRANSLATE, path, json.dumps(SENTENCES), cwd=tmp_path
    )
    assert json.loads(stdout.split("RESULT", 1)[1]) == expected


def test_export_of_a_translator_with_adapters_on_every_layer(
    tokenizer_dir, tmp_path
):
    """Recurrent, Dense and Embedding adapters all merge into the served
    graph, which still needs nothing of this library."""
    preprocessor = TranslationPreprocessor.load(tokenizer_dir)
    model = keras_rnn_lora.enable_lora(
        translator_for(preprocessor),
        rank=2,
        lora_targets=("recurrent", "kernel", "dense", "embedding"),
    )
    adapters = keras_rnn_lora.walk.lora_adapters(model)
    assert {type(a).__name__ for a in adapters.values()} == {
        "LoRAGRUCell",
        "LoRADense",
        "LoRAEmbedding",
    }
    rng = np.random.default_rng(1)
    for adapter in adapters.values():
        for w in adapter.lora_weights:
            w.assign(rng.normal(size=w.shape).astype("float32") * 0.3)
    path = export.export_translator(model, preprocessor, tmp_path)
    expected = evaluation.translate(model, preprocessor, SENTENCES)
    stdout = run_python(
        LOAD_AND_TRANSLATE, path, json.dumps(SENTENCES), cwd=tmp_path
    )
    assert json.loads(stdout.split("RESULT", 1)[1]) == expected


def test_only_ascii_decimal_folders_are_versions(tmp_path):
    # `str.isdigit` accepts "²" (which `int` refuses) and "٣" (which `int`
    # reads as 3): neither is a version TF Serving would serve.
    model_dir = tmp_path / "iwslt_en_de"
    stray_staging = f".tmp-{socket.gethostname()}-²-abc"  # not a process id
    for name in ("²", "٣", "1", "x1", stray_staging):
        (model_dir / name).mkdir(parents=True)
    assert serving_versions.versions(str(model_dir)) == [1]
    with serving_versions.staging_folder(str(model_dir)) as staging:
        published(os.path.join(staging, "export"), "new")
        path = serving_versions.publish(
            os.path.join(staging, "export"), str(model_dir)
        )
    assert path == str(model_dir / "2")


SERVE_ADAPTERS = """
import json, sys
sys.modules["keras_rnn_lora"] = None  # importing it would fail here
import tensorflow as tf
import tensorflow_text  # registers the SentencePiece ops
loaded = tf.saved_model.load(sys.argv[1])
serve = loaded.signatures["serving_default"]
texts, adapters = json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = serve(text=tf.constant(texts), adapter=tf.constant(adapters))
names = loaded.signatures["adapters"]()["adapters"].numpy()
try:
    serve(text=tf.constant(["Hello."]), adapter=tf.constant(["nope"]))
    error = None
except tf.errors.InvalidArgumentError as e:
    error = e.message
print("RESULT" + json.dumps({
    "translations": [t.decode() for t in out["translation"].numpy()],
    "adapters": [n.decode() for n in names],
    "error": error,
}))
"""


def test_one_export_serves_every_adapter_per_example(translator, tmp_path):
    """One SavedModel holds "default", "news" (trained-like, non-zero) and
    a wider DoRA adapter; a mixed request gets what Keras computes with
    each example's adapter, and an unknown name fails the request."""
    model, preprocessor = translator
    rng = np.random.default_rng(1)
    keras_rnn_lora.add_adapter(model, "news")
    keras_rnn_lora.add_adapter(model, "wide", rank=3, use_dora=True)
    for layer in lora_cells(model).values():
        for name in ("news", "wide"):
            shapes = layer.adapter_shapes(name)
            layer.set_adapter_values(
                name,
                {
                    f: rng.normal(size=s).astype("float32") * 0.3
                    + (1.0 if f.endswith("magnitude") else 0.0)
                    for f, s in shapes.items()
                },
            )
    texts = SENTENCES + SENTENCES
    chosen = ["news", "wide", "base", "default"]
    expected = evaluation.translate(model, preprocessor, texts, adapters=chosen)
    path = export.export_translator(
        model, preprocessor, tmp_path / "serving", adapters="all"
    )
    stdout = run_python(
        SERVE_ADAPTERS,
        path,
        json.dumps(texts),
        json.dumps(["news", "wide", "base", ""]),  # "": the active one
        cwd=tmp_path,
    )
    served = json.loads(stdout.split("RESULT", 1)[1])
    assert served["translations"] == expected
    assert set(served["adapters"]) >= {"default", "news", "wide"}
    assert "nope" in served["error"] and "news" in served["error"]
    # Each adapter's own translations differ somewhere: routing is real.
    per_adapter = {
        name: evaluation.translate(
            model, preprocessor, SENTENCES, adapters=name
        )
        for name in ("news", "wide", "base", "default")
    }
    assert len({json.dumps(v) for v in per_adapter.values()}) > 1
