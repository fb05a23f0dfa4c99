"""LoRA training steps on torch (CPU) at small widths: factored loop or
effective kernel, and what `jit_compile=True` (torch.compile) does.

On torch, Keras' stock `GRU`/`LSTM` run `backend.gru/lstm`, which on a CPU
is a lean pure-torch loop with the input projection precomputed. Our
`LoRAGRU`/`LoRALSTM` on a CPU either take that dispatch, fed the effective
kernel `W + s*A@B` (formed once per call), or step the factored cell
`h@W + s*(h@A)@B` through Keras' generic RNN loop: in training, the first
up to `keras_rnn_lora.layers.TORCH_CPU_FUSED_MAX_UNITS` units, the second
above. This script measures both paths at every width against full
fine-tuning, each forced through that threshold for its own steps: the
crossover it finds is what the threshold should be.

The model: Input (batch 32, 20 steps, 32 features) -> the RNN layer
(`return_sequences=True`) -> `Dense(16)`, mse loss, Adam; one training step
is one `model.train_on_batch`. Modes, for GRU and LSTM at units 16 to 512,
rank min(8, units):

- `full`: the stock `keras.layers.GRU`/`LSTM`, every weight trainable;
- `lora`: `LoRAGRU`/`LoRALSTM` on the factored loop (the threshold at 0),
  `mark_only_lora_as_trainable` (only A and B train);
- `lora_fused`: the same layer on the stock layer's dispatch with
  `W + s*A@B` (here Keras' torch loop; the threshold above every width);
  same trainability.

Before timing, each width checks that `lora` and `lora_fused` agree (B set
to random values, since B = 0 hides a dropped delta): the same outputs and
the same gradients of A and B to float32 tolerance, and the path each one
took (the cell's step runs once per time step in `lora`, plus once more
where Keras' torch loop probes the output shape at time zero; never in
`lora_fused`). Timing interleaves the modes round by round (rotated order,
two warm-up steps each); ratios are medians of per-round ratios with
min-max, torch on one intra-op thread unless `--threads` says otherwise
(see `THREADS`). The crossover is the largest width where `lora_fused` is
faster than `lora` (median ratio below 1).

`--jit` instead measures `jit_compile=True` (Keras' torch trainer wraps the
train step in `torch.compile`) against eager, for `full`, `lora` and
`lora_fused` at units 32 and 256: each (layer, width, mode) in a fresh
process with an empty inductor cache (a cold compile) holding that mode
eager and compiled, plus the eager `full` step as the common reference; the
compile time (the first step) is reported apart from the interleaved
steady-state steps, and the first losses of eager and compiled (same
weights, same batch) are compared.

    KERAS_BACKEND=torch python benchmarks/torch_small_layers.py [--rounds 101]
    KERAS_BACKEND=torch python benchmarks/torch_small_layers.py --jit

About 1.5-2 minutes on a 2-core CPU; `--jit` about 13 minutes (12 fresh
processes; a cold torch.compile took 40-90 s per model there). Writes
benchmarks/results/torch_small_layers.json (`--jit`:
torch_small_layers_jit.json) and prints a Markdown table last.
"""

import contextlib
import os
import sys
import tempfile
import time

import harness
import numpy as np

from keras_rnn_lora import measurement
from keras_rnn_lora.measurement import ratio_summary

BATCH = 32  # sequences per step
STEPS = 20  # time steps per sequence
FEATURES = 32  # input features per time step
OUTPUTS = 16  # Dense head after the RNN layer
UNITS = (16, 32, 64, 128, 256, 512)
MAX_RANK = 8  # rank min(8, units)
LAYERS = ("GRU", "LSTM")
MODES = ("full", "lora", "lora_fused")
ROUNDS = 101  # one training step per mode a round
WARMUP = 2  # untimed steps per mode before the rounds
# torch intra-op threads. One by default: on a shared, oversubscribed 2-core
# machine two OpenMP threads made single steps swing from 11 ms to 800 ms
# (GRU, 32 units, load average 5), one thread kept them within 7-23 ms.
THREADS = 1
JIT_UNITS = (32, 256)
JIT_ROUNDS = 31
JIT_TIMEOUT = 1200  # seconds for one (layer, width) child process
# float32 agreement of `lora` and `lora_fused`: relative to the largest
# magnitude of the compared array.
TOLERANCE = 1e-5


