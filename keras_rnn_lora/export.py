"""SavedModel export of a translator for TensorFlow Serving: text in,
translation out, with nothing of this library needed at serving time.

The exported graph holds the merged model (stock GRU/LSTM/SimpleRNN math,
no LoRA branch), TF Text's SentencePiece ops for tokenization and
detokenization, and greedy decoding as a graph `while_loop`. Signatures:

- `serving_default`: `text` (tf.string, [None]) -> `translation`
  (tf.string, [None]);
- `translate_tokens`: `tokens` (int32, [None, None], padding 0) ->
  `tokens` (int32, [None, max_length], after `[START]`, `[END]` included).

Exports go to `export_dir/<name>/<version>/`, written to a temporary folder
and renamed into place; an existing version is never replaced unless
`overwrite=True`. `assets.extra/tf_serving_warmup_requests` warms the
server up on load.
"""

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import keras

WARMUP_SENTENCES = ("Thank you so much, Chris.", "")
TF_TEXT_OPS = (
    # The TF Text ops this graph uses; TensorFlow Serving links TF Text in.
    "SentencepieceOp",
    "SentencepieceTokenizeOp",
    "SentencepieceDetokenizeOp",
)


def _versions(model_dir):
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(n) for n in os.listdir(model_dir) if n.isdigit())


