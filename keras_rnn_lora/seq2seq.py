"""The RNN encoder-decoder translator the paper's method is applied to.

`build_translator` makes a functional Keras model: embeddings, a stack of
`keras.layers.RNN` over stock cells for the encoder and the decoder (so
`enable_lora` turns it into the paper's model), Luong-style attention of
each decoder output over the encoder outputs (padding masked), and a
`Dense` over the target vocabulary. Inputs `[encoder_tokens,
decoder_inputs]` (int32, padding id 0); output logits
`(batch, target_length, target_vocab)`.

The decoder RNN does not read the attention context (no input feeding), so
decoding one token at a time, carrying the RNN state, is exactly the
full-sequence computation: the encoder runs once per sentence and no prefix
is ever re-run.
"""

import re

import keras
from keras import ops

PAD_ID, START_ID, END_ID = 0, 2, 3

_CELLS = {
    "simple_rnn": keras.layers.SimpleRNNCell,
    "gru": keras.layers.GRUCell,
    "lstm": keras.layers.LSTMCell,
}
_ATTENTION = {
    "luong": lambda: keras.layers.Attention(name="attention"),
    "bahdanau": lambda: keras.layers.AdditiveAttention(name="attention"),
}


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive "
            f"integer. Received: {name}={value!r}"
        )


