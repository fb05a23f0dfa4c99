"""What two workers synchronize, and how long a step takes, for full
fine-tuning against LoRA.

Two worker processes on 127.0.0.1 (the script starts them, each with its
place in the cluster in the environment: `TF_CONFIG` on TensorFlow, Keras'
`KERAS_DISTRIBUTION_*` variables on JAX) join one cluster with
`keras_rnn_lora.multi_worker_strategy` and train two arms built from the
same weights under it: `full` (a stock two-layer GRU network, every weight
trainable) and `lora` (`enable_lora(rank=8)` on its recurrent kernels,
`mark_only_lora_as_trainable`). The network is `benchmarks/networks.py`'s
(embedding, two GRU layers, `Dense` over an 8,000-word vocabulary) at
`--size default` (GRU 256, batch 64 x 30) or `--size paper` (GRU 2048,
batch 16 x 20); each batch is global, half on each worker.

Synchronized per step: the gradients of the trainable weights, which a
step all-reduces; values are their element count, bytes those times 4
(float32). JAX: checked against what the engine itself compiles, the
all-reduce operations in the train step's optimized HLO (XLA's dump).
TensorFlow exposes no count of what its collectives carry: there the
figure is computed only. The time a 10 Gbit/s link would add is
bytes / bandwidth, a calculation, not a measurement (a ring all-reduce
over two workers sends each worker's gradient once each way).

Step time: `fit` on each arm in turn, `--rounds` rounds, the order
swapped every round (A B, B A, ...); inside a round each step's time is
the gap between two `on_train_batch_end` calls (the loss read each step,
so JAX's asynchronous dispatch cannot hide work). Both workers time the
same steps; the machine's load average is recorded before and after.

    KERAS_BACKEND=tensorflow python benchmarks/multi_worker.py [--size paper]

A few minutes a backend and size on a 2-core CPU. Writes
benchmarks/results/multi_worker_<backend>_<size>.json and prints a
Markdown table.
"""

import glob
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import harness
import numpy as np

#: The link the synchronization time is computed for, in bits per second.
LINK_BITS_PER_SECOND = 10e9
WORKERS = 2
BYTES_PER_VALUE = 4  # float32 gradients
ARMS = ("full", "lora")


def parse_args(argv=None):
    parser = harness.parser(__doc__, rounds=4)
    parser.add_argument(
        "--size", choices=("default", "paper"), default="default"
    )
    parser.add_argument(
        "--steps",
        type=harness.positive_int,
        default=None,
        help="timed steps per arm and round (default: 6, paper size 2)",
    )
    parser.add_argument("--worker", type=int, default=None, help="(internal)")
    parser.add_argument("--hlo-dir", default=None, help="(internal)")
    return parser.parse_args(argv)


# -- one worker ---------------------------------------------------------------


def build_arms(size):
    """`{arm: compiled model}`, both from the same initial weights."""
    import networks

    import keras_rnn_lora

    full = networks.build("full", size)
    lora = keras_rnn_lora.enable_lora(full, rank=networks.RANK)
    keras_rnn_lora.mark_only_lora_as_trainable(lora)
    return {"full": full, "lora": networks.compile_model(lora)}


def step_timer():
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # waits for the step (JAX dispatches ahead)
            self.ends.append(time.perf_counter())

    return StepTimer()


