"""Where a TensorFlow training step spends its time, from the TF profiler.

The networks and batch are `networks.py`'s (default size: embedding
128, two GRU 256 layers, a `Dense` over 8,000 tokens, batch 64 x 30). For
each mode, a few steps run under `tf.profiler.experimental`; the trace's
operator events (the executor threads' `tf_Compute` lines of the host
plane) are summed by operator and grouped into the parts of the network:
GRU forward, GRU backward, the output projection (forward and backward),
the loss over the vocabulary, the optimizer. The profiler adds a cost to
every operator it records, so compare shares within one mode, and the
large single operators (the projection's matmuls, the loss) across modes.
Also per mode: the operators launched a step, and the step's time measured
before profiling (median of `--steps`; the interleaved ratios are
`speed_targets.py`'s).

It shows where the time of a step with `base_dtype="bfloat16"` goes
against a full step at this size, set against the target of 0.45 of a full
step (`speed_targets.py`; docs/performance.md, "Where the time goes").

    KERAS_BACKEND=tensorflow python benchmarks/profile_tf_step.py \
        [--modes full lora_bf16] [--steps 7]

Writes benchmarks/results/profile_tf_step.json; a Markdown table last.
About a minute on a 2-core CPU.
"""

import collections
import glob
import os
import statistics
import tempfile
import time

import harness
import networks

# Events that contain others (the executor's and the thread pool's): not
# operators; counting them would count their operators twice.
CONTAINERS = ("ExecutorState::Process", "ParallelFor")
TOP_OPERATORS = 20  # the largest operators of each mode, kept in the JSON


def part(name):
    """The part of the network an operator event `scope/op:OpType` is in."""
    if name in CONTAINERS or ":" not in name:
        return None
    if "compile_loss" in name or "SparseSoftmax" in name:
        return "loss over the vocabulary"
    if "dense" in name:
        return "output projection"
    if "adam" in name:
        return "optimizer"
    if "gru" in name:
        return "GRU backward" if "gradient_tape" in name else "GRU forward"
    if "embedding" in name:
        return "embedding"
    return "other"


def operator_ms(xplane_path, steps):
    """Milliseconds per step of every operator in a profiler trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as file:
        space.ParseFromString(file.read())
    totals = collections.Counter()
    launches = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                totals[name] += event.duration_ps / 1e9 / steps
                launches[name] += 1 / steps
    return totals, launches


def profile(mode, size, steps, logdir):
    import tensorflow as tf

    model = networks.build(mode, size)
    x, y = networks.batch(size)
    for _ in range(3):  # trace, then warm caches
        model.train_on_batch(x, y)
    unprofiled = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        unprofiled.append(1000 * (time.perf_counter() - start))
    tf.profiler.experimental.start(logdir)
    for _ in range(steps):
        model.train_on_batch(x, y)
    tf.profiler.experimental.stop()
    (path,) = glob.glob(
        os.path.join(logdir, "**", "*.xplane.pb"), recursive=True
    )
    operators, launches = operator_ms(path, steps)
    parts = collections.Counter()
    for name, ms in operators.items():
        if part(name) is not None:
            parts[part(name)] += ms
    listed = [(n, ms) for n, ms in operators.most_common() if part(n)]
    return {
        "step_ms_unprofiled": statistics.median(unprofiled),
        "operator_launches": round(
            sum(n for name, n in launches.items() if part(name))
        ),
        "parts_ms": dict(parts.most_common()),
        "top_operators_ms": dict(listed[:TOP_OPERATORS]),
    }


def main():
    parser = harness.parser(__doc__)
    parser.add_argument("--modes", nargs="+", default=["full", "lora_bf16"])
    parser.add_argument("--steps", type=harness.positive_int, default=7)
    args = parser.parse_args()
    if harness.backend() != "tensorflow":
        raise SystemExit("Run it with KERAS_BACKEND=tensorflow.")
    size = networks.SIZES["default"]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for mode in args.modes:
            logdir = tempfile.mkdtemp(dir=scratch)
            results[mode] = profile(mode, size, args.steps, logdir)
    harness.write_results(
        "profile_tf_step", {"size": size, "steps": args.steps, **results}
    )
    names = sorted({p for r in results.values() for p in r["parts_ms"]})
    rows = []
    for name in names:
        cells = []
        for mode in args.modes:
            parts = results[mode]["parts_ms"]
            share = parts.get(name, 0.0) / sum(parts.values())
            cells.append(f"{parts.get(name, 0.0):.1f} ({share:.0%})")
        rows.append([name, *cells])
    totals = [sum(results[m]["parts_ms"].values()) for m in args.modes]
    rows.append(["all operators", *(f"{t:.1f}" for t in totals)])
    counts = [results[m]["operator_launches"] for m in args.modes]
    rows.append(["operator launches", *(f"{n:,}" for n in counts)])
    steps = [results[m]["step_ms_unprofiled"] for m in args.modes]
    rows.append(["step, not profiled (median)", *(f"{t:.1f}" for t in steps)])
    harness.print_table(
        ["part", *args.modes],
        rows,
        title="Operator time per step (ms, share of the mode's)",
    )


if __name__ == "__main__":
    main()
