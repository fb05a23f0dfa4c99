"""Training cost of LoRA against full fine-tuning, on the current backend.

The work: `networks.py`'s language-model-shaped network of the
translator's sizes (embedding, two GRU layers, a `Dense` over the
vocabulary), trained with `train_on_batch` on one fixed batch of token ids,
in every one of its modes: `full` (stock `GRU`, every weight trains),
`lora` (`LoRAGRU`, factors only), `lora_cell` (`RNN(LoRAGRUCell)`),
`merge_each_step` (a cell forming `W + s*A@B` every step, set against
`lora_cell`, the same loop), `floor` (stock layers, only one bias trains:
what any LoRA step pays at least) and `lora_bf16` (a bfloat16 frozen base).

Step time is measured as ratios inside one process: each round runs every
mode once (A B C ..., warm-up first), and each ratio is the median over
rounds of per-round ratios. Peak memory per mode runs in its own
subprocess (resident memory above the idle process, after building the
model). Inference: a merged LoRA model's forward time over the stock model's.
On the torch backend the script also times the paper's own PyTorch loop on
Elman-RNN work (2 layers, hidden 512, rank 4, vocab 8000, T=30, batch 16)
against our `LoRASimpleRNN` model on the same work.

Writes benchmarks/results/lora_vs_full_<backend>_<size>.json and prints a
Markdown table last.

Usage: KERAS_BACKEND=tensorflow python benchmarks/lora_vs_full.py
       [--size default|paper] [--rounds 7]
About 2-4 minutes per backend at the default size on a 2-core CPU.
`--size paper` is hidden 2048 with embedding 512, scaled down to batch 16
and 20 steps to fit a CPU run.
"""

import statistics

import harness
import networks

from keras_rnn_lora import count_parameters
from keras_rnn_lora.measurement import ratio_summary

MODES = (
    "full",
    "lora",
    "lora_cell",
    "merge_each_step",
    "floor",
    "lora_bf16",
)
RATIOS = {
    "lora / floor": ("lora", "floor"),
    "lora / full": ("lora", "full"),
    "floor / full": ("floor", "full"),
    "lora_cell / lora": ("lora_cell", "lora"),
    "merge_each_step / lora_cell": ("merge_each_step", "lora_cell"),
    "lora_bf16 / full": ("lora_bf16", "full"),
}


def main():
    parser = harness.parser(__doc__, rounds=7)
    parser.add_argument(
        "--size", choices=sorted(networks.SIZES), default="default"
    )
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    backend = harness.backend()
    size = networks.SIZES[args.size]
    times, models = networks.step_times(size, MODES, args.rounds)
    params = {
        mode: count_parameters(model.trainable_weights)
        for mode, model in models.items()
    }
    del models
    results = {
        "backend": backend,
        "size": {"name": args.size, **size, "rank": networks.RANK},
        "rounds": args.rounds,
        "step_seconds_median": {
            m: statistics.median(t) for m, t in times.items()
        },
        "trainable_params": params,
        "ratios": {
            name: ratio_summary(times, *pair) for name, pair in RATIOS.items()
        },
        "inference merged / base": networks.inference_ratio(size, args.rounds),
    }
    if not args.skip_memory:
        results["peak_rss_mb"] = {
            mode: networks.peak_memory(mode, args.size) for mode in MODES
        }
    if backend == "torch" and args.size == "default":
        results["ratios"].update(networks.paper_loop_ratios(args.rounds))
    harness.write_results(f"lora_vs_full_{backend}_{args.size}", results)
    peaks = results.get("peak_rss_mb", {})
    harness.print_table(
        ["mode", "step ms (median)", "trainable params", "peak RSS MB"],
        [
            [
                mode,
                f"{1000 * results['step_seconds_median'][mode]:.1f}",
                f"{params[mode]:,}",
                f"{peaks[mode]:.0f}" if mode in peaks else "-",
            ]
            for mode in MODES
        ],
        title=f"{backend}, size {args.size} {size}, rank {networks.RANK}, "
        f"{args.rounds} rounds",
    )
    rows = {
        **results["ratios"],
        "inference merged / base": results["inference merged / base"],
    }
    harness.print_table(
        ["ratio", "median", "min", "max"],
        [
            [name, *(f"{r[k]:.3f}" for k in ("median", "min", "max"))]
            for name, r in rows.items()
        ],
    )


if __name__ == "__main__":
    main()
