"""Tests for decoding: greedy and beam search over a step function."""

import keras
import numpy as np
import pytest
from conftest import to_numpy
from translators import SRC_VOCAB
from translators import random_batch
from translators import tiny_translator

from keras_rnn_lora.translation import decoding
from keras_rnn_lora.translation import tokens


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_incremental_decoding_equals_rerunning_the_prefix(cell):
    model = tiny_translator(cell=cell, num_layers=2, bidirectional_encoder=True)
    src, _, _ = random_batch(2)
    steps = 6
    greedy = to_numpy(decoding.greedy_decode(model, src, max_length=steps))
    prefix = np.full((len(src), 1), tokens.START_ID, "int32")
    for _ in range(steps):
        logits = to_numpy(model([src, prefix]))
        next_tokens = logits[:, -1].argmax(-1).astype("int32")
        prefix = np.concatenate([prefix, next_tokens[:, None]], 1)
    rerun = prefix[:, 1:]
    for row, expected in zip(greedy, rerun, strict=True):
        stop = list(expected).index(3) + 1 if 3 in expected else steps
        np.testing.assert_array_equal(row[:stop], expected[:stop])
        assert (row[stop:] == 0).all()


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_beam_width_one_is_greedy_and_wider_beams_score_no_lower(cell):
    model = tiny_translator(cell=cell, num_layers=2, bidirectional_encoder=True)
    src = np.random.default_rng(5).integers(4, SRC_VOCAB, (6, 7))
    greedy, greedy_scores = decoding.greedy_decode(
        model, src.astype("int32"), max_length=8, return_scores=True
    )
    beam1, beam1_scores = decoding.decode(model, src, 1, max_length=8)
    np.testing.assert_array_equal(to_numpy(beam1), to_numpy(greedy))
    np.testing.assert_allclose(to_numpy(beam1_scores), to_numpy(greedy_scores))
    for width in (2, 4):
        _, scores = decoding.decode(model, src, width, max_length=8)
        assert (to_numpy(scores) >= to_numpy(greedy_scores) - 1e-5).all()
    with pytest.raises(ValueError, match="`beam_width`"):
        decoding.decode(model, src, 0)


def test_compiled_decoder_matches_eager_decoding():
    model = tiny_translator(cell="gru", num_layers=2)
    src = (
        np.random.default_rng(6).integers(4, SRC_VOCAB, (4, 7)).astype("int32")
    )
    for width in (1, 3):
        expected, expected_scores = decoding.decode(model, src, width, 6)
        decoder = decoding.compiled_decoder(
            model, beam_width=width, max_length=6
        )
        tokens, scores = decoder(src)
        np.testing.assert_array_equal(to_numpy(tokens), to_numpy(expected))
        np.testing.assert_allclose(
            to_numpy(scores), to_numpy(expected_scores), atol=1e-5
        )


def test_search_is_generic_over_a_step_function():
    """A toy step function that knows the answer: greedy and beam search
    recover it, and beam search finds a path greedy misses."""
    vocab = 6
    # From [START], token 4 looks best, but nothing after it is likely (a
    # uniform row); token 5 is followed by [END] almost surely.
    table = np.zeros((vocab, vocab), "float32")
    table[tokens.START_ID] = -9.0
    table[tokens.START_ID, 4], table[tokens.START_ID, 5] = -0.5, -1.0
    table[5] = -9.0
    table[5, tokens.END_ID] = 0.0

    def step_fn(previous, state):
        return keras.ops.take(
            keras.ops.convert_to_tensor(table), previous, 0
        ), {"steps": state["steps"] + 1}

    state = {"steps": keras.ops.zeros((2, 1))}
    greedy, greedy_scores = decoding.greedy_search(step_fn, state, 2, 4)
    beam, beam_scores = decoding.beam_search(step_fn, state, 2, 3, 4)
    assert to_numpy(greedy)[0, 0] == 4
    assert to_numpy(beam)[0].tolist() == [5, tokens.END_ID, 0, 0]
    assert (to_numpy(beam_scores) > to_numpy(greedy_scores)).all()


@pytest.mark.parametrize("max_length", [2, 6])
def test_a_mixed_batch_gathers_its_factors_once_per_decode(
    max_length, monkeypatch
):
    """Decoding a batch of per-example adapters gathers every layer's
    factors once, before the step loop, whatever its length; each example
    decodes as it does alone with its adapter."""
    import keras_rnn_lora
    from keras_rnn_lora import routing
    from keras_rnn_lora.walk import lora_adapters

    model = keras_rnn_lora.enable_lora(
        tiny_translator(cell="gru", num_layers=2), rank=2
    )
    keras_rnn_lora.add_adapter(model, "news", rank=3)
    rng = np.random.default_rng(3)
    hosts = lora_adapters(model).values()
    for host in hosts:
        for name in ("default", "news"):
            host.set_adapter_values(
                name,
                {
                    f: rng.normal(size=s).astype("float32")
                    for f, s in host.adapter_shapes(name).items()
                },
            )
    src = rng.integers(4, SRC_VOCAB, (4, 7)).astype("int32")
    chosen = ["news", "default", "base", "news"]
    names = keras_rnn_lora.list_adapters(model)
    ids = keras_rnn_lora.named_adapters.adapter_ids(model, chosen)
    calls = []
    gather = routing.RoutedFactors.factors_for_route

    def counted(self, *args):
        calls.append(id(self))
        return gather(self, *args)

    monkeypatch.setattr(routing.RoutedFactors, "factors_for_route", counted)
    with routing.routed(names, ids):
        mixed = to_numpy(decoding.greedy_decode(model, src, max_length))
    assert len(calls) == sum(len(h.lora_targets) for h in hosts)
    for row, name in enumerate(chosen):
        with routing.routed(
            names, [names.index(name) if name in names else -1]
        ):
            alone = to_numpy(
                decoding.greedy_decode(model, src[row : row + 1], max_length)
            )
        np.testing.assert_array_equal(mixed[row], alone[0])


def test_factors_gathered_for_a_decode_are_dropped_after_it():
    """What a decode gathers for its route is not read after it: a call in
    the same route after the weights changed uses the new ones. A decode
    inside an enclosing `prepared` block puts that block's factors back."""
    import keras_rnn_lora
    from keras_rnn_lora import routing
    from keras_rnn_lora.walk import lora_adapters

    model = keras_rnn_lora.enable_lora(tiny_translator(cell="gru"), rank=2)
    keras_rnn_lora.add_adapter(model, "news", rank=2)
    hosts = list(lora_adapters(model).values())
    rng = np.random.default_rng(5)

    def set_random_factors():
        for host in hosts:
            host.set_adapter_values(
                "news",
                {
                    f: rng.normal(size=s).astype("float32")
                    for f, s in host.adapter_shapes("news").items()
                },
            )

    def encoded():
        return to_numpy(model.encode(src)["encoder_outputs"])

    src = rng.integers(4, SRC_VOCAB, (2, 5)).astype("int32")
    names = keras_rnn_lora.list_adapters(model)
    ids = [names.index("news")] * 2
    set_random_factors()
    with routing.routed(names, ids):
        before = encoded()
        decoding.greedy_decode(model, src, 4)
        assert routing.current().factors == {}
        set_random_factors()
        after = encoded()
        with routing.prepared(hosts):
            outer = dict(routing.current().factors)
            decoding.greedy_decode(model, src, 4)
            assert routing.current().factors == outer
    with routing.routed(names, ids):
        fresh = encoded()
    np.testing.assert_allclose(after, fresh, rtol=1e-5, atol=1e-6)
    assert not np.allclose(before, after)
