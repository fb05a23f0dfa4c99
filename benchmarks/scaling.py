"""How the savings grow with size: LoRA against full fine-tuning at hidden
256, 512, 1024 and 2048, on the current backend.

The network and the modes are `lora_vs_full.py`'s (embedding, two GRU
layers, a `Dense` over 8,000 tokens; rank 8): `full`, `lora` (`LoRAGRU`
layers, LoRA factors only) and `floor` (only the first GRU's bias trainable: the
gradient still crosses the whole network, what any LoRA step pays). Sizes
are `lora_vs_full.SCALING`: the embedding grows with the width up to 512,
and batch x length shrink from 64 x 30 (hidden 256, 512) to 32 x 20 (1024)
and 16 x 20 (2048), so that a step stays within seconds on a 2-core CPU;
ratios are taken within one size, so the scaling of the batch cancels out.
Per size: step times interleaved in one process (median of per-round
ratios, min-max); peak resident memory of each mode in a process of its own.

    KERAS_BACKEND=jax python benchmarks/scaling.py [--rounds 5]

Writes benchmarks/results/scaling_<backend>.json; the plot of every backend
measured so far, benchmarks/results/scaling.png; a markdown table last.
"""

import argparse
import json
import os
import time

import lora_vs_full as base

MODES = ("full", "lora", "floor")
RESULTS = base.RESULTS


def measure(units, rounds):
    size = base.SCALING[units]
    x, y = base.batch(size)
    models = {mode: base.build(mode, size) for mode in MODES}
    times = base.interleaved_times(models, x, y, rounds)
    del models
    memory = {mode: base.peak_memory(mode, f"hidden{units}") for mode in MODES}
    return {
        "size": size,
        "step_seconds": times,
        "lora_over_full": base.ratio(times, "lora", "full"),
        "floor_over_full": base.ratio(times, "floor", "full"),
        "lora_over_floor": base.ratio(times, "lora", "floor"),
        "peak_rss_mb": memory,
        "memory_lora_over_full": memory["lora"] / memory["full"],
    }


def plot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = {}
    for backend in ("tensorflow", "jax", "torch"):
        path = os.path.join(RESULTS, f"scaling_{backend}.json")
        if os.path.exists(path):
            with open(path) as file:
                found[backend] = json.load(file)["sizes"]
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for backend, sizes in found.items():
        widths = sorted(int(u) for u in sizes)
        lora = [sizes[str(u)]["lora_over_full"]["median"] for u in widths]
        floor = [sizes[str(u)]["floor_over_full"]["median"] for u in widths]
        memory = [sizes[str(u)]["memory_lora_over_full"] for u in widths]
        (line,) = time_axis.plot(widths, lora, marker="o", label=backend)
        time_axis.plot(
            widths, floor, linestyle=":", color=line.get_color(), marker="."
        )
        memory_axis.plot(widths, memory, marker="o", label=backend)
    for axis in (time_axis, memory_axis):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("hidden units")
        axis.axhline(1.0, color="gray", linewidth=0.5)
        axis.legend()
    time_axis.set(
        ylabel="LoRA step / full step (dotted: floor)",
        title="Training-step time",
        ylim=(0, 1.2),
    )
    memory_axis.set(
        ylabel="LoRA peak / full peak",
        title="Peak resident memory",
        ylim=(0, 1.2),
    )
    figure.suptitle("LoRA against full fine-tuning as the RNN grows (CPU)")
    figure.tight_layout()
    figure.savefig(os.path.join(RESULTS, "scaling.png"), dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--hidden",
        default=",".join(map(str, base.SCALING)),
        help="comma-separated, of " + ",".join(map(str, base.SCALING)),
    )
    args = parser.parse_args()
    widths = [int(u) for u in args.hidden.split(",") if u]
    unknown = [u for u in widths if u not in base.SCALING]
    if unknown or args.rounds < 1:
        parser.error(
            f"--hidden takes {list(base.SCALING)} (got {unknown}); "
            "--rounds must be at least 1"
        )
    import keras

    backend = keras.backend.backend()
    sizes = {}
    for units in widths:
        start = time.perf_counter()
        sizes[str(units)] = measure(units, args.rounds)
        print(
            f"hidden {units}: {time.perf_counter() - start:.0f} s", flush=True
        )
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"scaling_{backend}.json"), "w") as file:
        json.dump({"rounds": args.rounds, "sizes": sizes}, file, indent=2)
    plot()
    print(f"\n{backend}, rank {base.RANK}, {args.rounds} interleaved rounds\n")
    print(
        "| hidden | batch x T | full step ms | LoRA / full | floor / full "
        "| LoRA / floor | peak MB full / LoRA | memory LoRA / full |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for units, r in sizes.items():
        size, memory = r["size"], r["peak_rss_mb"]
        full_ms = 1e3 * sorted(r["step_seconds"]["full"])[args.rounds // 2]
        print(
            f"| {units} | {size['batch']} x {size['T']} | {full_ms:.0f} | "
            f"{_ratio(r['lora_over_full'])} | {_ratio(r['floor_over_full'])} | "
            f"{_ratio(r['lora_over_floor'])} | "
            f"{memory['full']:.0f} / {memory['lora']:.0f} | "
            f"{r['memory_lora_over_full']:.2f} |"
        )


def _ratio(summary):
    return (
        f"{summary['median']:.3f} ({summary['min']:.2f}-{summary['max']:.2f})"
    )


if __name__ == "__main__":
    main()
