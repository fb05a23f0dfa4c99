"""The RNN encoder-decoder translator the paper's method is applied to.

A `Translator` is a Keras model made of two sub-models, built once:

- `encoder`: `encoder_tokens -> [encoder_outputs, *states]`: embedding, a
  stack of `keras.layers.GRU` (or `LSTM`, `SimpleRNN`) layers over the
  right-padded source (masked), and each layer's final state;
- `decoder`: `[decoder_tokens, encoder_tokens, encoder_outputs, *states] ->
  [logits, *states]`: embedding, the decoder RNN stack started from those
  states (no mask: padding only ever follows the real tokens), Luong-style
  attention of each decoder output over the encoder outputs (source padding
  masked), and a `Dense` over the target vocabulary.

Training calls the whole model on `[encoder_tokens, decoder_inputs]`.
Decoding calls the same sub-models step by step: `encode` once per
sentence, then `decode_step` one token at a time, carrying the RNN states.
The decoder RNN does not read the attention context (no input feeding), so
that is exactly the full-sequence computation. The recurrent layers are
Keras' whole-sequence layers, so a GPU run takes the fused (cuDNN) kernels,
and `enable_lora` (which reads the sub-models from the translator's config)
turns them into `LoRAGRU`/`LoRALSTM`, which keep that path.
"""

import keras
from keras import ops

from keras_rnn_lora.checks import check_positive_int
from keras_rnn_lora.translation.tokens import PAD_ID

_LAYERS = {
    "simple_rnn": keras.layers.SimpleRNN,
    "gru": keras.layers.GRU,
    "lstm": keras.layers.LSTM,
}
_ATTENTION = {
    "luong": keras.layers.Attention,
    "bahdanau": keras.layers.AdditiveAttention,
}


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class Translator(keras.Model):
    """An encoder-decoder translator with an explicit step API.

    Args:
        encoder: a Keras model `encoder_tokens -> [encoder_outputs, *states]`.
        decoder: a Keras model `[decoder_tokens, encoder_tokens,
            encoder_outputs, *states] -> [logits, *states]`.
        **kwargs: `keras.Model` arguments (`name`, ...).

    Call arguments:
        inputs: `[encoder_tokens, decoder_inputs]`, int32, padding id 0.

    Returns logits `(batch, target_length, target_vocab)`.

    Example:

    >>> model = build_translator(8000, 8000)
    >>> state = model.encode(source_tokens)
    >>> logits, state = model.decode_step(previous_tokens, state)
    """

    def __init__(self, encoder, decoder, **kwargs):
        encoder_tokens = keras.Input(
            (None,), dtype="int32", name="encoder_tokens"
        )
        decoder_inputs = keras.Input(
            (None,), dtype="int32", name="decoder_inputs"
        )
        encoded = encoder(encoder_tokens)
        logits = decoder([decoder_inputs, encoder_tokens, *encoded])[0]
        super().__init__([encoder_tokens, decoder_inputs], logits, **kwargs)
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, encoder_tokens):
        """Runs the encoder once: the decoding state, a dict of the source
        tokens, the encoder outputs and the decoder RNNs' initial states."""
        tokens = ops.convert_to_tensor(encoder_tokens, "int32")
        outputs, *states = self.encoder(tokens)
        # A new tensor, without the source mask Keras attached to the
        # outputs: the decoder reads the padding from `encoder_tokens`.
        outputs = ops.copy(outputs)
        return {
            "encoder_tokens": tokens,
            "encoder_outputs": outputs,
            "states": states,
        }

    def decode_step(self, tokens, state):
        """One decoder step: `tokens` (batch,) -> `(logits, new_state)`,
        logits `(batch, target_vocab)`; carries the RNN states."""
        logits, *states = self.decoder(
            [
                ops.expand_dims(tokens, 1),
                state["encoder_tokens"],
                state["encoder_outputs"],
                *state["states"],
            ]
        )
        return logits[:, 0, :], {**state, "states": states}

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        encoder = keras.saving.deserialize_keras_object(config.pop("encoder"))
        decoder = keras.saving.deserialize_keras_object(config.pop("decoder"))
        return cls(encoder, decoder, **config)


