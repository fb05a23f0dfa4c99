"""Decoding: greedy and beam search over any step function, and the
translator's own decoders.

`greedy_search` and `beam_search` know nothing about models: they drive a
`step_fn(tokens, state) -> (logits, state)` (as flax's
`beam_search(tokens_to_logits)` and keras-hub's samplers do), where `state`
is any nested structure of `(batch, ...)` tensors; beam search tiles it per
beam and reorders it as hypotheses are pruned. Both run in a
`keras.ops.while_loop`, so they also trace into a graph (`tf.function`,
`jax.jit`, a SavedModel). `decode` runs a `Translator`: the encoder once per
sentence, then its `decode_step` token by token.
"""

import keras
from keras import ops

from keras_rnn_lora import routing
from keras_rnn_lora.checks import check_positive_int
from keras_rnn_lora.translation.tokens import END_ID
from keras_rnn_lora.translation.tokens import PAD_ID
from keras_rnn_lora.translation.tokens import START_ID
from keras_rnn_lora.walk import lora_adapters

_NEG_INF = -1e9


def _log_softmax(logits):
    # One fused op on every backend. (On torch, `x - logsumexp(x)` took 3/4
    # of greedy decoding at batch 1: its exp ran outside the fused kernel.)
    return ops.log_softmax(ops.cast(logits, "float32"), axis=-1)


def greedy_search(
    step_fn,
    state,
    batch_size,
    max_length,
    start_id=START_ID,
    end_id=END_ID,
    pad_id=PAD_ID,
):
    """The most likely token at every step, until `end_id` or `max_length`.

    Returns:
        `(tokens, scores)`: int32 `(batch, max_length)`, the tokens after
        `start_id` with `end_id` included where reached and `pad_id` after
        it; and each row's summed log-probability `(batch,)`.
    """
    return beam_search(
        step_fn, state, batch_size, 1, max_length, start_id, end_id, pad_id
    )


def beam_search(
    step_fn,
    state,
    batch_size,
    beam_width,
    max_length,
    start_id=START_ID,
    end_id=END_ID,
    pad_id=PAD_ID,
):
    """Beam search over `step_fn`, batched.

    Each sentence keeps `beam_width` hypotheses, each with its own `state`.
    A hypothesis that emitted `end_id` keeps its score (it continues with
    `pad_id` for free) and competes with the open ones. Scores are summed
    log-probabilities (no length penalty). `beam_width=1` is greedy search.

    Returns:
        `(tokens, scores)` of the best hypothesis per sentence, as
        `greedy_search` returns them.
    """
    check_positive_int("beam_width", beam_width)
    check_positive_int("max_length", max_length)
    k = beam_width

    def tile(x):  # (batch, ...) -> (batch * k, ...), beams of a row adjacent
        return ops.repeat(x, k, axis=0) if k > 1 else x

    state = keras.tree.map_structure(tile, state)
    history = ops.zeros((batch_size, k, max_length), "int32")
    # Only beam 0 is live at the start, so the first step does not pick the
    # same token k times.
    first = ops.concatenate(
        [ops.zeros((batch_size, 1)), ops.full((batch_size, k - 1), _NEG_INF)],
        axis=1,
    )
    scores = ops.cast(first, "float32")
    done = ops.zeros((batch_size, k), "bool")
    tokens = ops.full((batch_size * k,), start_id, "int32")

    def cond(step, tokens, scores, done, history, state):
        return ops.logical_and(
            step < max_length, ops.logical_not(ops.all(done))
        )

    def body(step, tokens, scores, done, history, state):
        logits, state = step_fn(tokens, state)
        vocab = ops.shape(logits)[-1]
        log_probs = ops.reshape(_log_softmax(logits), (batch_size, k, vocab))
        # A finished hypothesis may only continue with padding, for free.
        pad_only = ops.where(ops.arange(vocab) == pad_id, 0.0, _NEG_INF)
        log_probs = ops.where(done[..., None], pad_only[None, None], log_probs)
        candidates = ops.reshape(
            scores[..., None] + log_probs, (batch_size, -1)
        )
        scores, flat = ops.top_k(candidates, k=k)
        beams = flat // vocab
        new_tokens = ops.cast(flat % vocab, "int32")
        if k > 1:

            def pick(x):  # reorder the (batch * k, ...) rows by `beams`
                shape = tuple(x.shape[1:])  # static: graph loops keep shapes
                if None in shape:
                    shape = tuple(ops.shape(x)[1:])
                x = ops.reshape(x, (batch_size, k, -1))
                x = ops.take_along_axis(x, beams[..., None], axis=1)
                return ops.reshape(x, (batch_size * k, *shape))

            state = keras.tree.map_structure(pick, state)
            history = ops.take_along_axis(history, beams[..., None], axis=1)
            done = ops.take_along_axis(done, beams, axis=1)
        column = ops.one_hot(step, max_length, dtype="int32")
        history = history + new_tokens[..., None] * column
        done = ops.logical_or(done, ops.equal(new_tokens, end_id))
        tokens = ops.reshape(new_tokens, (batch_size * k,))
        return step + 1, tokens, scores, done, history, state

    _, _, scores, _, history, _ = ops.while_loop(
        cond,
        body,
        (0, tokens, scores, done, history, state),
        maximum_iterations=max_length,
    )
    return history[:, 0], scores[:, 0]


