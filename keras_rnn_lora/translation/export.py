"""SavedModel export of a translator for TensorFlow Serving: text in,
translation out, with nothing of this library needed at serving time.

The exported graph holds the merged model (stock GRU/LSTM/SimpleRNN math,
no LoRA branch), the preprocessor's TF Text SentencePiece ops for
tokenization and detokenization, and greedy decoding as a graph
`while_loop`. Signatures:

- `serving_default`: `text` (tf.string, [None]) -> `translation`
  (tf.string, [None]);
- `translate_tokens`: `tokens` (int32, [None, None], padding 0) ->
  `tokens` (int32, [None, max_length], after `[START]`, `[END]` included).

Versions go to `export_dir/<name>/<version>/` (see `serving_versions`).
`assets.extra/tf_serving_warmup_requests` warms the server up on load. On
the JAX or PyTorch backend the model is carried, through a `.keras` file,
into a TensorFlow-backend process that runs this module:

    KERAS_BACKEND=tensorflow python -m keras_rnn_lora.translation.export \\
        MODEL.keras PREPROCESSOR_DIR OUTPUT_DIR NAME
"""

import contextlib
import json
import os
import subprocess
import sys

import keras
import numpy as np

from keras_rnn_lora.convert import to_base_model
from keras_rnn_lora.translation import multi_adapter
from keras_rnn_lora.translation import serving_versions
from keras_rnn_lora.translation.decoding import greedy_decode
from keras_rnn_lora.walk import at_layer
from keras_rnn_lora.walk import iter_layers
from keras_rnn_lora.walk import lora_adapters

WARMUP_SENTENCES = ("Thank you so much, Chris.", "")
TF_TEXT_OPS = (
    # The TF Text ops this graph uses; TensorFlow Serving links TF Text in.
    "SentencepieceOp",
    "SentencepieceTokenizeOp",
    "SentencepieceDetokenizeOp",
)


def export_translator(
    model,
    preprocessor,
    export_dir,
    *,
    name="iwslt_en_de",
    version=None,
    overwrite=False,
    merge=True,
    adapters=None,
    default_adapter=None,
):
    """Exports `model` with its preprocessor as a TF Serving SavedModel.

    Args:
        model: a `Translator`, with or without LoRA adapters (they are
            merged into stock layers first).
        preprocessor: its `TranslationPreprocessor`; its `max_length` caps
            the source tokens kept and the target tokens generated.
        export_dir: the serving root (`saved_models/`).
        name: the model name TF Serving serves it under.
        version: integer version; default: one above the highest present.
        overwrite: replace an existing `version` (default: refuse).
        merge: `True` (default) serves the merged base model. `False` keeps
            the LoRA branch in the graph: only for measuring its cost.
        adapters: `None` (default) serves one model (as `merge` says), or
            the names of the model's adapters to serve from one SavedModel
            (`"all"`: every adapter and `"base"`, the model without any), each
            request choosing per example: `serving_default` then takes
            `text` and `adapter` (strings, `[None]`; an empty `adapter` is
            `default_adapter`), an unknown name fails the request
            (`INVALID_ARGUMENT`) naming the known ones, and the signature
            `adapters` lists them. The adapters are stored factored.
        default_adapter: the adapter of requests that name none (default:
            the model's active adapter).

    Returns:
        The path of the written version folder.

    Raises:
        ValueError: a weight of the model to serve holds NaN or Inf (merged
            or not); nothing is written.
    """
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise ValueError(
            "Received an invalid value for `version`, expected a positive "
            f"integer or None. Received: version={version!r}"
        )
    model_dir = os.path.join(os.path.abspath(export_dir), name)
    if version is not None and not overwrite:
        serving_versions.refuse_existing(os.path.join(model_dir, str(version)))
    routes = None
    if adapters is not None:
        routes = served_adapters(model, adapters, default_adapter)
        serving = model
    elif merge and lora_adapters(model):
        # Merged once here; the serving model carries no LoRA layer.
        dtype = "float32" if _half_precision(model) else None
        serving = to_base_model(model, dtype=dtype)
    else:
        serving = model
    refuse_non_finite(serving)
    with serving_versions.staging_folder(model_dir) as staging:
        export = os.path.join(staging, "export")
        if keras.backend.backend() == "tensorflow":
            write_savedmodel(serving, preprocessor, export, name, routes)
        else:
            _write_in_tensorflow_process(
                serving, preprocessor, staging, name, routes
            )
        return serving_versions.publish(export, model_dir, version, overwrite)


