"""What learning costs each arm: peak memory in a process of its own, and
training-step time measured interleaved, all arms in one process.

On a shared CPU, arms trained one after another can differ by 2x from
load alone; so the time reductions come from `step_timing`: every arm's
training step on the same fixed batches, round after round in rotating
order (`keras_rnn_lora.measurement.interleaved_times`), as ratios to full
fine-tuning (median and range over rounds). Memory is different: a process
never gives memory back, so each arm's peak is measured in a fresh process
(`memory_probe`) that builds the arm and trains on the same batches.
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


def memory_probe(args, arm):
    """Peak resident memory (and accelerator memory where reported) of one
    arm training on the probe batches, above the process after building
    the model and loading the data."""
    from keras_rnn_lora.measurement import PeakMemory
    from keras_rnn_lora.measurement import device_peak_mb

    target = path(args, "costs", f"memory_{arm}.json")
    if os.path.exists(target):
        return
    split, preprocessor = setup(args, args.seed)
    data = _probe_batches(args, preprocessor, split)
    model = compile_arm(
        args, build_arm(args, arm, path(args, "pretrained.keras")), 1e-3
    )
    with PeakMemory() as memory:
        _train_step(model, data)()
    write_json(
        target,
        {"peak_rss_mb": memory.peak_mb, "device_peak_mb": device_peak_mb()},
    )


def step_timing(args, arms, with_ablation=False):
    """Training-step seconds of every arm (and, with the ablation, of its
    points), interleaved on the probe batches; ratios to `full` when it is
    one of them."""
    from iwslt.ablation import lora_configs
    from keras_rnn_lora.measurement import interleaved_times
    from keras_rnn_lora.measurement import ratio_summary

    configs = lora_configs(args) if with_ablation else {}

    target = path(args, "costs", "timing.json")
    timed = read_json(target) or {}
    wanted = {*arms, *configs}
    # Reused only when it timed every arm wanted, with as many rounds.
    if timed.get("rounds") == args.timing_rounds and wanted <= set(
        timed.get("seconds", {})
    ):
        return
    split, preprocessor = setup(args, args.seed)
    data = _probe_batches(args, preprocessor, split)
    pretrained = path(args, "pretrained.keras")
    steps = {}
    for name in sorted(wanted):
        config = configs.get(name)
        arm = "lora" if config is not None else name
        rate = chosen_rate(args, arm) if arm != "frozen" else 1e-3
        model = compile_arm(
            args, build_arm(args, arm, pretrained, config), rate
        )
        steps[name] = _train_step(model, data)
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
