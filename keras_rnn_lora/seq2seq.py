"""The RNN encoder-decoder translator the paper's method is applied to.

`build_translator` makes a functional Keras model: embeddings, a stack of
`keras.layers.GRU` (or `LSTM`, `SimpleRNN`) layers for the encoder and the
decoder (so they take the fused cuDNN kernels on a GPU, and `enable_lora`
turns them into the paper's model), Luong-style attention of
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

# Keras' whole-sequence layers, so that a GPU run takes the fused (cuDNN)
# kernels; `enable_lora` turns them into LoRAGRU/LoRALSTM/LoRASimpleRNN,
# which keep that path.
_LAYERS = {
    "simple_rnn": keras.layers.SimpleRNN,
    "gru": keras.layers.GRU,
    "lstm": keras.layers.LSTM,
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
        # No mask: padding only ever follows the real target tokens, so
        # the real steps never see it, and an unmasked layer is fused on
        # every backend that has a kernel (the loss masks the padding).
        layer = _LAYERS[cell](
            units,
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
    # The source mask is right-padded, as cuDNN wants it (TensorFlow's
    # fused kernels take such masks; torch and JAX run the step loop here).
    rnn = _LAYERS[cell](
        width,
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


def greedy_decode(model, encoder_tokens, max_length=64, return_scores=False):
    """Greedy translation of a batch of token ids, one step at a time.

    The encoder runs once; each step feeds the previous token and the
    carried state (a `keras.ops.while_loop`, so it also traces into a
    graph). Stops at `[END]` for every row or at `max_length` tokens.

    Returns:
        int32 array `(batch, max_length)`: the tokens after `[START]`,
        `[END]` included where reached, 0 after it. With `return_scores`,
        also each row's log-probability `(batch,)`.
    """
    tokens, scores = beam_search(model, encoder_tokens, 1, max_length)
    return (tokens, scores) if return_scores else tokens


def _log_softmax(logits):
    logits = ops.cast(logits, "float32")
    return logits - ops.logsumexp(logits, axis=-1, keepdims=True)


def beam_search(model, encoder_tokens, beam_width=4, max_length=64):
    """Beam search over the translator, batched, one decoder step at a time.

    The encoder runs once per sentence; the `beam_width` hypotheses of each
    sentence carry their own decoder state. A hypothesis that emitted
    `[END]` keeps its score and competes with the open ones. Scores are
    summed log-probabilities (no length penalty). `beam_width=1` is greedy
    decoding.

    A plain beam can prune the greedy path and end below it, so for
    `beam_width > 1` the greedy hypothesis (sharing the encoder pass) is kept
    as a candidate too: the result never scores below greedy decoding.

    Returns:
        `(tokens, scores)`: the best hypothesis per sentence, int32
        `(batch, max_length)` as `greedy_decode`, and its log-probability.
    """
    _positive_int("beam_width", beam_width)
    _positive_int("max_length", max_length)
    encoded = encode(model, encoder_tokens)
    tokens, scores = _search(model, encoded, beam_width, max_length)
    if beam_width == 1:
        return tokens, scores
    greedy_tokens, greedy_scores = _search(model, encoded, 1, max_length)
    better = scores >= greedy_scores
    tokens = ops.where(better[:, None], tokens, greedy_tokens)
    return tokens, ops.maximum(scores, greedy_scores)


def _search(model, encoded, beam_width, max_length):
    """The beam loop over an encoded batch (see `beam_search`)."""
    encoder_outputs, source_mask, states = encoded
    batch = ops.shape(encoder_outputs)[0]
    k = beam_width

    def tile(x):  # (batch, ...) -> (batch * k, ...), beams of a row adjacent
        return ops.repeat(x, k, axis=0)

    encoder_outputs, source_mask = tile(encoder_outputs), tile(source_mask)
    states = keras.tree.map_structure(tile, states)
    history = ops.zeros((batch, k, max_length), "int32")
    # Only beam 0 is live at the start, so the first step does not pick the
    # same token k times.
    first = ops.concatenate(
        [ops.zeros((batch, 1)), ops.full((batch, k - 1), -1e9)], axis=1
    )
    scores = ops.cast(first, "float32")
    done = ops.zeros((batch, k), "bool")
    tokens = ops.full((batch * k,), START_ID, "int32")

    def cond(step, tokens, scores, done, history, states):
        return ops.logical_and(
            step < max_length, ops.logical_not(ops.all(done))
        )

    def body(step, tokens, scores, done, history, states):
        logits, states = decode_step(
            model, tokens, encoder_outputs, source_mask, states
        )
        vocab = ops.shape(logits)[-1]
        log_probs = ops.reshape(_log_softmax(logits), (batch, k, vocab))
        # A finished hypothesis may only continue with padding, for free.
        pad_only = ops.where(ops.arange(vocab) == PAD_ID, 0.0, -1e9)[
            None, None, :
        ]
        log_probs = ops.where(done[..., None], pad_only, log_probs)
        candidates = ops.reshape(scores[..., None] + log_probs, (batch, -1))
        scores, flat = ops.top_k(candidates, k=k)
        beams = flat // vocab
        new_tokens = ops.cast(flat % vocab, "int32")

        def pick(x):  # reorder the (batch * k, width) rows by `beams`
            width = x.shape[-1]  # static, so graph loops keep their shapes
            x = ops.reshape(x, (batch, k, width))
            x = ops.take_along_axis(x, beams[..., None], axis=1)
            return ops.reshape(x, (batch * k, width))

        states = keras.tree.map_structure(pick, states)
        history = ops.take_along_axis(history, beams[..., None], axis=1)
        done = ops.take_along_axis(done, beams, axis=1)
        column = ops.one_hot(step, max_length, dtype="int32")
        history = history + new_tokens[..., None] * column
        done = ops.logical_or(done, ops.equal(new_tokens, END_ID))
        tokens = ops.reshape(new_tokens, (batch * k,))
        return step + 1, tokens, scores, done, history, states

    _, _, scores, _, history, _ = ops.while_loop(
        cond,
        body,
        (0, tokens, scores, done, history, states),
        maximum_iterations=max_length,
    )
    return history[:, 0], scores[:, 0]


def compiled_decoder(model, beam_width=1, max_length=64):
    """`beam_search` bound to `model`, compiled once for the backend.

    TensorFlow: a `tf.function`; JAX: `jax.jit` (weights are read at trace
    time, so build a new decoder after changing them); torch: eager.

    Returns:
        A function `encoder_tokens -> (tokens, scores)`.
    """

    def decode(encoder_tokens):
        return beam_search(model, encoder_tokens, beam_width, max_length)

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(decode, reduce_retracing=True)
    if backend == "jax":
        import jax

        return jax.jit(decode)
    return decode


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


def translate(
    model,
    sentences,
    src_tokenizer,
    tgt_tokenizer,
    max_length=64,
    beam_width=1,
    decoder=None,
):
    """Translates a list of strings: greedy, or beam search when
    `beam_width > 1`.

    Args:
        decoder: optional `compiled_decoder(model, beam_width, max_length)`
            to reuse across calls (much faster for many batches). Source
            batches are padded to a multiple of 16 tokens so a compiled
            decoder sees few distinct shapes.

    Returns:
        A list of detokenized strings, one per sentence.
    """
    if not sentences:
        return []
    token_lists = [
        [int(t) for t in ops.convert_to_numpy(src_tokenizer(s))][:max_length]
        for s in sentences
    ]
    width = 16 * (max(1, max(len(t) for t in token_lists)) // 16 + 1)
    batch = [t + [PAD_ID] * (width - len(t)) for t in token_lists]
    batch = ops.convert_to_tensor(batch, "int32")
    if decoder is None:
        decoded, _ = beam_search(model, batch, beam_width, max_length)
    else:
        decoded, _ = decoder(batch)
    decoded = ops.convert_to_numpy(decoded)
    texts = []
    for row in decoded:
        ids = strip_special(row)
        texts.append(tgt_tokenizer.detokenize(ids) if ids else "")
    return texts


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
