"""Where our torch step and the paper's own PyTorch loop differ, from
`torch.profiler`.

The two steps are `networks.paper_loop_steps()`: the paper's LoRA
Elman RNN written in PyTorch, and our `LoRASimpleRNN` model on the same
work (2 x 512, rank 4, vocabulary 8,000, T=30, batch 16, the loss on
flattened logits). Their wall times are measured unprofiled and
interleaved (`measurement.interleaved_times`); then, again interleaved
round by round, one step at a time runs under `torch.profiler` (CPU): the
operators' self CPU time a step, in all and the largest, and the part of
the profiled step outside every operator (its wall time minus that: Python,
Keras, dispatch; the profiler's own cost falls on both steps). Medians over
rounds.

It shows where our step spends the time it takes beyond the paper's loop,
set against the target of at most the paper's step (`speed_targets.py`;
docs/performance.md, "Where the time goes").

    KERAS_BACKEND=torch python benchmarks/profile_torch_paper_loop.py \
        [--rounds 7]

Writes benchmarks/results/profile_torch_paper_loop.json; prints each
step's largest operators, then a Markdown table last. About a minute on a
2-core CPU.
"""

import statistics

import harness
import networks

from keras_rnn_lora import measurement
from keras_rnn_lora.measurement import ratio_summary

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
    args = harness.parser(__doc__, rounds=7).parse_args()
    if harness.backend() != "torch":
        raise SystemExit("Run it with KERAS_BACKEND=torch.")
    all_steps = networks.paper_loop_steps()
    steps = {name: all_steps[name] for name in NAMES}
    times = measurement.interleaved_times(steps, args.rounds)
    results = interleaved_profiles(steps, args.rounds)
    for name in NAMES:
        results[name]["step_ms"] = 1000 * statistics.median(times[name])
    results["ratio ours / paper"] = ratio_summary(times, "ours", "paper")
    harness.write_results("profile_torch_paper_loop", results)
    for name in NAMES:
        print(f"\n{name}: largest operators (ms a step)")
        for op, ms in results[name]["top_operators_ms"].items():
            print(f"  {ms:7.2f}  {op}")
    rows = (
        ("step, not profiled", "step_ms", ".1f"),
        ("step, profiled", "profiled_step_ms", ".1f"),
        ("in operators (profiled)", "operator_ms", ".1f"),
        ("outside operators (profiled)", "outside_operators_ms", ".1f"),
        ("operator calls", "operator_calls", ",.0f"),
    )
    harness.print_table(
        ["", "paper's loop", "ours"],
        [
            [label, *(format(results[name][key], spec) for name in NAMES)]
            for label, key, spec in rows
        ],
        title="A training step, ms (operators: self CPU time)",
    )


if __name__ == "__main__":
    main()
