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

import statistics
import time

import harness
import networks
import numpy as np
from keras import ops

from keras_rnn_lora.translation.tokens import START_ID


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
    parser = harness.parser(__doc__, rounds=5)
    parser.add_argument("--steps", type=harness.positive_int, default=20)
    args = parser.parse_args()
    model, decoder = networks.greedy_decoder(args.steps)
    results = {}
    for batch in (1, 64):
        source = networks.source_sentences(batch, seed=batch)
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
    backend = harness.backend()
    harness.write_results(
        f"decode_speed_{backend}",
        {"backend": backend, "steps": args.steps, **results},
    )
    for batch in (1, 64):
        print(
            f"incremental / prefix re-run speedup, batch {batch}: "
            f"{results[f'speedup, batch {batch}']:.1f}x (median of pairs)"
        )
    rows = []
    for key, r in results.items():
        if key.startswith("speedup"):
            continue
        mode, batch = key.split(", batch ")
        low, high = r["sentences_per_s_min"], r["sentences_per_s_max"]
        rows.append(
            [
                mode,
                batch,
                f"{r['sentences_per_s_median']:,.1f} ({low:,.1f}-{high:,.1f})",
            ]
        )
    harness.print_table(
        ["decoder", "batch", "sentences/s median (min-max)"],
        rows,
        title=f"backend {backend}, {args.steps} steps, {args.rounds} rounds",
    )


if __name__ == "__main__":
    main()