def rank(units):
    return min(MAX_RANK, units)


def data(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, STEPS, FEATURES)).astype("float32")
    y = rng.normal(size=(BATCH, STEPS, OUTPUTS)).astype("float32")
    return x, y


@contextlib.contextmanager
def cpu_path(mode):
    """LoRA layers train on the path of `mode` inside this block, at every
    width: `lora` the factored loop, `lora_fused` the stock layer's
    dispatch fed `W + s*A@B`; `full` (stock layers) is left alone. Set
    through the library's width threshold, which its layers read at every
    call."""
    from keras_rnn_lora import layers

    limit = {"lora": 0, "lora_fused": sys.maxsize}.get(mode)
    if limit is None:
        yield
        return
    previous = layers.TORCH_CPU_FUSED_MAX_UNITS
    layers.TORCH_CPU_FUSED_MAX_UNITS = limit
    try:
        yield
    finally:
        layers.TORCH_CPU_FUSED_MAX_UNITS = previous


def train_step(model, mode, x, y):
    """One `train_on_batch` of `model` on the path of `mode`."""

    def step():
        with cpu_path(mode):
            return model.train_on_batch(x, y)

    return step


def build(kind, mode, units, jit_compile=False, seed=0):
    """The model of `mode` and its RNN layer."""
    import keras

    import keras_rnn_lora

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((STEPS, FEATURES), batch_size=BATCH)
    if mode == "full":
        layer = getattr(keras.layers, kind)(units, return_sequences=True)
    else:
        layer = getattr(keras_rnn_lora, f"LoRA{kind}")(
            units, rank=rank(units), return_sequences=True
        )
    model = keras.Model(inputs, keras.layers.Dense(OUTPUTS)(layer(inputs)))
    if mode != "full":
        keras_rnn_lora.mark_only_lora_as_trainable(model)
    model.compile(optimizer="adam", loss="mse", jit_compile=jit_compile)
    return model, layer


def randomize_b(layer, seed=2):
    """B to random values (a fresh adapter's B = 0 hides a dropped delta)."""
    rng = np.random.default_rng(seed)
    for target in layer.cell.lora_targets:
        _, b = layer.cell.lora_factors(target)
        b.assign(rng.normal(scale=0.2, size=b.shape).astype("float32"))


@contextlib.contextmanager
def counting_cell_steps(cell):
    """Counts calls of the cell's step (`call`, `recurrent_step`): Keras'
    generic loop calls one of them per time step, the backend's fused or
    fallback loop neither."""
    counts = {"steps": 0}

    def counted(method):
        def step(*args, **kwargs):
            counts["steps"] += 1
            return method(*args, **kwargs)

        return step

    names = ("call", "recurrent_step")
    for name in names:
        object.__setattr__(cell, name, counted(getattr(cell, name)))
    try:
        yield counts
    finally:
        for name in names:
            object.__delattr__(cell, name)


def outputs_and_grads(model, layer, mode, x, y):
    """Outputs (training=True) on the path of `mode`, gradients of the mse
    loss with respect to the trainable weights (the LoRA factors), and how
    many cell steps ran."""
    import torch

    with counting_cell_steps(layer.cell) as counts, cpu_path(mode):
        outputs = model(x, training=True)
    loss = torch.mean((outputs - torch.as_tensor(y)) ** 2)
    weights = [w.value for w in model.trainable_weights]
    grads = torch.autograd.grad(loss, weights)
    to_numpy = [g.detach().cpu().numpy() for g in grads]
    return outputs.detach().cpu().numpy(), to_numpy, counts["steps"]