def decode(model, encoder_tokens, beam_width=1, max_length=64):
    """Translates a batch of token ids with a `Translator`.

    The encoder runs once; the decoder runs one step at a time carrying its
    state. `beam_width=1` is greedy decoding. A plain beam can prune the
    greedy path and end below it, so for `beam_width > 1` the greedy
    hypothesis (sharing the encoder pass) is kept as a candidate too: the
    result never scores below greedy decoding.

    Returns:
        `(tokens, scores)`: int32 `(batch, max_length)` (the tokens after
        `[START]`, `[END]` included where reached, 0 after it) and each
        row's log-probability `(batch,)`.
    """
    check_positive_int("beam_width", beam_width)
    check_positive_int("max_length", max_length)
    # Per-example adapters (a mixed batch): gathered once, not per step.
    with routing.prepared(lora_adapters(model).values()):
        return _decode(model, encoder_tokens, beam_width, max_length)


def _decode(model, encoder_tokens, beam_width, max_length):
    """`decode` within the gathered factors of a route, if any."""
    encoded = model.encode(encoder_tokens)
    batch_size = ops.shape(encoded["encoder_outputs"])[0]

    def step_function(k):
        """The translator's step over the RNN states alone: the encoder's
        outputs are the same for every beam of a sentence, so they are
        tiled once here instead of being reordered at every step."""
        context = {
            key: ops.repeat(encoded[key], k, axis=0) if k > 1 else encoded[key]
            for key in ("encoder_tokens", "encoder_outputs")
        }

        def step_fn(tokens, states):
            logits, state = model.decode_step(
                tokens, {**context, "states": states}
            )
            return logits, state["states"]

        return step_fn

    states = encoded["states"]
    tokens, scores = beam_search(
        step_function(beam_width), states, batch_size, beam_width, max_length
    )
    if beam_width == 1:
        return tokens, scores
    greedy_tokens, greedy_scores = greedy_search(
        step_function(1), states, batch_size, max_length
    )
    better = scores >= greedy_scores
    tokens = ops.where(better[:, None], tokens, greedy_tokens)
    return tokens, ops.maximum(scores, greedy_scores)


def greedy_decode(model, encoder_tokens, max_length=64, return_scores=False):
    """Greedy translation of a batch of token ids (see `decode`): the
    tokens, and with `return_scores` also each row's log-probability."""
    tokens, scores = decode(model, encoder_tokens, 1, max_length)
    return (tokens, scores) if return_scores else tokens


def compiled_decoder(model, beam_width=1, max_length=64):
    """`decode` bound to `model`, compiled once for the backend.

    TensorFlow: a `tf.function`; JAX: `jax.jit` (weights are read at trace
    time, so build a new decoder after changing them); torch: eager, under
    `torch.no_grad`.

    Returns:
        A function `encoder_tokens -> (tokens, scores)`.
    """

    def run(encoder_tokens):
        return decode(model, encoder_tokens, beam_width, max_length)

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(run, reduce_retracing=True)
    if backend == "jax":
        import jax

        return jax.jit(run)
    if backend == "torch":
        import torch

        # Eager, without autograd: decoding records no graph to go back
        # through.
        return torch.no_grad()(run)
    return run
