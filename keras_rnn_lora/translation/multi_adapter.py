"""The serving graph of a translator with many adapters, each request
choosing per example (see `export.export_translator(..., adapters=...)`).

Signatures:

- `serving_default`: `text` and `adapter` (tf.string, `[None]` each; an
  empty `adapter` is the default one) -> `translation` (tf.string);
- `translate_tokens`: `tokens` (int32, `[None, None]`) and `adapter` ->
  `tokens`;
- `adapters`: no input -> `adapters`, the names a request may use, and
  `default`, the one an empty name means.

An adapter name the export does not serve fails the request with
`InvalidArgumentError` (TF Serving's `INVALID_ARGUMENT`) naming the known
ones. The adapters stay factored: every example's factors are gathered
once per call (`keras_rnn_lora.routed_call`), the model's weights are
stored once.
"""

from keras_rnn_lora import routing
from keras_rnn_lora.translation.decoding import greedy_decode

#: The routing index of "no adapter": the base model.
_BASE = -1
#: What the lookup gives a name the export does not serve.
_UNKNOWN = -2


def module(model, preprocessor, routes):
    """A `tf.Module` serving `model` with `routes = (names, served,
    default)`: every adapter the model holds (the routing order), the names
    a request may use, and the default one."""
    import tensorflow as tf

    names, served, default = routes
    keys = list(served) + [""]
    values = [_index(names, name) for name in served]
    values.append(_index(names, default))
    known = ", ".join(served)

    class MultiAdapterTranslator(tf.Module):
        """Tokenize, route each example to its adapter, greedy-decode,
        detokenize."""

        def __init__(self):
            super().__init__(name="translator")
            self.model = model
            self.preprocessor = preprocessor
            self.table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    tf.constant(keys), tf.constant(values, tf.int32)
                ),
                default_value=_UNKNOWN,
            )
            self.served = tf.constant(list(served))
            self.default = tf.constant(default)

        def _ids(self, adapter):
            ids = self.table.lookup(adapter)
            check = tf.debugging.Assert(
                tf.reduce_all(ids != _UNKNOWN),
                [
                    f"Unknown adapter; this model serves: {known} (an "
                    "empty adapter means the default). Received:",
                    tf.boolean_mask(adapter, ids == _UNKNOWN),
                ],
                summarize=5,
            )
            with tf.control_dependencies([check]):
                return tf.identity(ids)

        def _decode(self, tokens, adapter):
            tf.debugging.assert_equal(
                tf.shape(adapter)[0],
                tf.shape(tokens)[0],
                message="`adapter` needs one name per example.",
            )
            tokens = tf.pad(tokens, [[0, 0], [0, 1]])  # never zero-width
            with routing.routed(names, self._ids(adapter)):
                return greedy_decode(
                    self.model, tokens, self.preprocessor.max_length
                )

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None], tf.int32, "tokens"),
                tf.TensorSpec([None], tf.string, "adapter"),
            ],
            autograph=False,
        )
        def serve_tokens(self, tokens, adapter):
            tokens = tokens[:, : self.preprocessor.max_length]
            return {"tokens": self._decode(tokens, adapter)}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None], tf.string, "text"),
                tf.TensorSpec([None], tf.string, "adapter"),
            ],
            autograph=False,
        )
        def serve_text(self, text, adapter):
            ragged = self.preprocessor.tokenize_source(text)
            pad_id = self.preprocessor.pad_id
            tokens = ragged.to_tensor(default_value=pad_id)
            output = self._decode(tokens, adapter)
            return {"translation": self.preprocessor.detokenize_target(output)}

        @tf.function(input_signature=[], autograph=False)
        def adapters(self):
            return {"adapters": self.served, "default": self.default}

    return MultiAdapterTranslator()


def _index(names, name):
    return _BASE if name == "base" else names.index(name)