def build_translator(
    src_vocab_size,
    tgt_vocab_size,
    *,
    embedding_dim=128,
    units=256,
    cell="gru",
    num_layers=1,
    bidirectional_encoder=False,
    attention="luong",
    name="translator",
):
    """An RNN encoder-decoder with attention, as a functional Keras model.

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes (id 0 is padding).
        embedding_dim: size of both embeddings. Default 128.
        units: RNN width. Default 256 (a 2-core CPU trains it in minutes).
        cell: `"simple_rnn"`, `"gru"` (default) or `"lstm"`.
        num_layers: stacked RNN layers in the encoder and in the decoder.
        bidirectional_encoder: read the source both ways; each direction
            has `units // 2` units, so the decoder still gets `units`.
        attention: `"luong"` (dot product, default) or `"bahdanau"`
            (additive).
        name: the model's name.

    Returns:
        A `keras.Model` with inputs `[encoder_tokens, decoder_inputs]` and
        logits of shape `(batch, target_length, tgt_vocab_size)`.
    """
    for arg in ("src_vocab_size", "tgt_vocab_size", "embedding_dim"):
        _positive_int(arg, locals()[arg])
    _positive_int("units", units)
    _positive_int("num_layers", num_layers)
    if cell not in _CELLS:
        raise ValueError(
            f"Received an invalid value for `cell`, expected one of "
            f"{sorted(_CELLS)}. Received: cell={cell!r}"
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
    encoder_tokens = keras.Input((None,), dtype="int32", name="encoder_tokens")
    decoder_inputs = keras.Input((None,), dtype="int32", name="decoder_inputs")
    x = keras.layers.Embedding(
        src_vocab_size, embedding_dim, name="source_embedding"
    )(encoder_tokens)
    source_mask = ops.not_equal(encoder_tokens, PAD_ID)
    encoder_states = []
    for i in range(num_layers):
        x, states = _encoder_layer(
            cell, units, i, bidirectional_encoder, x, source_mask
        )
        encoder_states.append(states)
    y = keras.layers.Embedding(
        tgt_vocab_size, embedding_dim, name="target_embedding"
    )(decoder_inputs)
    for i in range(num_layers):
        layer = keras.layers.RNN(
            _CELLS[cell](units),
            return_sequences=True,
            return_state=True,
            name=f"decoder_{i}",
        )
        y, *_ = layer(y, initial_state=encoder_states[i])
    logits = _attend_and_project(
        y, x, source_mask, attention, units, tgt_vocab_size
    )
    return keras.Model([encoder_tokens, decoder_inputs], logits, name=name)


def _encoder_layer(cell, units, index, bidirectional, x, mask):
    """One encoder layer: outputs and the final state the decoder starts from.

    For a bidirectional layer the two directions' states are concatenated,
    so the decoder sees `units` wide states either way.
    """
    width = units // 2 if bidirectional else units
    rnn = keras.layers.RNN(
        _CELLS[cell](width),
        return_sequences=True,
        return_state=True,
        name=f"encoder_{index}"
        if not bidirectional
        else f"encoder_{index}_rnn",
    )
    if not bidirectional:
        outputs, *states = rnn(x, mask=mask)
        return outputs, states
    outputs, *states = keras.layers.Bidirectional(rnn, name=f"encoder_{index}")(
        x, mask=mask
    )
    half = len(states) // 2
    states = [
        keras.layers.Concatenate(name=f"encoder_{index}_state_{k}")(
            [states[k], states[half + k]]
        )
        for k in range(half)
    ]
    return outputs, states


def _attend_and_project(decoded, encoded, source_mask, attention, units, vocab):
    context = _ATTENTION[attention]()(
        [decoded, encoded], mask=[None, source_mask]
    )
    combined = keras.layers.Concatenate(name="attention_concat")(
        [decoded, context]
    )
    attended = keras.layers.Dense(
        units, activation="tanh", name="attention_output"
    )(combined)
    return keras.layers.Dense(vocab, name="logits")(attended)


# -- loss and metrics --------------------------------------------------------


def _token_losses(y_true, logits):
    y_true = ops.cast(y_true, "int32")
    mask = ops.cast(ops.not_equal(y_true, PAD_ID), "float32")
    losses = keras.losses.sparse_categorical_crossentropy(
        y_true, ops.cast(logits, "float32"), from_logits=True
    )
    return losses * mask, mask


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class MaskedSparseCrossEntropy(keras.losses.Loss):
    """Mean token cross-entropy from logits over non-padding tokens only.

    Padding (id 0) in the targets never counts: the sum of per-token losses
    is divided by the number of real tokens in the batch.
    """

    def __init__(self, name="masked_sparse_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        losses, mask = _token_losses(y_true, y_pred)
        return ops.sum(losses) / ops.maximum(ops.sum(mask), 1.0)


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class MaskedPerplexity(keras.metrics.Metric):
    """exp(mean per-token cross-entropy), over non-padding tokens only.

    Accumulates the summed loss and the token count over all batches, so
    the epoch value is the corpus perplexity, not a mean of batch values.
    """

    def __init__(self, name="perplexity", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total_loss = self.add_variable((), "zeros", name="total_loss")
        self.tokens = self.add_variable((), "zeros", name="tokens")

    def update_state(self, y_true, y_pred, sample_weight=None):
        losses, mask = _token_losses(y_true, y_pred)
        self.total_loss.assign_add(ops.sum(losses))
        self.tokens.assign_add(ops.sum(mask))

    def result(self):
        return ops.exp(self.total_loss / ops.maximum(self.tokens, 1.0))


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class MaskedAccuracy(keras.metrics.Metric):
    """Token accuracy (argmax of the logits) over non-padding tokens."""

    def __init__(self, name="accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.correct = self.add_variable((), "zeros", name="correct")
        self.tokens = self.add_variable((), "zeros", name="tokens")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.cast(y_true, "int32")
        mask = ops.cast(ops.not_equal(y_true, PAD_ID), "float32")
        hits = ops.cast(
            ops.equal(ops.cast(ops.argmax(y_pred, axis=-1), "int32"), y_true),
            "float32",
        )
        self.correct.assign_add(ops.sum(hits * mask))
        self.tokens.assign_add(ops.sum(mask))

    def result(self):
        return self.correct / ops.maximum(self.tokens, 1.0)


def compile_translator(model, learning_rate=1e-3, **compile_kwargs):
    """Compiles `model` with Adam, the masked loss, accuracy and perplexity."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, clipnorm=1.0),
        loss=MaskedSparseCrossEntropy(),
        metrics=[MaskedAccuracy(), MaskedPerplexity()],
        **compile_kwargs,
    )
    return model


# -- incremental decoding ----------------------------------------------------


class _Parts:
    """The translator's layers, found by name in any model built by
    `build_translator` (also after `enable_lora` or `to_base_model`)."""

    def __init__(self, model):
        self.source_embedding = model.get_layer("source_embedding")
        self.target_embedding = model.get_layer("target_embedding")
        names = [layer.name for layer in model.layers]
        count = sum(1 for n in names if re.fullmatch(r"decoder_\d+", n))
        self.encoders = [model.get_layer(f"encoder_{i}") for i in range(count)]
        self.decoders = [model.get_layer(f"decoder_{i}") for i in range(count)]
        self.state_concats = [
            [
                model.get_layer(n)
                for n in names
                if n.startswith(f"encoder_{i}_state_")
            ]
            for i in range(count)
        ]
        self.attention = model.get_layer("attention")
        self.attention_concat = model.get_layer("attention_concat")
        self.attention_output = model.get_layer("attention_output")
        self.logits = model.get_layer("logits")


def encode(model, encoder_tokens):
    """Runs the encoder once: `(encoder_outputs, source_mask, states)`."""
    parts = _Parts(model)
    tokens = ops.convert_to_tensor(encoder_tokens, "int32")
    mask = ops.not_equal(tokens, PAD_ID)
    x = parts.source_embedding(tokens)
    states = []
    for encoder, concats in zip(
        parts.encoders, parts.state_concats, strict=True
    ):
        x, *layer_states = encoder(x, mask=mask)
        if concats:
            half = len(layer_states) // 2
            layer_states = [
                concat([layer_states[k], layer_states[half + k]])
                for k, concat in enumerate(concats)
            ]
        states.append(layer_states)
    return x, mask, states


def decode_step(model, tokens, encoder_outputs, source_mask, states):
    """One decoder step: `tokens` (batch,) -> `(logits, new_states)`.

    Carries the RNN states; the attention reads the encoder outputs.
    """
    parts = _Parts(model)
    y = parts.target_embedding(ops.expand_dims(tokens, 1))
    new_states = []
    for decoder, layer_states in zip(parts.decoders, states, strict=True):
        y, *layer_states = decoder(y, initial_state=layer_states)
        new_states.append(layer_states)
    context = parts.attention([y, encoder_outputs], mask=[None, source_mask])
    attended = parts.attention_output(parts.attention_concat([y, context]))
    return parts.logits(attended)[:, 0, :], new_states


def greedy_decode(model, encoder_tokens, max_length=64):
    """Greedy translation of a batch of token ids, one step at a time.

    The encoder runs once; each step feeds the previous token and the
    carried state (a `keras.ops.while_loop`, so it also traces into a
    graph). Stops at `[END]` for every row or at `max_length` tokens.

    Returns:
        int32 array `(batch, max_length)`: the tokens after `[START]`,
        `[END]` included where reached, 0 after it.
    """
    _positive_int("max_length", max_length)
    encoder_outputs, source_mask, states = encode(model, encoder_tokens)
    batch = ops.shape(encoder_outputs)[0]
    output = ops.zeros((batch, max_length), "int32")
    tokens = ops.full((batch,), START_ID, "int32")
    done = ops.zeros((batch,), "bool")

    def cond(step, tokens, done, output, states):
        return ops.logical_and(
            step < max_length, ops.logical_not(ops.all(done))
        )

    def body(step, tokens, done, output, states):
        logits, states = decode_step(
            model, tokens, encoder_outputs, source_mask, states
        )
        next_tokens = ops.cast(ops.argmax(logits, axis=-1), "int32")
        next_tokens = ops.where(done, PAD_ID, next_tokens)
        column = ops.one_hot(step, max_length, dtype="int32")
        output = output + ops.expand_dims(next_tokens, 1) * column
        done = ops.logical_or(done, ops.equal(next_tokens, END_ID))
        return step + 1, next_tokens, done, output, states

    _, _, _, output, _ = ops.while_loop(
        cond,
        body,
        (0, tokens, done, output, states),
        maximum_iterations=max_length,
    )
    return output


def strip_special(ids):
    """Token ids up to (not including) `[END]`, padding removed."""
    kept = []
    for token in ids:
        token = int(token)
        if token == END_ID:
            break
        if token != PAD_ID:
            kept.append(token)
    return kept


def translate(model, sentences, src_tokenizer, tgt_tokenizer, max_length=64):
    """Translates a list of strings with greedy decoding.

    Returns:
        A list of detokenized strings, one per sentence.
    """
    if not sentences:
        return []
    token_lists = [
        [int(t) for t in ops.convert_to_numpy(src_tokenizer(s))][:max_length]
        for s in sentences
    ]
    width = max(1, max(len(t) for t in token_lists))
    batch = [t + [PAD_ID] * (width - len(t)) for t in token_lists]
    decoded = ops.convert_to_numpy(greedy_decode(model, batch, max_length))
    return [
        tgt_tokenizer.detokenize(strip_special(row))
        if strip_special(row)
        else ""
        for row in decoded
    ]


# -- evaluation ----------------------------------------------------------------


def corpus_scores(hypotheses, references):
    """Corpus BLEU (sacrebleu's default 13a tokenization) and chrF of
    detokenized hypotheses against one reference each.

    Returns:
        `{"bleu": float, "chrf": float}`, both on sacrebleu's 0-100 scale.
    """
    import sacrebleu

    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(
            f"Received {len(hypotheses)} `hypotheses` but "
            f"{len(references)} `references`: they must pair up."
        )
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }
