"""Greedy translation throughput: incremental decoder vs re-running the prefix.

`build_translator`'s default (embedding 256, GRU 256) over a vocabulary of
8,000, with random weights, decoding a fixed number of steps
(`--steps`) for batches of 1 and 64 source sentences of 20 tokens:

- incremental: greedy `decode` (encoder once, one decoder step per
  token carrying the state), compiled with `compiled_decoder`;
- prefix re-run: the full model called on the growing prefix at each step
  (what decoding costs without a stateful decoder).

Rounds alternate A B A B; sentences/s as median (min-max).
Writes benchmarks/results/decode_speed_<backend>.json; Markdown table last.

Usage: KERAS_BACKEND=jax python benchmarks/decode_speed.py [--rounds 5]
About a minute per backend on a 2-core CPU.
"""

import argparse
import json
import os
import statistics
import time

import keras
import numpy as np
from keras import ops

from keras_rnn_lora.translation import build_translator
from keras_rnn_lora.translation import compiled_decoder
from keras_rnn_lora.translation.tokens import START_ID

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def rerun_prefix(model, source, steps):
    """Greedy decoding by running the whole model on the prefix each step.

    The prefix is padded to a fixed width (the decoder is causal, so the
    padding cannot change the logits read at position `t`), which lets the
    compiled predict function serve every step with one shape.
    """
    prefix = np.zeros((len(source), steps + 1), "int32")
    prefix[:, 0] = START_ID
    for t in range(steps):
        logits = model.predict_on_batch([source, prefix])
        prefix[:, t + 1] = np.asarray(logits)[:, t].argmax(-1)
    return prefix[:, 1:]


def timed(fn):
    start = time.perf_counter()
    ops.convert_to_numpy(fn())
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    model = build_translator(8000, 8000)
    decoder = compiled_decoder(model, max_length=args.steps)
    rng = np.random.default_rng(0)
    results = {}
    for batch in (1, 64):
        source = rng.integers(4, 8000, (batch, 20)).astype("int32")
        modes = {
            "incremental": lambda s=source: decoder(s)[0],
            "prefix re-run": lambda s=source: rerun_prefix(
                model, s, args.steps
            ),
        }
        for fn in modes.values():
            timed(fn)  # warm-up: trace and compile
        times = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode, fn in modes.items():
                times[mode].append(timed(fn))
        for mode, values in times.items():
            speeds = [batch / t for t in values]
            results[f"{mode}, batch {batch}"] = {
                "sentences_per_s_median": statistics.median(speeds),
                "sentences_per_s_min": min(speeds),
                "sentences_per_s_max": max(speeds),
            }
        pairs = zip(times["incremental"], times["prefix re-run"], strict=True)
        ratio = statistics.median([p / i for i, p in pairs])
        results[f"speedup, batch {batch}"] = ratio
    backend = keras.backend.backend()
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"decode_speed_{backend}.json")
    with open(path, "w") as file:
        json.dump(
            {"backend": backend, "steps": args.steps, **results}, file, indent=2
        )
    print(f"\nbackend {backend}, {args.steps} steps, {args.rounds} rounds\n")
    print("| decoder | batch | sentences/s median (min-max) |")
    print("|---|---:|---:|")
    for key, r in results.items():
        if key.startswith("speedup"):
            continue
        mode, batch = key.split(", batch ")
        low, high = r["sentences_per_s_min"], r["sentences_per_s_max"]
        print(
            f"| {mode} | {batch} | {r['sentences_per_s_median']:,.1f} "
            f"({low:,.1f}-{high:,.1f}) |"
        )
    for batch in (1, 64):
        print(
            f"\nincremental / prefix re-run speedup, batch {batch}: "
            f"{results[f'speedup, batch {batch}']:.1f}x (median of pairs)"
        )


if __name__ == "__main__":
    main()