def relative_diff(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def check_equivalence(kind, units, x, y):
    """`lora` and `lora_fused` from the same weights (B random): the same
    outputs and factor gradients, and each on its own path."""
    lora_model, lora_layer = build(kind, "lora", units)
    fused_model, fused_layer = build(kind, "lora_fused", units)
    randomize_b(lora_layer)
    fused_model.set_weights(lora_model.get_weights())
    out_l, grads_l, steps_l = outputs_and_grads(
        lora_model, lora_layer, "lora", x, y
    )
    out_f, grads_f, steps_f = outputs_and_grads(
        fused_model, fused_layer, "lora_fused", x, y
    )
    names = [w.path for w in lora_model.trainable_weights]
    result = {
        "cell_steps_lora": steps_l,
        "cell_steps_lora_fused": steps_f,
        "output_rel_diff": relative_diff(out_l, out_f),
        "grad_rel_diff": {
            name: relative_diff(gl, gf)
            for name, gl, gf in zip(names, grads_l, grads_f, strict=True)
        },
        "tolerance": TOLERANCE,
    }
    worst = max(result["output_rel_diff"], *result["grad_rel_diff"].values())
    result["ok"] = (
        worst <= TOLERANCE
        and steps_l in (STEPS, STEPS + 1)
        and steps_f == 0
        and len(names) == 2 * len(lora_layer.cell.lora_targets)
    )
    if not result["ok"]:
        raise RuntimeError(
            f"{kind} units={units}: lora and lora_fused disagree: {result}"
        )
    return result, lora_model.get_weights()


def step_times(kind, units, rounds, x, y, lora_weights):
    """Interleaved `train_on_batch` seconds of every mode."""
    models = {}
    for mode in MODES:
        models[mode], _ = build(kind, mode, units)
        if mode != "full":
            models[mode].set_weights(lora_weights)  # B random in both
    steps = {
        mode: train_step(model, mode, x, y) for mode, model in models.items()
    }
    return measurement.interleaved_times(steps, rounds, warmup=WARMUP)


def crossover(rows, kind):
    """Largest width where `lora_fused` beats `lora`: by the median ratio,
    and in every round (max ratio below 1)."""
    by_median = [
        r["units"]
        for r in rows
        if r["layer"] == kind and r["c/b"]["median"] < 1
    ]
    every_round = [
        r["units"] for r in rows if r["layer"] == kind and r["c/b"]["max"] < 1
    ]
    return {
        "median": max(by_median, default=None),
        "every_round": max(every_round, default=None),
        "faster_at": by_median,
    }


def settings(rounds, units):
    return {
        "model": (
            f"Input(batch {BATCH}, {STEPS} steps, {FEATURES} features) -> "
            f"RNN layer (return_sequences) -> Dense({OUTPUTS}); mse, Adam"
        ),
        "step": "model.train_on_batch(x, y), one fixed batch",
        "batch": BATCH,
        "steps": STEPS,
        "features": FEATURES,
        "outputs": OUTPUTS,
        "units": list(units),
        "rank": f"min({MAX_RANK}, units)",
        "rounds": rounds,
        "warmup_steps": WARMUP,
        "order": "interleaved, rotated each round",
    }


def fmt(summary):
    return harness.median_range(summary, ".2f")


# -- the main table ------------------------------------------------------


def measure_steps(rounds, units_list):
    x, y = data()
    rows = []
    for kind in LAYERS:
        for units in units_list:
            start = time.perf_counter()
            check, lora_weights = check_equivalence(kind, units, x, y)
            times = step_times(kind, units, rounds, x, y, lora_weights)
            row = {
                "layer": kind,
                "units": units,
                "rank": rank(units),
                "median_step_ms": {
                    mode: 1000 * float(np.median(t))
                    for mode, t in times.items()
                },
                "b/a": ratio_summary(times, "lora", "full"),
                "c/a": ratio_summary(times, "lora_fused", "full"),
                "c/b": ratio_summary(times, "lora_fused", "lora"),
                "equivalence": check,
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            print(
                f"{kind} {units}: b/a {fmt(row['b/a'])}, c/a "
                f"{fmt(row['c/a'])}, c/b {fmt(row['c/b'])} "
                f"({row['seconds']:.0f} s)",
                flush=True,
            )
    return rows


def print_steps(report):
    for kind, c in report["crossover"].items():
        print(
            f"- {kind}: c faster than b (median) up to units "
            f"{c['median']}; in every round up to {c['every_round']}"
        )
    harness.print_table(
        ["layer", "units", "rank", "a, b, c ms", "b/a", "c/a", "c/b"],
        [
            [
                r["layer"],
                r["units"],
                r["rank"],
                ", ".join(f"{r['median_step_ms'][m]:.1f}" for m in MODES),
                fmt(r["b/a"]),
                fmt(r["c/a"]),
                fmt(r["c/b"]),
            ]
            for r in report["rows"]
        ],
        title=f"torch CPU, {report['settings']['rounds']} rounds; a = full "
        "fine-tuning of the stock layer, b = LoRA factored loop, "
        "c = LoRA through the effective-kernel path; median of per-round "
        "ratios (min-max)",
    )


# -- torch.compile -------------------------------------------------------

JIT_ARMS = ("full", "lora", "lora_fused")
JIT_CHILD = (
    "import sys, torch_small_layers\n"
    "torch_small_layers.jit_child(*sys.argv[1:])\n"
)


def jit_child(kind, units, arm, rounds, threads):
    """In a fresh process: `arm` eager and with `jit_compile=True` (and the
    eager `full` step as the common reference): compile time, first
    losses and interleaved steady-state steps; reported for
    `harness.in_fresh_process`. One compiled model a process, as in a user's run
    (two compiled models in one process recompile each other's shared
    Keras frames when they alternate)."""
    import torch

    torch.set_num_threads(int(threads))
    with cpu_path(arm):
        harness.report(jit_measurements(kind, int(units), arm, int(rounds)))


def jit_measurements(kind, units, arm, rounds):
    """`jit_child`'s measurements, in this process."""
    x, y = data()
    names = ["full", arm, f"{arm}_jit"] if arm != "full" else [arm, "full_jit"]
    models = {}
    for name in names:
        models[name], layer = build(
            kind, name.removesuffix("_jit"), units, name.endswith("_jit")
        )
        if name == arm and arm != "full":
            randomize_b(layer)
    models[f"{arm}_jit"].set_weights(models[arm].get_weights())
    first_steps, losses = {}, {}
    for name in (arm, f"{arm}_jit"):  # the same weights, the same batch
        first_steps[name], losses[name] = [], []
        for _ in range(3):  # the first compiles; the second recompiles
            start = time.perf_counter()
            losses[name].append(float(models[name].train_on_batch(x, y)))
            first_steps[name].append(time.perf_counter() - start)
    times = measurement.interleaved_times(
        {
            name: (lambda m=m: m.train_on_batch(x, y))
            for name, m in models.items()
        },
        rounds,
        warmup=WARMUP,
    )
    dynamo = None
    with contextlib.suppress(Exception):
        from torch._dynamo.utils import counters

        dynamo = {
            "unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "graph_break_reasons": sorted(
                {reason.splitlines()[0] for reason in counters["graph_break"]}
            ),
        }
    result = {
        "keras_jit_compile": {
            name: bool(m.jit_compile) for name, m in models.items()
        },
        "first_three_steps_s": first_steps,
        "first_three_losses": losses,
        "first_loss_rel_diff": abs(losses[arm][0] - losses[f"{arm}_jit"][0])
        / abs(losses[arm][0]),
        "dynamo": dynamo,
        "median_step_ms": {
            name: 1000 * float(np.median(t)) for name, t in times.items()
        },
        "step_s": times,
        "jit/eager": ratio_summary(times, f"{arm}_jit", arm),
    }
    if arm != "full":
        result["eager/full"] = ratio_summary(times, arm, "full")
        result["jit/full"] = ratio_summary(times, f"{arm}_jit", "full")
    return result


def measure_jit(rounds, units_list, threads):
    rows = []
    for kind in LAYERS:
        for units in units_list:
            for arm in JIT_ARMS:
                start = time.perf_counter()
                row = {"layer": kind, "units": units, "arm": arm}
                with cold_inductor_cache():
                    try:
                        row.update(
                            harness.in_fresh_process(
                                JIT_CHILD,
                                kind,
                                units,
                                arm,
                                rounds,
                                threads,
                                timeout=JIT_TIMEOUT,
                            )
                        )
                    except RuntimeError as error:
                        row["error"] = str(error)
                row["seconds"] = time.perf_counter() - start
                rows.append(row)
                print(
                    f"{kind} {units} {arm}: {row['seconds']:.0f} s", flush=True
                )
    return rows


@contextlib.contextmanager
def cold_inductor_cache():
    """An empty inductor cache for child processes: every compile is cold,
    as in a user's first run."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            yield
        finally:
            if previous is None:
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def jit_row(r):
    """`print_jit`'s row of one (layer, width, arm)."""
    head = [r["layer"], r["units"], r["arm"]]
    if "error" in r:
        return [*head, f"failed: {r['error'].splitlines()[0]}", *[""] * 5]
    first = r["first_three_steps_s"][f"{r['arm']}_jit"]
    full = (
        ("-", "-")
        if r["arm"] == "full"
        else (fmt(r["eager/full"]), fmt(r["jit/full"]))
    )
    return [
        *head,
        fmt(r["jit/eager"]),
        *full,
        f"{r['median_step_ms'][r['arm'] + '_jit']:.1f}",
        f"{first[0]:.0f}",
        f"{first[1]:.1f}",
    ]


def print_jit(report):
    harness.print_table(
        [
            "layer",
            "units",
            "arm",
            "jit/eager",
            "eager/full",
            "jit/full",
            "jit ms",
            "compile s",
            "recompile s",
        ],
        [jit_row(r) for r in report["rows"]],
        align="lrlrrrrrr",
        title=f"torch CPU, jit_compile=True (torch.compile) against eager, "
        f"{report['settings']['rounds']} rounds; median of per-round ratios "
        "(min-max); compile = the first compiled step, recompile = the "
        "second (cold inductor cache); full = the stock layer's eager step",
    )


def main():
    parser = harness.parser(__doc__)
    parser.add_argument(
        "--rounds",
        type=harness.positive_int,
        default=None,
        help=f"timed rounds (default {ROUNDS}; with --jit {JIT_ROUNDS})",
    )
    parser.add_argument(
        "--threads",
        type=harness.positive_int,
        default=THREADS,
        help="torch intra-op threads (torch.set_num_threads)",
    )
    parser.add_argument(
        "--jit",
        action="store_true",
        help="measure jit_compile=True against eager instead (slow)",
    )
    parser.add_argument(
        "--units",
        type=harness.positive_int,
        nargs="+",
        default=None,
        help=f"widths (default {UNITS}; with --jit {JIT_UNITS})",
    )
    args = parser.parse_args()
    backend = harness.backend()
    if backend != "torch":
        sys.exit(f"Run with KERAS_BACKEND=torch (this is {backend}).")
    import torch

    torch.set_num_threads(args.threads)
    units = tuple(args.units or (JIT_UNITS if args.jit else UNITS))
    rounds = args.rounds or (JIT_ROUNDS if args.jit else ROUNDS)
    report = {"settings": settings(rounds, units)}
    if args.jit:
        report["rows"] = measure_jit(rounds, units, args.threads)
        harness.write_results("torch_small_layers_jit", report)
        print_jit(report)
        return
    report["settings"]["modes"] = {
        "a": "full: stock layer, every weight trainable",
        "b": "lora: LoRA layer on the factored loop",
        "c": "lora_fused: LoRA layer on the effective-kernel path (the "
        "stock layer's torch loop, W + s*A@B)",
    }
    report["rows"] = measure_steps(rounds, units)
    report["crossover"] = {
        kind: crossover(report["rows"], kind) for kind in LAYERS
    }
    harness.write_results("torch_small_layers", report)
    print_steps(report)


if __name__ == "__main__":
    main()