def _half_precision(model):
    """Whether an adapted kernel of `model` is bfloat16 or float16 (which
    cannot hold a merge: the export is then float32)."""
    return any(
        keras.backend.standardize_dtype(a.lora_kernel(t).dtype)
        in ("bfloat16", "float16")
        for a in lora_adapters(model).values()
        for t in a.lora_targets
    )


def served_adapters(model, adapters, default_adapter=None):
    """`(names, served, default)`: every adapter `model` holds (the routing
    order), the names a request may use (`"base"` among them if asked
    for), and the one an empty name means; checked."""
    from keras_rnn_lora.named_adapters import active_adapter
    from keras_rnn_lora.named_adapters import list_adapters

    names = list_adapters(model)
    for path, host in lora_adapters(model).items():
        at_layer(path, host.require_routable)
    if adapters == "all":
        served = [*names, "base"]
    elif isinstance(adapters, str):
        served = [adapters]
    else:
        served = list(adapters)
    unknown = [a for a in served if a not in names and a != "base"]
    if unknown or not served or len(set(served)) != len(served):
        raise ValueError(
            "Received an invalid value for `adapters`, expected 'all' or "
            f"names from {names} (or 'base'). Received: adapters={adapters!r}"
        )
    default = default_adapter or active_adapter(model)
    if default not in served:
        raise ValueError(
            "Received an invalid value for `default_adapter`, expected one "
            f"of the served adapters {served}. Received: "
            f"default_adapter={default_adapter!r}"
        )
    return names, served, default


def refuse_non_finite(model):
    """Raises `ValueError` naming the first weight of `model` that holds NaN
    or Inf. Merging checks what it merges; this covers every weight, merged
    or not (`merge=False`, a broken base), before a server can load it."""
    for weight in model.weights:
        if not keras.backend.is_float_dtype(weight.dtype):
            continue
        value = np.asarray(keras.ops.convert_to_numpy(weight), "float32")
        bad = value.size - int(np.count_nonzero(np.isfinite(value)))
        if bad:
            raise ValueError(
                f"Refusing to export: weight '{weight.path}' holds {bad} "
                f"non-finite value(s) (NaN or Inf) out of {value.size}. "
                "Nothing was written."
            )


def write_savedmodel(model, preprocessor, path, name, routes=None):
    """Writes the serving SavedModel of `model` to `path` (TensorFlow
    backend): the signatures and the warmup records; with `routes` (see
    `served_adapters`) the per-request adapters."""
    import tensorflow as tf

    # Before tracing: the graph must capture live tokenizer resources.
    preprocessor.revive_tokenizers()
    if routes is None:
        module = _translator_module(model, preprocessor)
        signatures = {
            "serving_default": module.serve_text,
            "translate_tokens": module.serve_tokens,
        }
    else:
        module = multi_adapter.module(model, preprocessor, routes)
        signatures = {
            "serving_default": module.serve_text,
            "translate_tokens": module.serve_tokens,
            "adapters": module.adapters,
        }
    with _fused_kernels_off(model):
        tf.saved_model.save(module, path, signatures=signatures)
    _write_warmup(path, name, None if routes is None else routes[1])