def export_translator(
    model,
    src_tokenizer,
    tgt_tokenizer,
    export_dir,
    *,
    name="iwslt_en_de",
    version=None,
    max_length=64,
    overwrite=False,
    merge=True,
):
    """Exports `model` with its tokenizers as a TF Serving SavedModel.

    Args:
        model: a translator from `seq2seq.build_translator`, with or without
            LoRA cells (they are merged into stock cells first).
        src_tokenizer, tgt_tokenizer: keras-nlp `SentencePieceTokenizer`s.
        export_dir: the serving root (`saved_models/`).
        name: the model name TF Serving serves it under.
        version: integer version; default: one above the highest present.
        max_length: source tokens kept (longer input is truncated) and most
            target tokens generated.
        overwrite: replace an existing `version` (default: refuse).
        merge: `True` (default) serves the merged base model. `False` keeps
            the LoRA branch in the graph: only for measuring its cost.

    Returns:
        The path of the written version folder.

    The version folder appears complete or not at all. Without `version`,
    concurrent exports to one root each get their own number: a number is
    claimed by renaming the finished export onto it, which fails if another
    export got there first (then the next number is taken). With
    `overwrite=True` the old version is moved aside, the new one renamed in
    and the old one deleted; if that is interrupted, the next export to the
    same root puts the old version back. Staging folders left by a killed
    export are removed by the next one.

    On the JAX or PyTorch backend the model is carried, through a `.keras`
    file, into a TensorFlow-backend process that writes the export.
    """
    if (
        isinstance(max_length, bool)
        or not isinstance(max_length, int)
        or max_length < 1
    ):
        raise ValueError(
            "Received an invalid value for `max_length`, expected a positive "
            f"integer. Received: max_length={max_length!r}"
        )
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise ValueError(
            "Received an invalid value for `version`, expected a positive "
            f"integer or None. Received: version={version!r}"
        )
    model_dir = os.path.join(os.path.abspath(export_dir), name)
    os.makedirs(model_dir, exist_ok=True)
    _recover(model_dir)
    if version is not None and not overwrite:
        _refuse_existing(os.path.join(model_dir, str(version)))
    staging = tempfile.mkdtemp(
        prefix=f"{_owner_prefix('.tmp')}-", dir=model_dir
    )
    try:
        write = (
            _write_savedmodel
            if keras.backend.backend() == "tensorflow"
            else _write_in_tensorflow_process
        )
        write(
            model,
            src_tokenizer,
            tgt_tokenizer,
            staging,
            name,
            max_length,
            merge,
        )
        export = os.path.join(staging, "export")
        if version is None:
            return _publish_next(export, model_dir)
        target = os.path.join(model_dir, str(version))
        if overwrite and os.path.exists(target):
            _replace(export, target, model_dir, version)
        else:
            _claim(export, target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _refuse_existing(target):
    if os.path.exists(target):
        raise FileExistsError(
            f"Export version {target} already exists. Pass overwrite=True to "
            "replace it, or leave `version` unset for the next free one."
        )


def _claim(export, target):
    """Renames `export` onto `target`, which must not exist yet."""
    try:
        os.rename(export, target)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            _refuse_existing(target)
        raise


def _publish_next(export, model_dir):
    """Claims the next free version number for `export`."""
    while True:
        target = os.path.join(
            model_dir, str(max(_versions(model_dir), default=0) + 1)
        )
        try:
            _claim(export, target)
            return target
        except FileExistsError:
            continue  # another export took this number first


def _replace(export, target, model_dir, version):
    """Swaps `export` in for the existing `target`, recoverably: the old
    version waits in a hidden folder named after it until the new one is in
    place, and is put back if the swap fails or is interrupted."""
    old = os.path.join(model_dir, f"{_owner_prefix('.old')}-v{version}")
    os.rename(target, old)
    try:
        os.rename(export, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _owner_prefix(kind):
    """`<kind>-<host>-<pid>`: who made a hidden folder, so that only folders
    of processes that are gone are recovered or removed."""
    return f"{kind}-{socket.gethostname()}-{os.getpid()}"


def _orphaned(name, kind):
    """Whether hidden folder `name` of `kind` belongs to a dead process on
    this host."""
    parts = name.split("-")
    if len(parts) < 4 or parts[0] != kind:
        return False
    host, pid = "-".join(parts[1:-2]), parts[-2]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _recover(model_dir):
    """Undoes what killed exports left behind in `model_dir`: an old version
    moved aside by an interrupted overwrite goes back (or, if its
    replacement made it, away), staging folders are removed."""
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if _orphaned(name, ".old"):
            target = os.path.join(model_dir, name.rsplit("-v", 1)[1])
            if os.path.exists(target):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, target)
        elif _orphaned(name, ".tmp"):
            shutil.rmtree(path, ignore_errors=True)


def _serving_model(model, merge):
    import keras_rnn_lora
    from keras_rnn_lora.adapters import lora_cells

    if merge and lora_cells(model):
        return keras_rnn_lora.to_base_model(model)
    return model


def _write_savedmodel(
    model, src_tokenizer, tgt_tokenizer, staging, name, max_length, merge
):
    import tensorflow as tf

    serving = _serving_model(model, merge)
    module = _translator_module(
        serving, src_tokenizer.proto, tgt_tokenizer.proto, max_length
    )
    path = os.path.join(staging, "export")
    with _fused_kernels_off(serving):
        tf.saved_model.save(
            module,
            path,
            signatures={
                "serving_default": module.serve_text,
                "translate_tokens": module.serve_tokens,
            },
        )
    _write_warmup(path, name)


@contextlib.contextmanager
def _fused_kernels_off(model):
    """Traces the serving graph with Keras' step loop, never cuDNN: a
    SavedModel traced while a GPU is visible would otherwise hold cuDNN ops
    that a CPU server cannot load. The settings are restored after."""
    from keras_rnn_lora.adapters import iter_layers

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


def _write_warmup(path, name):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.apis import prediction_log_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = "serving_default"
    request.inputs["text"].CopyFrom(
        tf.make_tensor_proto(list(WARMUP_SENTENCES), dtype=tf.string)
    )
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
    extra = os.path.join(path, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    with tf.io.TFRecordWriter(
        os.path.join(extra, "tf_serving_warmup_requests")
    ) as writer:
        writer.write(log.SerializeToString())


def _write_in_tensorflow_process(
    model, src_tokenizer, tgt_tokenizer, staging, name, max_length, merge
):
    """Carries the model into a TensorFlow-backend process for export."""
    serving = _serving_model(model, merge)
    files = {
        "model": os.path.join(staging, "model.keras"),
        "src": os.path.join(staging, "src.model"),
        "tgt": os.path.join(staging, "tgt.model"),
    }
    serving.save(files["model"])
    for key, tokenizer in (("src", src_tokenizer), ("tgt", tgt_tokenizer)):
        with open(files[key], "wb") as file:
            file.write(tokenizer.proto)
    script = (
        "import keras, sys\n"
        "from keras_rnn_lora import export, text\n"
        "model = keras.saving.load_model(sys.argv[1], compile=False)\n"
        "export._write_savedmodel(model, text.load_tokenizer(sys.argv[2]),\n"
        "    text.load_tokenizer(sys.argv[3]), sys.argv[4], sys.argv[5],\n"
        "    int(sys.argv[6]), sys.argv[7] == 'True')\n"
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            files["model"],
            files["src"],
            files["tgt"],
            staging,
            name,
            str(max_length),
            str(merge),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(
            "Exporting needs the TensorFlow backend: the model was carried "
            "into a KERAS_BACKEND=tensorflow process, which failed "
            "(install the `tensorflow` extra: pip install "
            f"'keras-rnn-lora[tensorflow]'):\n{result.stderr[-3000:]}"
        )


def _make_module_class():
    import tensorflow as tf
    import tensorflow_text as tf_text

    from keras_rnn_lora import seq2seq

    class TranslatorModule(tf.Module):
        """The serving graph: tokenize, greedy-decode, detokenize."""

        def __init__(self, model, src_proto, tgt_proto, max_length):
            super().__init__(name="translator")
            self.model = model
            self.max_length = max_length
            # Distinct names: the loaded graph shares SentencePiece
            # resources by node name, so two unnamed tokenizers would
            # become one.
            self.src = tf_text.SentencepieceTokenizer(
                model=src_proto, out_type=tf.int32, name="source_sentencepiece"
            )
            self.tgt = tf_text.SentencepieceTokenizer(
                model=tgt_proto, out_type=tf.int32, name="target_sentencepiece"
            )

        def _decode(self, tokens):
            return seq2seq.greedy_decode(self.model, tokens, self.max_length)

        @tf.function(
            input_signature=[tf.TensorSpec([None, None], tf.int32, "tokens")],
            autograph=False,
        )
        def serve_tokens(self, tokens):
            tokens = tokens[:, : self.max_length]
            tokens = tf.pad(tokens, [[0, 0], [0, 1]])  # never zero-width
            return {"tokens": self._decode(tokens)}

        @tf.function(
            input_signature=[tf.TensorSpec([None], tf.string, "text")],
            autograph=False,
        )
        def serve_text(self, text):
            # Invalid UTF-8 becomes U+FFFD instead of failing the request.
            text = tf.strings.unicode_transcode(
                text, "UTF-8", "UTF-8", errors="replace"
            )
            ragged = self.src.tokenize(text)[:, : self.max_length]
            tokens = ragged.to_tensor(default_value=seq2seq.PAD_ID)
            tokens = tf.pad(tokens, [[0, 0], [0, 1]])  # never zero-width
            output = self._decode(tokens)
            ended = tf.cumsum(
                tf.cast(tf.equal(output, seq2seq.END_ID), tf.int32), axis=1
            )
            keep = tf.logical_and(
                tf.equal(ended, 0), tf.not_equal(output, seq2seq.PAD_ID)
            )
            ids = tf.ragged.boolean_mask(output, keep)
            return {"translation": self.tgt.detokenize(ids)}

    return TranslatorModule


def _translator_module(*args):
    return _make_module_class()(*args)
