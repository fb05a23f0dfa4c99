"""What learning costs each arm: peak memory in a process of its own, and
training-step time measured interleaved, all arms in one process.

On a shared CPU, arms trained one after another can differ by 2x from
load alone; so the time reductions come from `step_timing`: every arm's
training step on the same fixed batches, round after round in rotating
order (`keras_rnn_lora.measurement.interleaved_times`), as ratios to full
fine-tuning (median and range over rounds). Memory is different: a process
never gives memory back, so each arm's peak is measured in fresh processes
(`memory_probe`, `--memory-samples` of them per arm, the arms taking turns)
that build the arm and train on the same batches.
"""

import os

from iwslt.arms import build_arm
from iwslt.arms import compile_arm
from iwslt.arms import read_json
from iwslt.arms import write_json
from iwslt.data import batches
from iwslt.jobs import chosen_rate
from iwslt.jobs import path
from iwslt.jobs import setup

PROBE_BATCHES = 12  # batches of the first chunk every cost is measured on


def _probe_batches(args, preprocessor, split):
    data = batches(args, preprocessor, split.chunks[0], True, args.seed)
    return list(data.take(PROBE_BATCHES).as_numpy_iterator())


def _train_step(model, data):
    def step():
        for (source, decoder_inputs), targets in data:
            model.train_on_batch((source, decoder_inputs), targets)

    return step


def memory_path(args, arm, sample):
    return path(args, "costs", "memory", f"{arm}_{sample}.json")


def memory_probe(args, arm, sample):
    """One sample of an arm's peak memory: resident memory while the arm
    trains on the probe batches, as the absolute peak and as the increment
    over the same process just before (the model built, the data loaded),
    and the accelerator's peak where the backend reports one."""
    from keras_rnn_lora.measurement import PeakMemory
    from keras_rnn_lora.measurement import device_peak_mb

    target = memory_path(args, arm, sample)
    if os.path.exists(target):
        return
    split, preprocessor = setup(args, args.seed)
    data = _probe_batches(args, preprocessor, split)
    model = compile_arm(
        args, build_arm(args, arm, path(args, "pretrained.keras")), 1e-3, arm
    )
    with PeakMemory() as memory:
        _train_step(model, data)()
    write_json(
        target,
        {
            "idle_rss_mb": memory.baseline / 2**20,
            "peak_rss_mb": memory.peak / 2**20,
            "increment_mb": memory.peak_mb,
            "device_peak_mb": device_peak_mb(),
        },
    )


def memory_samples(args, arm):
    """The arm's memory samples measured so far (`memory_probe`)."""
    samples = (
        read_json(memory_path(args, arm, i)) for i in range(args.memory_samples)
    )
    return [s for s in samples if s is not None]


def step_timing(args, arms, part="arms"):
    """Training-step seconds of every arm in `arms`, interleaved on the
    probe batches, with ratios to `full` when it is one of them; saved as
    `costs/timing.json` for the main arms, `costs/timing_<part>.json` for
    another `part` (the ablation's points, timed again against `full` in a
    run of their own, so timing them never rewrites the arms' figures)."""
    from keras_rnn_lora.measurement import interleaved_times
    from keras_rnn_lora.measurement import ratio_summary

    name = "timing.json" if part == "arms" else f"timing_{part}.json"
    target = path(args, "costs", name)
    timed = read_json(target) or {}
    wanted = set(arms)
    # Reused only when it timed every arm wanted, with as many rounds.
    if timed.get("rounds") == args.timing_rounds and wanted <= set(
        timed.get("seconds", {})
    ):
        return
    split, preprocessor = setup(args, args.seed)
    data = _probe_batches(args, preprocessor, split)
    pretrained = path(args, "pretrained.keras")
    steps = {}
    for arm in sorted(wanted):
        rate = chosen_rate(args, arm) if arm != "frozen" else 1e-3
        model = compile_arm(args, build_arm(args, arm, pretrained), rate, arm)
        steps[arm] = _train_step(model, data)
    print(
        f"\n== Timing training steps: {', '.join(steps)}, "
        f"{args.timing_rounds} interleaved rounds of {len(data)} batches",
        flush=True,
    )
    times = interleaved_times(steps, args.timing_rounds)
    batches_per_round = len(data)
    write_json(
        target,
        {
            "rounds": args.timing_rounds,
            "batches_per_round": batches_per_round,
            "seconds": {
                name: [t / batches_per_round for t in values]
                for name, values in times.items()
            },
            "ratio_to_full": {
                name: ratio_summary(times, name, "full") for name in times
            }
            if "full" in times
            else {},
        },
    )
