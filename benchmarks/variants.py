"""What the LoRA variants cost: a DoRA training step against a plain LoRA
step, and PiSSA/OLoRA initialization against the default one.

Steps: one stock `keras.layers.GRU` model (input features -> GRU,
`return_sequences=True` -> `Dense(16)`, mse, Adam) converted twice by
`enable_lora` from the same weights, rank 8: `lora` (plain LoRA) and
`dora` (`use_dora=True`), each with `mark_only_lora_as_trainable` (DoRA
also trains its magnitude). One training step is one `train_on_batch` on a
fixed random batch; the two are timed interleaved (`interleaved_times`:
two warm-up steps each, then one step each a round, order rotated), and
DoRA / LoRA is the median of per-round ratios with min-max. Two sizes:

- `default`: GRU 256 units (the translator's width), 256 input features,
  batch 64 x 30 steps, `--rounds` rounds;
- `hidden2048`: GRU 2048 units (the paper's width), 512 input features,
  batch 16 x 20 steps, `--big-rounds` rounds (`--big-rounds 0` skips it).

The goal is DoRA / LoRA <= `GOAL` (1.10); the table says whether each
median and each maximum meet it.

Initialization: a built stock model (512 input features -> GRU
`--init-units`, default 2048: recurrent kernel 2048 x 6144) converted by
`enable_lora(base, rank=8, lora_init=...)` with `"default"`, `"pissa"` and
`"olora"`, interleaved (one untimed default conversion first, then
`--init-rounds` rounds, order rotated). Reported: seconds, the ratio to the
default conversion and the extra seconds over it, per round (median,
min-max). Every conversion builds the new model (Keras' orthogonal
initializer on the recurrent kernel, in every arm) and copies the weights.

The machine's load average is recorded before and after each part: on a
shared CPU the absolute times move with it, the ratios within a round less.

    KERAS_BACKEND=tensorflow python benchmarks/variants.py
    KERAS_BACKEND=jax python benchmarks/variants.py --init-rounds 3

On a quiet 2-core CPU, `--rounds 45 --big-rounds 15 --init-rounds 3` took
0.5 to 3 minutes a backend (PiSSA's SVD of each 2048 x 6144 kernel is the
slowest part of a conversion); `--init-rounds 0` skips the conversions. Writes
benchmarks/results/variants_<backend>.json (after the steps, and again
after the initialization; `--tag` names another file) and prints Markdown
tables last.
"""

import functools
import os
import re
import statistics

import harness
import numpy as np

from keras_rnn_lora.measurement import interleaved_times
from keras_rnn_lora.measurement import ratio_summary
from keras_rnn_lora.measurement import summary

GOAL = 1.10  # the DoRA step / the LoRA step we aim for
RANK = 8
OUTPUTS = 16  # Dense head after the GRU: the GRU's cost dominates
SIZES = {
    "default": {"units": 256, "features": 256, "batch": 64, "T": 30},
    "hidden2048": {"units": 2048, "features": 512, "batch": 16, "T": 20},
}
INIT_FEATURES = 512  # input features of the model the initialization converts
INIT_METHODS = ("default", "pissa", "olora")
ROUNDS = 15  # step rounds at the default size
BIG_ROUNDS = 5  # step rounds at hidden 2048
INIT_ROUNDS = 1  # rounds of the initialization (each one SVD and one QR)


