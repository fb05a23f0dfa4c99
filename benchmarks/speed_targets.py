"""The speed targets, measured in one command per backend.

Each row is a ratio or a rate measured within this one run (modes
interleaved round by round, median of per-round ratios, min-max), on the
networks of `networks.py`:

- LoRA step / floor step at the paper's size (hidden 2048, embedding 512,
  batch 16 x 20: `networks.SIZES["paper"]`), `LoRAGRU` against the stock
  `GRU` with only one bias trainable: target <= 1.10;
- bfloat16 frozen base / float32 full step, default size: target <= 0.45
  on TensorFlow; on torch, below the float32 LoRA step's ratio; no target
  on JAX;
- merged LoRA model / stock model, inference: target <= 1.02;
- greedy decoding of one sentence (`compiled_decoder`, default translator,
  vocabulary 8,000, 20 steps), sentences/s: target >= 30;
- torch only: our `LoRASimpleRNN` model / the paper's own PyTorch loop on
  the same Elman work (`networks.paper_loop_steps`): target <= 1.00.

    KERAS_BACKEND=torch python benchmarks/speed_targets.py [--rounds 9]

About 1-2 minutes per backend on a 2-core CPU. Writes
benchmarks/results/speed_targets_<backend>.json; a Markdown table last.
"""

import time

import harness
import networks
from keras import ops

from keras_rnn_lora.measurement import ratio_summary
from keras_rnn_lora.measurement import summary


def greedy_batch_one(rounds, steps=20):
    """Sentences/s of compiled greedy decoding, one 20-token sentence."""
    _, decoder = networks.greedy_decoder(steps)
    source = networks.source_sentences(1)
    ops.convert_to_numpy(decoder(source)[0])  # trace and compile
    speeds = []
    for _ in range(rounds):
        start = time.perf_counter()
        ops.convert_to_numpy(decoder(source)[0])
        speeds.append(1.0 / (time.perf_counter() - start))
    return summary(speeds)


def measure(backend, rounds):
    """`{row: (summary, comparison, target)}`, comparison `None` where the
    row has no target."""
    default = networks.SIZES["default"]
    times = networks.step_times(
        default, ("full", "lora", "floor", "lora_bf16"), rounds
    )[0]
    lora_over_full = ratio_summary(times, "lora", "full")
    rows = {}
    paper = networks.step_times(
        networks.SIZES["paper"], ("lora", "floor"), rounds
    )[0]
    rows["paper size: LoRA step / floor step"] = (
        ratio_summary(paper, "lora", "floor"),
        "<=",
        1.10,
    )
    # TensorFlow <= 0.45; torch below the float32 LoRA step; no target for
    # JAX, reported as measured.
    bf16_target = {
        "tensorflow": ("<=", 0.45),
        "torch": ("<", round(lora_over_full["median"], 3)),
    }.get(backend, (None, None))
    rows["default size: bfloat16 base / float32 full step"] = (
        ratio_summary(times, "lora_bf16", "full"),
        *bf16_target,
    )
    rows["default size: float32 LoRA step / full step"] = (
        lora_over_full,
        None,
        None,
    )
    rows["merged inference / base inference"] = (
        networks.inference_ratio(default, rounds),
        "<=",
        1.02,
    )
    rows["greedy decoding, batch 1, sentences/s"] = (
        greedy_batch_one(rounds),
        ">=",
        30.0,
    )
    if backend == "torch":
        loops = networks.paper_loop_ratios(rounds)
        same_work = "ours / paper torch loop"
        rows[same_work] = (loops.pop(same_work), "<=", 1.00)
        for name, value in loops.items():  # Keras' own 3D loss: no target
            rows[name] = (value, None, None)
    return rows


def met(value, op, target):
    if op is None:
        return "-"
    ok = {"<=": value <= target, "<": value < target, ">=": value >= target}
    return "met" if ok[op] else "missed"


def main():
    args = harness.parser(__doc__, rounds=9).parse_args()
    backend = harness.backend()
    rows = measure(backend, args.rounds)
    report = {
        name: {
            **value,
            "target": None if op is None else f"{op} {target}",
            "status": met(value["median"], op, target),
        }
        for name, (value, op, target) in rows.items()
    }
    harness.write_results(
        f"speed_targets_{backend}",
        {"backend": backend, "rounds": args.rounds, "rows": report},
    )
    harness.print_table(
        ["row", "median (min-max)", "target", "status"],
        [
            [name, harness.median_range(r), r["target"] or "-", r["status"]]
            for name, r in report.items()
        ],
        align="lrll",
        title=f"{backend}, {args.rounds} rounds",
    )


if __name__ == "__main__":
    main()
