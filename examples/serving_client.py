"""Sends sentences to a running TensorFlow Serving and prints translations.

REST (default): `POST <server>/v1/models/<name>:predict` with
`{"instances": [{"text": ...}, ...]}`, TF Serving's row format; gRPC
(`--grpc host:port`) uses tensorflow-serving-api's PredictionService.
Takes a second; needs a server started as in the README, e.g.

    tensorflow_model_server --rest_api_port=8501 --model_name=iwslt_en_de \\
        --model_base_path="$PWD/saved_models/iwslt_en_de"
    python examples/serving_client.py "Thank you so much, Chris."
"""

import argparse
import json
import urllib.request

MODEL_NAME = "iwslt_en_de"
REST_URL = "http://localhost:8501"


def predict_rest(url, name, sentences, timeout=30.0):
    """TF Serving's REST predict call: one `text` per instance."""
    body = json.dumps({"instances": [{"text": s} for s in sentences]})
    request = urllib.request.Request(
        f"{url}/v1/models/{name}:predict",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())["predictions"]


def predict_grpc(target, name, sentences, timeout=30.0):
    """The same call over gRPC, with tensorflow-serving-api."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = "serving_default"
    request.inputs["text"].CopyFrom(
        tf.make_tensor_proto(sentences, dtype=tf.string)
    )
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout)
    return [
        t.decode() for t in tf.make_ndarray(response.outputs["translation"])
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sentences", nargs="+")
    parser.add_argument("--rest", default=REST_URL, help="server URL")
    parser.add_argument("--grpc", help="host:port: use gRPC instead of REST")
    parser.add_argument("--model-name", default=MODEL_NAME)
    args = parser.parse_args()
    if args.grpc:
        translations = predict_grpc(args.grpc, args.model_name, args.sentences)
    else:
        translations = predict_rest(args.rest, args.model_name, args.sentences)
    for sentence, translation in zip(args.sentences, translations, strict=True):
        print(f"{sentence}\n  -> {translation}")


if __name__ == "__main__":
    main()