def parse_args(argv=None):
    parser = harness.parser(__doc__, rounds=ROUNDS)
    parser.add_argument(
        "--big-rounds",
        type=int,
        default=BIG_ROUNDS,
        help="step rounds at hidden 2048, 0 to skip (default %(default)s)",
    )
    parser.add_argument(
        "--init-rounds",
        type=int,
        default=INIT_ROUNDS,
        help="initialization rounds, 0 to skip (default %(default)s)",
    )
    parser.add_argument(
        "--init-units",
        type=harness.positive_int,
        default=SIZES["hidden2048"]["units"],
        help="GRU units of the initialization model (default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=harness.positive_int,
        default=None,
        help="torch intra-op threads (torch.set_num_threads; default: "
        "torch's own); the other backends refuse it",
    )
    parser.add_argument(
        "--tag",
        default=None,
        help="writes variants_<backend>_<tag>.json instead of "
        "variants_<backend>.json (a run under other settings, such as "
        "XLA_FLAGS, beside the default one); lowercase letters, digits and "
        "underscores",
    )
    args = parser.parse_args(argv)
    if args.tag is not None and not re.fullmatch(r"[a-z0-9_]+", args.tag):
        parser.error(
            "--tag takes lowercase letters, digits and underscores, "
            f"received {args.tag!r}"
        )
    if args.threads is not None and harness.backend() != "torch":
        parser.error(
            "--threads sets torch's threads: run with KERAS_BACKEND=torch"
        )
    for name in ("big_rounds", "init_rounds"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0")
    return args


def load_average():
    """The 1, 5 and 15 minute load averages (`None` where unknown)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def difference_summary(times, numerator, denominator):
    """`summary` over rounds of `times[numerator][r] -
    times[denominator][r]` (seconds)."""
    return summary(
        a - b for a, b in zip(times[numerator], times[denominator], strict=True)
    )


def goal_check(ratio, goal=GOAL):
    """Whether a `ratio_summary` meets `goal` at its median and at its
    maximum."""
    return {
        "goal": goal,
        "median_met": ratio["median"] <= goal,
        "max_met": ratio["max"] <= goal,
    }


# -- the models ---------------------------------------------------------------


def base_model(units, features, steps=None, seed=0):
    """A built stock model: `(steps, features)` -> `GRU(units)` (whole
    sequence) -> `Dense(OUTPUTS)`."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((steps, features))
    x = keras.layers.GRU(units, return_sequences=True)(inputs)
    return keras.Model(inputs, keras.layers.Dense(OUTPUTS)(x))


def adapted(base, use_dora, rank=RANK):
    """`base` through `enable_lora` (DoRA or not), only the adapter
    trainable, compiled with Adam and mse."""
    import keras_rnn_lora

    model = keras_rnn_lora.enable_lora(base, rank=rank, use_dora=use_dora)
    keras_rnn_lora.mark_only_lora_as_trainable(model)
    model.compile(optimizer="adam", loss="mse")
    return model


def batch(size, seed=1):
    """A fixed random batch `(x, y)` for `size`."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size["batch"], size["T"], size["features"]))
    y = rng.normal(size=(size["batch"], size["T"], OUTPUTS))
    return x.astype("float32"), y.astype("float32")


def step_models(size, rank=RANK):
    """`{"lora": model, "dora": model}` from one base model at `size`."""
    base = base_model(size["units"], size["features"], size["T"])
    return {
        "lora": adapted(base, use_dora=False, rank=rank),
        "dora": adapted(base, use_dora=True, rank=rank),
    }


def measure_steps(size, rounds):
    """DoRA against LoRA training steps at `size`, interleaved."""
    from keras_rnn_lora import count_parameters

    models = step_models(size)
    x, y = batch(size)
    steps = {
        name: functools.partial(model.train_on_batch, x, y)
        for name, model in models.items()
    }
    load_before = load_average()
    times = interleaved_times(steps, rounds)
    ratio = ratio_summary(times, "dora", "lora")
    return {
        "size": size,
        "rounds": rounds,
        "trainable_params": {
            name: count_parameters(model.trainable_weights)
            for name, model in models.items()
        },
        "step_ms_median": {
            name: 1e3 * statistics.median(values)
            for name, values in times.items()
        },
        "dora_over_lora": ratio,
        "goal_check": goal_check(ratio),
        "load_average": {"before": load_before, "after": load_average()},
    }


def measure_init(units, rounds, rank=RANK):
    """`enable_lora` with each of `INIT_METHODS` on one built model of
    `units` GRU units, interleaved."""
    import keras_rnn_lora

    base = base_model(units, INIT_FEATURES)

    def convert(method):
        keras_rnn_lora.enable_lora(base, rank=rank, lora_init=method)

    convert("default")  # untimed: the first conversion's one-time costs
    load_before = load_average()
    times = interleaved_times(
        {method: functools.partial(convert, method) for method in INIT_METHODS},
        rounds,
        warmup=0,
    )
    return {
        "units": units,
        "features": INIT_FEATURES,
        "recurrent_kernel": [units, 3 * units],
        "rounds": rounds,
        "seconds": {method: summary(times[method]) for method in INIT_METHODS},
        "ratio_to_default": {
            method: ratio_summary(times, method, "default")
            for method in INIT_METHODS[1:]
        },
        "extra_seconds": {
            method: difference_summary(times, method, "default")
            for method in INIT_METHODS[1:]
        },
        "load_average": {"before": load_before, "after": load_average()},
    }


# -- the tables ---------------------------------------------------------------


def step_rows(steps):
    """Rows of the step table from `results["steps"]`."""
    rows = []
    for name, found in steps.items():
        size, ratio = found["size"], found["dora_over_lora"]
        check = found["goal_check"]
        rows.append(
            [
                f"{name} (GRU {size['units']}, batch {size['batch']} x "
                f"{size['T']})",
                found["rounds"],
                f"{found['step_ms_median']['lora']:.1f}",
                f"{found['step_ms_median']['dora']:.1f}",
                harness.median_range(ratio),
                "yes" if check["median_met"] else "no",
                "yes" if check["max_met"] else "no",
                "/".join(map(str, found["load_average"]["before"] or [])),
            ]
        )
    return rows


STEP_HEADER = [
    "size",
    "rounds",
    "LoRA step ms",
    "DoRA step ms",
    "DoRA / LoRA",
    f"median <= {GOAL:.2f}",
    f"max <= {GOAL:.2f}",
    "load avg 1/5/15 min",
]


def init_rows(init):
    """Rows of the initialization table from `results["init"]`."""
    rows = []
    for method in INIT_METHODS:
        seconds = init["seconds"][method]
        if method == "default":
            ratio, extra = "1", "0"
        else:
            ratio = harness.median_range(
                init["ratio_to_default"][method], ".2f"
            )
            extra = harness.median_range(init["extra_seconds"][method], ".1f")
        rows.append(
            [method, harness.median_range(seconds, ".1f"), ratio, extra]
        )
    return rows


INIT_HEADER = ["lora_init", "enable_lora s", "/ default", "extra s"]


def main():
    args = parse_args()
    backend = harness.backend()
    results = {"settings": vars(args), "goal": GOAL, "steps": {}}
    results_name = f"variants_{backend}" + (f"_{args.tag}" if args.tag else "")
    if backend == "torch":
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        results["torch_threads"] = torch.get_num_threads()
    plan = {"default": args.rounds, "hidden2048": args.big_rounds}
    for name, rounds in plan.items():
        if rounds:
            print(f"{name}: {rounds} rounds of DoRA and LoRA steps", flush=True)
            results["steps"][name] = measure_steps(SIZES[name], rounds)
    # Written now and again after the initialization, the slow part: an
    # interrupted run keeps its step figures.
    harness.write_results(results_name, results)
    if args.init_rounds:
        print(
            f"initialization at {args.init_units} units: "
            f"{args.init_rounds} round(s)",
            flush=True,
        )
        results["init"] = measure_init(args.init_units, args.init_rounds)
        harness.write_results(results_name, results)
    if results["steps"]:
        harness.print_table(
            STEP_HEADER,
            step_rows(results["steps"]),
            title=f"{backend}: DoRA against LoRA training steps, rank "
            f"{RANK}, interleaved (median of per-round ratios, min-max)",
        )
    if "init" in results:
        init = results["init"]
        harness.print_table(
            INIT_HEADER,
            init_rows(init),
            title=f"{backend}: enable_lora on GRU {init['units']} (recurrent "
            f"kernel {init['units']} x {3 * init['units']}), "
            f"{init['rounds']} interleaved round(s), load average "
            f"{init['load_average']['before']} before",
        )


if __name__ == "__main__":
    main()
