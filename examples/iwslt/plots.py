"""The main job's plots: validation curves and the learning-rate choice
(curves.png), the forgetting matrix (forgetting.png) and, with `--ablation`,
the ablation (ablation.png)."""

import math
import os


def write(results, output_dir):
    """curves.png, forgetting.png and, with the ablation, ablation.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Validation perplexity through the chunks, and the rate choice.
    figure, (curves, rates) = plt.subplots(1, 2, figsize=(12, 4.2))
    for arm, r in results["arms"].items():
        if arm == "frozen":
            continue
        values = [v for chunk in r["val_curves"] for v in chunk]
        curves.plot(range(1, len(values) + 1), values, marker="o", label=arm)
    curves.axhline(
        results["pretrained"]["forgetting_row"]["validation"],
        linestyle="--",
        color="gray",
        label="pre-trained",
    )
    curves.set(
        xlabel="epoch (chunks one after another)",
        ylabel="validation perplexity",
        title="Learning the new data (seed 0)",
    )
    curves.legend()
    for method, choice in results["learning_rates"].items():
        if choice:
            points = sorted(
                (float(k), v)
                for k, v in choice["validation_perplexity"].items()
                if v is not None and math.isfinite(v)  # not diverged
            )
            rates.plot(*zip(*points, strict=True), marker="o", label=method)
    rates.set(
        xscale="log",
        xlabel="learning rate",
        ylabel="best validation perplexity",
        title="Learning-rate choice (first chunk, seed 0)",
    )
    rates.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "curves.png"), dpi=120)
    plt.close(figure)
    _forgetting_plot(results, output_dir, plt)
    if results["ablation"]:
        _ablation_plot(results, output_dir, plt)


def _forgetting_plot(results, output_dir, plt):
    parts = list(results["pretrained"]["forgetting_row"])
    figure, axes = plt.subplots(
        1, len(parts), figsize=(3.2 * len(parts), 3.4), sharey=False
    )
    for axis, part in zip(axes, parts, strict=True):
        for arm, r in results["arms"].items():
            values = [results["pretrained"]["forgetting_row"][part]]
            values += [row[part] for row in r["forgetting_matrix"]]
            axis.plot(range(len(values)), values, marker="o", label=arm)
        axis.set(
            title=f"held-out {part}" if part != "validation" else "validation",
            xlabel="after chunk (0: pre-trained)",
            xticks=range(len(values)),
        )
    axes[0].set_ylabel("perplexity")
    axes[-1].legend(fontsize=8)
    figure.suptitle(
        "Forgetting: perplexity on each part of the data, chunk by chunk"
    )
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "forgetting.png"), dpi=120)
    plt.close(figure)


def _ablation_plot(results, output_dir, plt):
    """Share of full fine-tuning's gain over the control arm against
    trainable parameters; step time against trainable parameters."""
    points = results["ablation"]
    figure, (share, time) = plt.subplots(1, 2, figsize=(12, 4.4))
    for name, p in points.items():
        x = p["trainable_params"]
        if p.get("gain_share") is not None:
            share.scatter(x, p["gain_share"])
            share.annotate(name, (x, p["gain_share"]), fontsize=7)
        ratio = p.get("step_time_ratio")
        if ratio:
            spread = [
                [ratio["median"] - ratio["min"]],
                [ratio["max"] - ratio["median"]],
            ]
            time.errorbar(x, ratio["median"], yerr=spread, fmt="o")
            time.annotate(name, (x, ratio["median"]), fontsize=7)
    full = results["arms"].get("full")
    for axis, value in ((share, 1.0), (time, 1.0)):
        axis.axhline(value, linestyle="--", color="gray", label="full")
    share.axhline(0.0, linestyle=":", color="gray", label="control")
    if full:
        for axis in (share, time):
            axis.axvline(full["trainable_params"], linestyle=":", color="gray")
    share.set(
        xscale="log",
        xlabel="trainable parameters",
        ylabel="share of full fine-tuning's gain over control",
        title="Gain recovered (validation perplexity, mean over seeds)",
    )
    time.set(
        xscale="log",
        xlabel="trainable parameters",
        ylabel="training-step time (× full)",
        title="Step time (median, range over rounds)",
    )
    share.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "ablation.png"), dpi=120)
    plt.close(figure)