def build_translator(
    src_vocab_size,
    tgt_vocab_size,
    *,
    embedding_dim=256,
    units=256,
    cell="gru",
    num_layers=1,
    bidirectional_encoder=False,
    attention="luong",
    dropout=0.3,
    name="translator",
):
    """An RNN encoder-decoder with attention, as a `Translator`.

    Args:
        src_vocab_size: the source vocabulary size (id 0 is padding).
        tgt_vocab_size: the target vocabulary size (id 0 is padding).
        embedding_dim: size of both embeddings. Default 256.
        units: RNN width. Default 256 (a 2-core CPU trains it in minutes).
        cell: `"simple_rnn"`, `"gru"` (default) or `"lstm"`.
        num_layers: stacked RNN layers in the encoder and in the decoder.
        bidirectional_encoder: read the source both ways; each direction
            has `units // 2` units, so the decoder still gets `units`.
        attention: `"luong"` (dot product, default) or `"bahdanau"`
            (additive).
        dropout: rate of the dropout on both embeddings, on the encoder
            outputs and on the attention output, in training. Default 0.3:
            with 20,000 training pairs the translator lives or dies by it.
        name: the model's name.

    Returns:
        A `Translator` with inputs `[encoder_tokens, decoder_inputs]` and
        logits of shape `(batch, target_length, tgt_vocab_size)`.
    """
    for arg in ("src_vocab_size", "tgt_vocab_size", "embedding_dim"):
        check_positive_int(arg, locals()[arg])
    check_positive_int("units", units)
    check_positive_int("num_layers", num_layers)
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not 0 <= dropout < 1
    ):
        raise ValueError(
            "Received an invalid value for `dropout`, expected a float in "
            f"[0, 1). Received: dropout={dropout!r}"
        )
    if cell not in _LAYERS:
        raise ValueError(
            f"Received an invalid value for `cell`, expected one of "
            f"{sorted(_LAYERS)}. Received: cell={cell!r}"
        )
    if attention not in _ATTENTION:
        raise ValueError(
            f"Received an invalid value for `attention`, expected one of "
            f"{sorted(_ATTENTION)}. Received: attention={attention!r}"
        )
    if bidirectional_encoder and units % 2:
        raise ValueError(
            "Received an invalid value for `units`, expected an even number "
            f"with `bidirectional_encoder=True`. Received: units={units}"
        )
    layer = _LAYERS[cell]
    states_per_layer = 2 if cell == "lstm" else 1
    encoder = _encoder(
        layer,
        src_vocab_size,
        embedding_dim,
        units,
        num_layers,
        bidirectional_encoder,
        dropout,
    )
    decoder = _decoder(
        layer,
        tgt_vocab_size,
        embedding_dim,
        units,
        num_layers,
        states_per_layer,
        attention,
        dropout,
    )
    return Translator(encoder, decoder, name=name)


def _encoder(
    layer, vocab, embedding_dim, units, num_layers, bidirectional, dropout
):
    tokens = keras.Input((None,), dtype="int32", name="encoder_tokens")
    mask = ops.not_equal(tokens, PAD_ID)
    x = keras.layers.Embedding(vocab, embedding_dim, name="source_embedding")(
        tokens
    )
    x = keras.layers.Dropout(dropout, name="source_dropout")(x)
    states = []
    for i in range(num_layers):
        # The source mask is right-padded, as cuDNN wants it (TensorFlow's
        # fused kernels take such masks; torch and JAX run the step loop).
        width = units // 2 if bidirectional else units
        name = f"encoder_{i}_rnn" if bidirectional else f"encoder_{i}"
        rnn = layer(width, return_sequences=True, return_state=True, name=name)
        if not bidirectional:
            x, *layer_states = rnn(x, mask=mask)
        else:
            x, *both = keras.layers.Bidirectional(rnn, name=f"encoder_{i}")(
                x, mask=mask
            )
            half = len(both) // 2
            # The decoder sees `units` wide states either way.
            layer_states = [
                keras.layers.Concatenate(name=f"encoder_{i}_state_{k}")(
                    [both[k], both[half + k]]
                )
                for k in range(half)
            ]
        states.extend(layer_states)
    x = keras.layers.Dropout(dropout, name="encoder_output_dropout")(x)
    return keras.Model(tokens, [x, *states], name="encoder")


def _decoder(
    layer,
    vocab,
    embedding_dim,
    units,
    num_layers,
    states_per_layer,
    attention,
    dropout,
):
    tokens = keras.Input((None,), dtype="int32", name="decoder_tokens")
    source = keras.Input((None,), dtype="int32", name="encoder_tokens")
    encoded = keras.Input((None, units), name="encoder_outputs")
    initial = [
        keras.Input((units,), name=f"state_{i}_{k}")
        for i in range(num_layers)
        for k in range(states_per_layer)
    ]
    y = keras.layers.Embedding(vocab, embedding_dim, name="target_embedding")(
        tokens
    )
    y = keras.layers.Dropout(dropout, name="target_dropout")(y)
    final = []
    for i in range(num_layers):
        # No mask: padding only ever follows the real target tokens, so the
        # real steps never see it, and an unmasked layer is fused on every
        # backend that has a kernel (the loss masks the padding).
        rnn = layer(
            units, return_sequences=True, return_state=True, name=f"decoder_{i}"
        )
        layer_initial = initial[
            i * states_per_layer : (i + 1) * states_per_layer
        ]
        y, *layer_states = rnn(y, initial_state=layer_initial)
        final.extend(layer_states)
    context = _ATTENTION[attention](name="attention")(
        [y, encoded], mask=[None, ops.not_equal(source, PAD_ID)]
    )
    combined = keras.layers.Concatenate(name="attention_concat")([y, context])
    attended = keras.layers.Dense(
        units, activation="tanh", name="attention_output"
    )(combined)
    attended = keras.layers.Dropout(dropout, name="attention_dropout")(attended)
    logits = keras.layers.Dense(vocab, name="logits")(attended)
    return keras.Model(
        [tokens, source, encoded, *initial], [logits, *final], name="decoder"
    )
