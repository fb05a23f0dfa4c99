"""How the savings grow with size: LoRA against full fine-tuning at hidden
256, 512, 1024 and 2048, on the current backend.

The network and the modes are `networks.py`'s (embedding, two GRU layers,
a `Dense` over 8,000 tokens; rank 8): `full`, `lora` (`LoRAGRU` layers,
LoRA factors only) and `floor` (only the first GRU's bias trainable: the
gradient still crosses the whole network, what any LoRA step pays). Sizes
are `networks.SCALING`: the embedding grows with the width up to 512,
and batch x length shrink from 64 x 30 (hidden 256, 512) to 32 x 20 (1024)
and 16 x 20 (2048), so that a step stays within seconds on a 2-core CPU;
ratios are taken within one size, so the scaling of the batch cancels out.
Per size: step times interleaved in one process (median of per-round
ratios, min-max); peak resident memory of each mode in a process of its own.

    KERAS_BACKEND=jax python benchmarks/scaling.py [--rounds 5]

Writes benchmarks/results/scaling_<backend>.json; the plot of every backend
measured so far, benchmarks/results/scaling.png; a markdown table last.
"""

import time

import harness
import networks

from keras_rnn_lora.measurement import ratio_summary

MODES = ("full", "lora", "floor")
BACKENDS = ("tensorflow", "jax", "torch")


def measure(units, rounds):
    size = networks.SCALING[units]
    times = networks.step_times(size, MODES, rounds)[0]
    memory = {
        mode: networks.peak_memory(mode, f"hidden{units}") for mode in MODES
    }
    return {
        "size": size,
        "step_seconds": times,
        "lora_over_full": ratio_summary(times, "lora", "full"),
        "floor_over_full": ratio_summary(times, "floor", "full"),
        "lora_over_floor": ratio_summary(times, "lora", "floor"),
        "peak_rss_mb": memory,
        "memory_lora_over_full": memory["lora"] / memory["full"],
    }


def plot():
    """Plots every backend's results found in benchmarks/results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = {}
    for backend in BACKENDS:
        results = harness.read_results(f"scaling_{backend}")
        if results is not None:
            found[backend] = results["sizes"]
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
    path = harness.RESULTS / "scaling.png"
    figure.savefig(path, dpi=120)
    print(f"wrote {harness.relative_path(path)}")


def main():
    parser = harness.parser(__doc__, rounds=5)
    parser.add_argument(
        "--hidden",
        default=",".join(map(str, networks.SCALING)),
        help="comma-separated, of " + ",".join(map(str, networks.SCALING)),
    )
    args = parser.parse_args()
    widths = [int(u) for u in args.hidden.split(",") if u]
    unknown = [u for u in widths if u not in networks.SCALING]
    if unknown:
        parser.error(f"--hidden takes {list(networks.SCALING)} (got {unknown})")
    backend = harness.backend()
    sizes = {}
    for units in widths:
        start = time.perf_counter()
        sizes[str(units)] = measure(units, args.rounds)
        print(
            f"hidden {units}: {time.perf_counter() - start:.0f} s", flush=True
        )
    harness.write_results(
        f"scaling_{backend}",
        {"rounds": args.rounds, "rank": networks.RANK, "sizes": sizes},
    )
    plot()
    rows = []
    for units, r in sizes.items():
        size, memory = r["size"], r["peak_rss_mb"]
        full_ms = 1e3 * sorted(r["step_seconds"]["full"])[args.rounds // 2]
        rows.append(
            [
                units,
                f"{size['batch']} x {size['T']}",
                f"{full_ms:.0f}",
                harness.median_range(r["lora_over_full"]),
                harness.median_range(r["floor_over_full"]),
                harness.median_range(r["lora_over_floor"]),
                f"{memory['full']:.0f} / {memory['lora']:.0f}",
                f"{r['memory_lora_over_full']:.2f}",
            ]
        )
    harness.print_table(
        [
            "hidden",
            "batch x T",
            "full step ms",
            "LoRA / full",
            "floor / full",
            "LoRA / floor",
            "peak MB full / LoRA",
            "memory LoRA / full",
        ],
        rows,
        align="rlrrrrrr",
        title=f"{backend}, rank {networks.RANK}, {args.rounds} interleaved "
        "rounds",
    )


if __name__ == "__main__":
    main()