def exit_with_parent():
    """Ends this worker when the script that started it dies."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def worker(args):
    exit_with_parent()
    import keras_rnn_lora

    strategy = keras_rnn_lora.multi_worker_strategy()
    import networks
    import tensorflow as tf

    size = networks.SIZES[args.size]
    with strategy.scope():
        models = build_arms(size)
    x, y = networks.batch(size)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    times = {arm: [] for arm in ARMS}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        order = ARMS if round_index % 2 else ARMS[::-1]
        for arm in order:
            timer = step_timer()
            models[arm].fit(
                dataset,
                epochs=1,
                steps_per_epoch=args.steps + 1,
                verbose=0,
                callbacks=[timer],
            )
            if round_index:
                times[arm] += np.diff(timer.ends).tolist()
    trainable = {
        arm: sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        for arm, model in models.items()
    }
    harness.report(
        {
            "worker": args.worker,
            "is_chief": keras_rnn_lora.is_chief(),
            "worker_count": keras_rnn_lora.worker_count(),
            "trainable_values": trainable,
            "step_seconds": times,
        }
    )


# -- the two workers ----------------------------------------------------------


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker_environment(backend, index, ports, hlo_dir):
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(harness.BENCHMARKS), env.get("PYTHONPATH")])
    )
    for name in ("TF_CONFIG", "XLA_FLAGS"):
        env.pop(name, None)
    if backend == "tensorflow":
        env["TF_CONFIG"] = json.dumps(
            {
                "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                "task": {"type": "worker", "index": index},
            }
        )
    else:
        env["KERAS_DISTRIBUTION_JOB_ADDRESSES"] = f"127.0.0.1:{ports[0]}"
        env["KERAS_DISTRIBUTION_NUM_PROCESSES"] = str(len(ports))
        env["KERAS_DISTRIBUTION_PROCESS_ID"] = str(index)
        if index == 0:
            env["XLA_FLAGS"] = f"--xla_dump_to={hlo_dir}"
    return env


def run_workers(args, backend, hlo_dir, timeout=900):
    """Starts the two workers, waits for both, returns their reports; both
    are killed on the way out whatever happened."""
    ports = free_ports(WORKERS)
    argv = [sys.argv[0], "--size", args.size, "--rounds", str(args.rounds)]
    argv += ["--steps", str(args.steps)]
    processes = []
    try:
        for index in range(WORKERS):
            processes.append(
                subprocess.Popen(
                    [sys.executable, *argv, "--worker", str(index)],
                    env=worker_environment(backend, index, ports, hlo_dir),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + timeout
        reports = []
        for process in processes:
            remaining = max(1, deadline - time.monotonic())
            stdout, stderr = process.communicate(timeout=remaining)
            found = [
                json.loads(line[len(harness.RESULT_MARKER) :])
                for line in stdout.splitlines()
                if line.startswith(harness.RESULT_MARKER)
            ]
            if process.returncode or not found:
                raise RuntimeError(
                    f"A worker failed (exit status {process.returncode}); "
                    f"its stderr ends:\n{stderr[-3000:]}"
                )
            reports.append(found[0])
        return reports
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


_SHAPE = re.compile(r"\b(f32|f16|bf16|s32)\[([0-9,]*)\]")
_WIDTH = {"f32": 4, "f16": 2, "bf16": 2, "s32": 4}


def hlo_all_reduce_bytes(hlo_dir):
    """The bytes of the all-reduce results in each optimized HLO module XLA
    dumped, largest first: `[(bytes, module file)]`."""
    found = []
    for path in glob.glob(os.path.join(hlo_dir, "*after_optimizations.txt")):
        total = 0
        with open(path) as file:
            for line in file:
                if (
                    " all-reduce(" not in line
                    and "all-reduce-start(" not in line
                ):
                    continue
                result_type = line.split("=", 1)[1].split("all-reduce", 1)[0]
                for kind, dims in _SHAPE.findall(result_type):
                    count = int(np.prod([int(d) for d in dims.split(",") if d]))
                    total += count * _WIDTH[kind]
        if total:
            found.append((total, os.path.basename(path)))
    return sorted(found, reverse=True)


def engine_check(hlo, rows):
    """Per arm, the all-reduced bytes of the train step XLA compiled for
    it (the module nearest the computed bytes) minus the computed bytes;
    `None` without a dump (TensorFlow)."""
    steps = [b for b, name in hlo if "train_step" in name]
    if not steps:
        return None
    return {
        arm: min((b - row["synchronized_bytes"] for b in steps), key=abs)
        for arm, row in rows.items()
    }


def load_average():
    return list(os.getloadavg())


def main():
    args = parse_args()
    if args.steps is None:
        args.steps = 2 if args.size == "paper" else 6
    if args.worker is not None:
        return worker(args)
    backend = harness.backend()
    if backend not in ("tensorflow", "jax"):
        raise SystemExit(
            f"Keras has no multi-process distribution for the {backend} "
            "backend: run with KERAS_BACKEND=tensorflow or jax"
        )
    load_before = load_average()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as hlo_dir:
        reports = run_workers(args, backend, hlo_dir)
        hlo = hlo_all_reduce_bytes(hlo_dir) if backend == "jax" else []
    wall = time.monotonic() - started
    load_after = load_average()
    values = reports[0]["trainable_values"]
    assert all(r["trainable_values"] == values for r in reports)
    assert [r["worker_count"] for r in reports] == [WORKERS] * WORKERS
    rows = {}
    for arm in ARMS:
        sync_bytes = values[arm] * BYTES_PER_VALUE
        per_worker = [r["step_seconds"][arm] for r in reports]
        rows[arm] = {
            "synchronized_values": values[arm],
            "synchronized_bytes": sync_bytes,
            "link_seconds_10gbit": 8 * sync_bytes / LINK_BITS_PER_SECOND,
            "step_seconds": {
                f"worker{i}": harness_summary(times)
                for i, times in enumerate(per_worker)
            },
            "step_seconds_raw": per_worker,
        }
    # Per worker: the ratios of the arms' median steps in each round.
    ratios = []
    for report in reports:
        full = np.array(report["step_seconds"]["full"]).reshape(args.rounds, -1)
        lora = np.array(report["step_seconds"]["lora"]).reshape(args.rounds, -1)
        ratios += (np.median(lora, 1) / np.median(full, 1)).tolist()
    engine = {
        "tensorflow": "not exposed: TensorFlow's collectives count nothing "
        "a program can read; the bytes are computed from the trainable "
        "weights only",
        "jax": "the all-reduce results in the optimized HLO modules XLA "
        "compiled on worker 0 (largest first; the two train steps should "
        "match the two arms' bytes, plus the loss and metric scalars)",
    }[backend]
    results = {
        "settings": {**vars(args), "workers": WORKERS, "rank": 8},
        "size": dict(__import__("networks").SIZES[args.size]),
        "rows": rows,
        "lora_over_full_step_ratio_per_round": harness_summary(ratios),
        "bytes_ratio_full_over_lora": values["full"] / values["lora"],
        "engine_count": {
            "how": engine,
            "hlo_all_reduce_bytes": hlo[:4],
            "hlo_minus_computed_bytes": engine_check(hlo, rows),
        },
        "load_average_before": load_before,
        "load_average_after": load_after,
        "wall_seconds": wall,
    }
    harness.write_results(f"multi_worker_{backend}_{args.size}", results)
    size = results["size"]
    harness.print_table(
        [
            "arm",
            "values all-reduced / step",
            "MB / step",
            "10 Gbit/s adds (calc.)",
            "step s, worker 0",
            "step s, worker 1",
        ],
        [
            [
                arm,
                f"{row['synchronized_values']:,}",
                f"{row['synchronized_bytes'] / 1e6:.3f}",
                f"{1e3 * row['link_seconds_10gbit']:.3f} ms",
                harness.median_range(row["step_seconds"]["worker0"]),
                harness.median_range(row["step_seconds"]["worker1"]),
            ]
            for arm, row in rows.items()
        ],
        title=f"{backend}: {WORKERS} workers on 127.0.0.1, GRU "
        f"{size['units']}, global batch {size['batch']} x {size['T']}, "
        f"{args.rounds} rounds x {args.steps} steps; full / LoRA bytes "
        f"{results['bytes_ratio_full_over_lora']:.0f}x; LoRA / full step "
        f"{harness.median_range(results['lora_over_full_step_ratio_per_round'])}"
        f"; load {load_before[0]:.1f} -> {load_after[0]:.1f}",
    )


def harness_summary(values):
    from keras_rnn_lora.measurement import summary

    return summary(values)


if __name__ == "__main__":
    main()
