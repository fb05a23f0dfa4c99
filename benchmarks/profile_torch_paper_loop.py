"""Where our torch step and the paper's own PyTorch loop differ, from
`torch.profiler`.

The two steps are `lora_vs_full.paper_loop_steps()`: the paper's LoRA
Elman RNN written in PyTorch, and our `LoRASimpleRNN` model on the same
work (2 x 512, rank 4, vocabulary 8,000, T=30, batch 16, the loss on
flattened logits). Their wall times are measured unprofiled and
interleaved (`measurement.interleaved_times`); then, again interleaved
round by round, one step at a time runs under `torch.profiler` (CPU): the
operators' self CPU time a step, in all and the largest, and the part of
the profiled step outside every operator (its wall time minus that: Python,
Keras, dispatch; the profiler's own cost falls on both steps). Medians over
rounds.

This is what says why our step stays above the paper's loop (issue 16):
see the README's Performance section.

    KERAS_BACKEND=torch python benchmarks/profile_torch_paper_loop.py \
        [--rounds 7]

Writes benchmarks/results/profile_torch_paper_loop.json; a Markdown table
last. About a minute on a 2-core CPU.
"""

import argparse
import json
import os
import statistics

import lora_vs_full as base

from keras_rnn_lora import measurement

NAMES = ("paper", "ours")
TOP_OPERATORS = 12  # the largest operators of each step, kept in the JSON


def profiled_step(step):
    """One step under `torch.profiler` (CPU): its wall time, and the self
    CPU time and calls of every operator in it, in ms."""
    import time

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        wall_ms = 1000 * (time.perf_counter() - start)
    averages = prof.key_averages()
    operators = {e.key: e.self_cpu_time_total / 1000 for e in averages}
    calls = sum(e.count for e in averages)
    return wall_ms, operators, calls


def interleaved_profiles(steps, rounds):
    """`profiled_step` of every step, round after round in rotating order
    (so load on the machine falls on both alike): medians over rounds."""
    for step in steps.values():  # warm up
        step()
        step()
    names = list(steps)
    samples = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(profiled_step(steps[name]))
    results = {}
    for name, runs in samples.items():
        walls = [wall for wall, _, _ in runs]
        in_ops = [sum(ops.values()) for _, ops, _ in runs]
        names_seen = {op for _, ops, _ in runs for op in ops}
        by_operator = {
            op: statistics.median(ops.get(op, 0.0) for _, ops, _ in runs)
            for op in names_seen
        }
        top = sorted(by_operator.items(), key=lambda item: -item[1])
        results[name] = {
            "profiled_step_ms": statistics.median(walls),
            "operator_ms": statistics.median(in_ops),
            "outside_operators_ms": statistics.median(
                w - o for w, o in zip(walls, in_ops, strict=True)
            ),
            "operator_calls": statistics.median(c for _, _, c in runs),
            "top_operators_ms": dict(top[:TOP_OPERATORS]),
        }
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    import keras

    if keras.backend.backend() != "torch":
        raise SystemExit("Run it with KERAS_BACKEND=torch.")
    all_steps = base.paper_loop_steps()
    steps = {name: all_steps[name] for name in NAMES}
    times = measurement.interleaved_times(steps, args.rounds)
    results = interleaved_profiles(steps, args.rounds)
    for name in NAMES:
        results[name]["step_ms"] = 1000 * statistics.median(times[name])
    results["ratio ours / paper"] = base.ratio(times, "ours", "paper")
    os.makedirs(base.RESULTS, exist_ok=True)
    out = os.path.join(base.RESULTS, "profile_torch_paper_loop.json")
    with open(out, "w") as file:
        json.dump(results, file, indent=2)
    print(f"\nA training step, ms (operators: self CPU time), {out}\n")
    print("| | paper's loop | ours |")
    print("|---|---:|---:|")
    rows = (
        ("step, not profiled", "step_ms", ".1f"),
        ("step, profiled", "profiled_step_ms", ".1f"),
        ("in operators (profiled)", "operator_ms", ".1f"),
        ("outside operators (profiled)", "outside_operators_ms", ".1f"),
        ("operator calls", "operator_calls", ",.0f"),
    )
    for label, key, spec in rows:
        cells = [format(results[name][key], spec) for name in NAMES]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for name in NAMES:
        print(f"\n{name}: largest operators (ms a step)")
        for op, ms in results[name]["top_operators_ms"].items():
            print(f"  {ms:7.2f}  {op}")


if __name__ == "__main__":
    main()