@contextlib.contextmanager
def _fused_kernels_off(model):
    """Traces the serving graph with Keras' step loop, never cuDNN: a
    SavedModel traced while a GPU is visible would otherwise hold cuDNN ops
    that a CPU server cannot load. The settings are restored after."""
    layers = [
        layer for _, layer in iter_layers(model) if hasattr(layer, "use_cudnn")
    ]
    # The LoRA layers report their own setting in their config (their
    # attribute reads as off while unmerged); the stock ones do not.
    settings = [
        layer.get_config().get("use_cudnn", layer.use_cudnn) for layer in layers
    ]
    for layer in layers:
        layer.use_cudnn = False
    try:
        yield
    finally:
        for layer, setting in zip(layers, settings, strict=True):
            layer.use_cudnn = setting


def _write_warmup(path, name, adapters=None):
    """The warmup records: the warmup sentences, once per served adapter."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.apis import prediction_log_pb2

    extra = os.path.join(path, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    with tf.io.TFRecordWriter(
        os.path.join(extra, "tf_serving_warmup_requests")
    ) as writer:
        for adapter in adapters or [None]:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = name
            request.model_spec.signature_name = "serving_default"
            request.inputs["text"].CopyFrom(
                tf.make_tensor_proto(list(WARMUP_SENTENCES), dtype=tf.string)
            )
            if adapter is not None:
                request.inputs["adapter"].CopyFrom(
                    tf.make_tensor_proto(
                        [adapter] * len(WARMUP_SENTENCES), dtype=tf.string
                    )
                )
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def _write_in_tensorflow_process(model, preprocessor, staging, name, routes):
    """Carries the model into a TensorFlow-backend process (this module's
    `main`) that writes `staging/export`."""
    model_path = os.path.join(staging, "model.keras")
    preprocessor_dir = os.path.join(staging, "preprocessor")
    model.save(model_path)
    preprocessor.save(preprocessor_dir)
    command = [
        sys.executable,
        "-m",
        "keras_rnn_lora.translation.export",
        model_path,
        preprocessor_dir,
        os.path.join(staging, "export"),
        name,
        json.dumps(routes),
    ]
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            "Exporting needs the TensorFlow backend: the model was carried "
            "into a KERAS_BACKEND=tensorflow process, which failed "
            "(install the `tensorflow` extra: pip install "
            f"'keras-rnn-lora[tensorflow]'):\n{result.stderr[-3000:]}"
        )


def _translator_module(model, preprocessor):
    import tensorflow as tf

    class TranslatorModule(tf.Module):
        """The serving graph: tokenize, greedy-decode, detokenize."""

        def __init__(self):
            super().__init__(name="translator")
            self.model = model
            self.preprocessor = preprocessor

        def _decode(self, tokens):
            tokens = tf.pad(tokens, [[0, 0], [0, 1]])  # never zero-width
            max_length = self.preprocessor.max_length
            return greedy_decode(self.model, tokens, max_length)

        @tf.function(
            input_signature=[tf.TensorSpec([None, None], tf.int32, "tokens")],
            autograph=False,
        )
        def serve_tokens(self, tokens):
            tokens = tokens[:, : self.preprocessor.max_length]
            return {"tokens": self._decode(tokens)}

        @tf.function(
            input_signature=[tf.TensorSpec([None], tf.string, "text")],
            autograph=False,
        )
        def serve_text(self, text):
            ragged = self.preprocessor.tokenize_source(text)
            pad_id = self.preprocessor.pad_id
            output = self._decode(ragged.to_tensor(default_value=pad_id))
            return {"translation": self.preprocessor.detokenize_target(output)}

    return TranslatorModule()


def main(argv=None):
    """The TensorFlow-backend side of `export_translator` (see module)."""
    from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor

    model_path, preprocessor_dir, path, name, routes = argv or sys.argv[1:]
    model = keras.saving.load_model(model_path, compile=False)
    preprocessor = TranslationPreprocessor.load(preprocessor_dir)
    write_savedmodel(model, preprocessor, path, name, json.loads(routes))


if __name__ == "__main__":
    main()
