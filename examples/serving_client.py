"""Sends sentences to a running TensorFlow Serving and prints translations.

REST (default): `POST <server>/v1/models/<name>:predict` with
`{"instances": [{"text": ...}, ...]}`, TF Serving's row format; gRPC
(`--grpc host:port`) uses tensorflow-serving-api's PredictionService.
`--adapter NAME` asks a multi-adapter export (`export_translator(...,
adapters=...)`) for adapter NAME: every instance then carries it
(`{"text": ..., "adapter": NAME}`; over gRPC an `adapter` input beside
`text`); `""` is the export's default adapter, `"base"` none.
The main job's export serves several adapters: pass `--adapter` (`""`
for its default). Takes a second; needs a server started as in
docs/translation.md, e.g.

    tensorflow_model_server --rest_api_port=8501 --model_name=iwslt_en_de \\
        --model_base_path="$PWD/saved_models/iwslt_en_de"
    python examples/serving_client.py --adapter "" "Thank you so much, Chris."
    python examples/serving_client.py --adapter lora_after_1 "Thank you."
"""

import argparse
import json
import urllib.error
import urllib.parse
import urllib.request

MODEL_NAME = "iwslt_en_de"
REST_URL = "http://localhost:8501"


def rest_body(sentences, adapter=None):
    """The REST request body: one `text` per instance, and `adapter` in
    every instance when one is given."""
    if adapter is None:
        instances = [{"text": s} for s in sentences]
    else:
        instances = [{"text": s, "adapter": adapter} for s in sentences]
    return json.dumps({"instances": instances})


def predict_rest(url, name, sentences, timeout=30.0, adapter=None):
    """TF Serving's REST predict call (see `rest_body`)."""
    request = urllib.request.Request(
        f"{url}/v1/models/{name}:predict",
        data=rest_body(sentences, adapter).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())["predictions"]
    except urllib.error.HTTPError as error:
        # TF Serving says why in the body: {"error": "..."}.
        body = error.read().decode("utf-8", "replace")
        try:
            body = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            pass
        raise SystemExit(
            f"The server refused the request (HTTP {error.code}): {body}"
        ) from None
    except urllib.error.URLError as error:
        raise SystemExit(
            f"No TF Serving server answered at {url}: {error.reason}"
        ) from None


def grpc_request(name, sentences, adapter=None):
    """The gRPC `PredictRequest`: `text`, and `adapter` (one per sentence)
    when one is given."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = "serving_default"
    request.inputs["text"].CopyFrom(
        tf.make_tensor_proto(sentences, dtype=tf.string)
    )
    if adapter is not None:
        request.inputs["adapter"].CopyFrom(
            tf.make_tensor_proto([adapter] * len(sentences), dtype=tf.string)
        )
    return request


def predict_grpc(target, name, sentences, timeout=30.0, adapter=None):
    """The same call over gRPC, with tensorflow-serving-api."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = grpc_request(name, sentences, adapter)
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout)
    return [
        t.decode() for t in tf.make_ndarray(response.outputs["translation"])
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sentences", nargs="+")
    parser.add_argument("--rest", default=REST_URL, help="server URL")
    parser.add_argument("--grpc", help="host:port: use gRPC instead of REST")
    parser.add_argument("--model-name", default=MODEL_NAME)
    parser.add_argument(
        "--adapter",
        help="the adapter of a multi-adapter export to translate with, "
        "'' for its default (default: send none, as to a single-model "
        "export; a multi-adapter export needs one)",
    )
    args = parser.parse_args(argv)
    if not args.grpc and urllib.parse.urlparse(args.rest).scheme not in (
        "http",
        "https",
    ):
        parser.error(
            f"--rest must be a TF Serving server's URL, such as {REST_URL}; "
            f"got {args.rest!r} (to run a SavedModel folder without a "
            "server, load it with tf.saved_model.load: docs/translation.md)"
        )
    predict = predict_grpc if args.grpc else predict_rest
    translations = predict(
        args.grpc or args.rest,
        args.model_name,
        args.sentences,
        adapter=args.adapter,
    )
    for sentence, translation in zip(args.sentences, translations, strict=True):
        print(f"{sentence}\n  -> {translation}")


if __name__ == "__main__":
    main()
