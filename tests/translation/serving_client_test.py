"""Tests for examples/serving_client.py against a stand-in of TF Serving's
REST predict API (a child process serving the exported SavedModel), and
the gRPC request it builds."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import serving_client
from conftest import BACKEND
from translators import train_tokenizers
from translators import translator_for

import keras_rnn_lora
from keras_rnn_lora.translation import evaluation
from keras_rnn_lora.translation import export
from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor
from keras_rnn_lora.walk import lora_cells

pytestmark = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="the client talks to an exported graph; its export and the "
    "stand-in server run on tensorflow only",
)
SENTENCES = ["Thank you so much, Chris.", "And it's truly a great honor."]
MAX_LENGTH = 12
CLIENT = os.path.join(
    os.path.dirname(__file__), "..", "..", "examples", "serving_client.py"
)

SERVER = textwrap.dedent(
    """
    import json, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    import tensorflow as tf
    import tensorflow_text
    serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    requests_log = sys.argv[2]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            # TF Serving's REST predict API, row format, named inputs.
            assert self.path == "/v1/models/iwslt_en_de:predict", self.path
            size = int(self.headers["Content-Length"])
            raw = self.rfile.read(size)
            with open(requests_log, "ab") as log:
                log.write(raw + b"\\n")
            rows = json.loads(raw)["instances"]
            inputs = {
                key: tf.constant([row[key] for row in rows], tf.string)
                for key in rows[0]
            }
            out = serve(**inputs)["translation"]
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


@pytest.fixture(scope="module")
def preprocessor(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tokenizers"))
    train_tokenizers(directory, 2000, 600, MAX_LENGTH)
    return TranslationPreprocessor.load(directory)


def lora_translator(preprocessor, seed=0):
    model = keras_rnn_lora.enable_lora(translator_for(preprocessor), rank=2)
    rng = np.random.default_rng(seed)
    for cell in lora_cells(model).values():
        for w in cell.lora_weights:
            w.assign(rng.normal(size=w.shape).astype("float32") * 0.3)
    return model


def run_client(path, tmp_path, *options):
    """Runs the client against a stand-in server of the SavedModel at
    `path`; returns the client's result and the request bodies the server
    received (raw, as sent)."""
    log = tmp_path / "requests.jsonl"
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, path, str(log)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(server.stdout.readline())
        result = subprocess.run(
            [
                sys.executable,
                CLIENT,
                "--rest",
                f"http://127.0.0.1:{port}",
                *options,
                *SENTENCES,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.kill()
        server.wait()
    assert result.returncode == 0, result.stderr[-2000:]
    return result, log.read_bytes().splitlines()


def assert_printed(result, translations):
    for sentence, translation in zip(SENTENCES, translations, strict=True):
        assert f"{sentence}\n  -> {translation}" in result.stdout


def test_serving_client_rest_request(preprocessor, tmp_path):
    model = lora_translator(preprocessor)
    path = export.export_translator(model, preprocessor, tmp_path)
    result, bodies = run_client(path, tmp_path)
    assert_printed(result, evaluation.translate(model, preprocessor, SENTENCES))
    # Without --adapter the request is exactly the single-model one.
    assert bodies == [
        json.dumps({"instances": [{"text": s} for s in SENTENCES]}).encode()
    ]


def test_serving_client_sends_the_adapter_with_each_instance(
    preprocessor, tmp_path
):
    model = lora_translator(preprocessor)
    keras_rnn_lora.add_adapter(model, "news")
    rng = np.random.default_rng(1)
    for cell in lora_cells(model).values():
        cell.set_adapter_values(
            "news",
            {
                f: rng.normal(size=s).astype("float32") * 0.3
                for f, s in cell.adapter_shapes("news").items()
            },
        )
    path = export.export_translator(
        model, preprocessor, tmp_path / "serving", adapters="all"
    )
    result, bodies = run_client(path, tmp_path, "--adapter", "news")
    expected = evaluation.translate(
        model, preprocessor, SENTENCES, adapters="news"
    )
    assert_printed(result, expected)
    assert [json.loads(b) for b in bodies] == [
        {"instances": [{"text": s, "adapter": "news"} for s in SENTENCES]}
    ]
    # The default adapter's translations differ: the adapter was used.
    assert expected != evaluation.translate(model, preprocessor, SENTENCES)


def test_grpc_request_carries_the_adapter_only_when_given():
    import tensorflow as tf

    plain = serving_client.grpc_request("iwslt_en_de", SENTENCES)
    assert sorted(plain.inputs) == ["text"]
    assert plain.model_spec.signature_name == "serving_default"
    named = serving_client.grpc_request("iwslt_en_de", SENTENCES, "news")
    assert sorted(named.inputs) == ["adapter", "text"]
    assert [a.decode() for a in tf.make_ndarray(named.inputs["adapter"])] == [
        "news",
        "news",
    ]
    assert named.inputs["text"] == plain.inputs["text"]


def test_the_server_s_refusal_is_shown_not_a_traceback():
    """TF Serving explains a refused request in the body (an unknown
    adapter: INVALID_ARGUMENT naming the served ones); the client says it."""
    import http.server
    import threading

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            data = json.dumps({"error": "Unknown adapter; serves: a, b"})
            self.send_response(400)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data.encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(SystemExit, match="HTTP 400.*Unknown adapter"):
            serving_client.predict_rest(url, "m", ["Hi."], adapter="zz")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(SystemExit, match="No TF Serving server answered"):
        serving_client.predict_rest(url, "m", ["Hi."], timeout=5)


@pytest.mark.parametrize(
    "rest", ["/tmp/saved_models/iwslt_en_de/1", "localhost:8501"]
)
def test_a_rest_address_that_is_no_url_is_one_clear_line(rest, capsys):
    with pytest.raises(SystemExit) as exit_info:
        serving_client.main(["--rest", rest, "Hi."])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--rest must be a TF Serving server's URL" in error and rest in error
