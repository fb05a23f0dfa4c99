"""The main job's report: `results.json` (everything), `results.md`
(printed last) and the plots `curves.png`, `forgetting.png` and, with
`--ablation`, `ablation.png`. Figures over seeds are mean ± standard
deviation; a figure a run did not measure is written as such, never as a
number."""

import json
import os
import statistics

from iwslt import plots
from iwslt.arms import read_json
from iwslt.paths import recorded_settings
from iwslt.settings import ARMS
from iwslt.settings import PAPER
from iwslt.settings import SENTENCES


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def fmt(stat, spec=".2f"):
    if stat is None:
        return "not measured"
    if stat["n"] == 1:
        return format(stat["mean"], spec)
    spread = format(stat["std"], spec.lstrip("+"))  # a spread has no sign
    return f"{format(stat['mean'], spec)} ± {spread}"


def collect(args, split_sizes):
    """Everything the run measured, aggregated over seeds."""
    out = args.output_dir
    pretrain = read_json(os.path.join(out, "pretrain.json"))
    timing = read_json(os.path.join(out, "costs", "timing.json"), {})
    rates = {
        method: read_json(
            os.path.join(out, "learning_rates", method, "choice.json")
        )
        for method in args.grids
    }
    arms = {}
    for arm in args.arms:
        seeds = [
            read_json(os.path.join(out, "seeds", str(s), arm, "result.json"))
            for s in range(args.seeds)
        ]
        memory = read_json(os.path.join(out, "costs", f"memory_{arm}.json"), {})
        arms[arm] = aggregate(arm, seeds, pretrain, timing, memory)
    ablation = {}
    for name in (
        sorted(os.listdir(os.path.join(out, "ablation")))
        if os.path.isdir(os.path.join(out, "ablation"))
        else []
    ):
        if name.endswith(".json"):
            point = read_json(os.path.join(out, "ablation", name))
            point["step_time_ratio"] = timing.get("ratio_to_full", {}).get(
                point["name"]
            )
            ablation[point["name"]] = point
    results = {
        "backend": _backend(),
        "settings": recorded_settings(args),
        "paths": "relative to the folder holding this file; "
        "settings.data_dir as given when relative, else relative to the "
        "repository, else its name (data_fingerprint: its content)",
        "learning_rate_grids": {k: list(v) for k, v in args.grids.items()},
        "data": split_sizes,
        "pretrained": pretrain,
        "learning_rates": rates,
        "timing": timing,
        "arms": arms,
        "ablation": ablation,
        "paper": PAPER,
        "provenance": read_json(os.path.join(out, "environment.json")),
    }
    results["reductions"] = reductions(arms)
    return results


def _backend():
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def aggregate(arm, seeds, pretrain, timing, memory):
    base_row = pretrain["forgetting_row"]
    last_rows = [s["chunks"][-1]["forgetting_row"] for s in seeds]
    train = [
        None
        if any(
            c.get("train_seconds") is None
            for c in s["chunks"]
            if "epochs_run" in c
        )
        else sum(c.get("train_seconds", 0) for c in s["chunks"])
        for s in seeds
    ]
    matrix = [
        {
            part: statistics.fmean(
                s["chunks"][i]["forgetting_row"][part] for s in seeds
            )
            for part in base_row
        }
        for i in range(len(seeds[0]["chunks"]))
    ]
    return {
        "about": ARMS[arm]["about"],
        "learning_rate": seeds[0]["learning_rate"],
        "trainable_params": seeds[0]["trainable_params"],
        "step_time_ratio": timing.get("ratio_to_full", {}).get(arm),
        "step_seconds": mean_std(timing.get("seconds", {}).get(arm, [])),
        "train_seconds": None if arm == "frozen" else mean_std(train),
        "resumed": any(c.get("resumed") for s in seeds for c in s["chunks"]),
        "peak_rss_mb": memory.get("peak_rss_mb"),
        "device_peak_mb": memory.get("device_peak_mb"),
        "val_perplexity": mean_std([r["validation"] for r in last_rows]),
        "test_perplexity": mean_std([s["test_perplexity"] for s in seeds]),
        "test_bleu": mean_std([s["test_bleu"] for s in seeds]),
        "test_chrf": mean_std([s["test_chrf"] for s in seeds]),
        "heldout_initial_perplexity": mean_std(
            [r["initial"] for r in last_rows]
        ),
        "forgetting_perplexity": mean_std(
            [r["initial"] - base_row["initial"] for r in last_rows]
        ),
        "forgetting_bleu": mean_std(
            [
                s["heldout_initial_bleu"] - pretrain["heldout_initial_bleu"]
                for s in seeds
            ]
        ),
        "forgetting_matrix": matrix,
        "val_curves": [
            [c.get("val_perplexity_curve") for c in s["chunks"]] for s in seeds
        ][0],
        "sentences": seeds[0]["sentences"],
        "seeds": seeds,
    }


def reductions(arms):
    full, lora = arms.get("full"), arms.get("lora")
    if not full or not lora:
        return None
    ratio = lora["step_time_ratio"]
    time = None
    if ratio:
        time = {k: 1 - ratio[k] for k in ("median", "min", "max")}
    memory = None
    if lora["peak_rss_mb"] and full["peak_rss_mb"]:
        memory = 1 - lora["peak_rss_mb"] / full["peak_rss_mb"]
    return {
        "time_reduction": time,
        "memory_reduction": memory,
        "trainable_reduction": 1
        - lora["trainable_params"] / full["trainable_params"],
        "test_perplexity_change": lora["test_perplexity"]["mean"]
        / full["test_perplexity"]["mean"]
        - 1,
    }


def _pct(value):
    return "not measured" if value is None else f"{100 * value:.1f}%"


def _ratio(stat):
    if not stat:
        return "-"
    return f"{stat['median']:.2f} [{stat['min']:.2f}, {stat['max']:.2f}]"


def markdown(results):
    """The human-readable report."""
    s = results["settings"]
    pre, data = results["pretrained"], results["data"]
    chunks = data["chunks"]
    lines = [
        "# IWSLT 2017 en-de: LoRA against full fine-tuning, data arriving "
        f"in {len(chunks)} chunks ({results['backend']} backend)",
        "",
        f"Pre-trained on {data['initial']:,} pairs: {_stopping(results)} "
        f"(validation perplexity "
        f"{pre['forgetting_row']['validation']:.2f}, test perplexity "
        f"{pre['test_perplexity']:.2f}, BLEU {pre['test_bleu']:.2f}). Then "
        f"{sum(chunks):,} new pairs arrive in {len(chunks)} chunks "
        f"({', '.join(f'{c:,}' for c in chunks)}) and every arm learns them "
        "one after another from the same pre-trained weights, at its own "
        "learning rate (chosen on validation perplexity on the first chunk), "
        "up to "
        f"{s['update_epochs']} epochs per chunk, keeping each chunk's best "
        "validation epoch; LoRA arms merge their adapter into the base after "
        "each chunk and start a fresh one (lora_bf16, whose bfloat16 base "
        "cannot hold a merge, keeps one adapter across chunks). "
        f"{_seeds(s['seeds'])} GRU {s['units']}, "
        f"embedding {s['embedding_dim']}, vocabulary {s['vocab_size']}, "
        f"LoRA rank {s['rank']}, dropout {s['dropout']}, label smoothing "
        f"{s['label_smoothing']} (training loss only). Perplexity excludes "
        "padding. Test: tst2010-2015 "
        f"({data['test']:,} pairs), greedy decoding, sacrebleu. Step time: "
        "every arm's training step interleaved in one process on the same "
        "batches, as a ratio to full fine-tuning, median [min-max] of "
        f"{results['timing'].get('rounds', 0)} rounds. Peak memory: resident "
        "memory above each arm's own idle process while it trains on those "
        "batches. Forgetting: held-out initial pairs after the last chunk "
        "against the pre-trained model (Δ perplexity / Δ BLEU).",
        "",
        "| arm | learning rate | trainable params | step time (× full) | "
        "train s | peak RSS MB | val ppl | test ppl | BLEU | chrF | "
        "held-out initial ppl | forgetting Δppl / ΔBLEU (+ppl: forgot) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, r in results["arms"].items():
        rate = (
            "-" if r["learning_rate"] is None else f"{r['learning_rate']:.3g}"
        )
        memory = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        train = "-" if arm == "frozen" else fmt(r["train_seconds"], ".0f")
        lines.append(
            f"| {arm}{' (resumed)' if r['resumed'] else ''} | {rate} | "
            f"{r['trainable_params']:,} | {_ratio(r['step_time_ratio'])} | "
            f"{train} | {memory} | {fmt(r['val_perplexity'])} | "
            f"{fmt(r['test_perplexity'])} | {fmt(r['test_bleu'])} | "
            f"{fmt(r['test_chrf'])} | {fmt(r['heldout_initial_perplexity'])} "
            f"| {fmt(r['forgetting_perplexity'], '+.2f')} / "
            f"{fmt(r['forgetting_bleu'], '+.2f')} |"
        )
    lines += _paper_table(results)
    lines += _forgetting_tables(results)
    lines += _rate_table(results)
    lines += _translations(results)
    lines += _ablation_table(results)
    lines += _limits(results)
    return "\n".join(lines) + "\n"


def _stopping(results):
    """How pre-training ended, from its record and the settings."""
    pre, s = results["pretrained"], results["settings"]
    best, ran = pre["best_epoch"] + 1, pre["epochs_run"]
    if ran < s["pretrain_epochs"]:
        return (
            f"early stopping ended it after epoch {ran}, {ran - best} "
            f"epochs after its best, epoch {best}"
        )
    return (
        f"it ran its cap of {ran} epochs without early stopping (patience "
        f"{s['patience']}); best epoch {best}"
    )


def _seeds(seeds):
    if seeds == 1:
        return "One seed of this phase."
    return f"{seeds} seeds of this phase: mean ± std."


def _paper_table(results):
    red = results["reductions"]
    if not red:
        return []
    arms = results["arms"]
    time = red["time_reduction"]
    time_text = (
        "not measured"
        if time is None
        else f"{100 * time['median']:.1f}% [{100 * time['max']:.1f}%, "
        f"{100 * time['min']:.1f}%]"
    )
    return [
        "",
        "| LoRA vs full fine-tuning | paper | ours |",
        "|---|---:|---:|",
        f"| training time reduction (per step) | "
        f"{PAPER['time_reduction']:.1%} | {time_text} |",
        f"| peak memory reduction | {PAPER['memory_reduction']:.1%} | "
        f"{_pct(red['memory_reduction'])} |",
        f"| trainable parameter reduction | >99.9% | "
        f"{100 * red['trainable_reduction']:.2f}% "
        f"({arms['lora']['trainable_params']:,} against "
        f"{arms['full']['trainable_params']:,}) |",
        f"| test perplexity change | equal or better | "
        f"{100 * red['test_perplexity_change']:+.1f}% |",
    ]


def _forgetting_tables(results):
    lines = [
        "",
        "Forgetting matrices (perplexity, mean over seeds): rows are the "
        "model after each chunk, columns the held-out pairs of each part "
        "of the data.",
    ]
    parts = list(results["pretrained"]["forgetting_row"])
    for arm, r in results["arms"].items():
        lines += ["", f"**{arm}**", "", "| after | " + " | ".join(parts) + " |"]
        lines.append("|---" + "|---:" * len(parts) + "|")
        rows = [("pre-trained", results["pretrained"]["forgetting_row"])]
        rows += [
            (f"chunk {i + 1}", row)
            for i, row in enumerate(r["forgetting_matrix"])
        ]
        for name, row in rows:
            lines.append(
                f"| {name} | "
                + " | ".join(f"{row[p]:.2f}" for p in parts)
                + " |"
            )
    return lines


def _rate_table(results):
    lines = [
        "",
        "Learning rates (validation perplexity after learning the first "
        "chunk, seed 0; the grid extends past an edge that wins):",
        "",
        "| method | rates tried: validation perplexity | chosen |",
        "|---|---|---:|",
    ]
    for method, choice in results["learning_rates"].items():
        if choice:
            tried = ", ".join(
                f"{rate}: {value:.2f}"
                for rate, value in sorted(
                    choice["validation_perplexity"].items(),
                    key=lambda x: float(x[0]),
                )
            )
            lines.append(f"| {method} | {tried} | {choice['chosen']:.3g} |")
    return lines


def _translations(results):
    lines = ["", "Translations (greedy; seed 0):", ""]
    for sentence in SENTENCES:
        lines.append(f"- *{sentence}*")
        for arm, r in results["arms"].items():
            lines.append(f"  - {arm}: {r['sentences'].get(sentence, '')}")
    return lines


def _ablation_table(results):
    points = results["ablation"]
    if not points:
        return []
    lines = [
        "",
        "Ablation (`--ablation`: the first chunk, seed 0, each point at the "
        "better of two learning rates on validation):",
        "",
        "| point | rank | targets | trainable params | step time (× full) | "
        "learning rate | val ppl | test ppl | BLEU | chrF |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in points.items():
        lines.append(
            f"| {name} | {p['rank']} | {'+'.join(p['targets'])} | "
            f"{p['trainable_params']:,} | {_ratio(p.get('step_time_ratio'))} | "
            f"{p['learning_rate']:.3g} | {p['validation_perplexity']:.2f} | "
            f"{p['test_perplexity']:.2f} | {p['test_bleu']:.2f} | "
            f"{p['test_chrf']:.2f} |"
        )
    return lines


IWSLT2017_TRAIN_PAIRS = 206_112  # en-de training pairs in the release


def _limits(results):
    """What the run covered and what it ran on, as figures."""
    s, data = results["settings"], results["data"]
    read = data["initial"] + sum(data["chunks"]) + sum(data["heldout"].values())
    lines = [
        "",
        f"Scope: {read:,} training pairs read "
        f"({read / IWSLT2017_TRAIN_PAIRS:.1%} of IWSLT 2017 en-de's "
        f"{IWSLT2017_TRAIN_PAIRS:,}); {_plural(s['seeds'], 'seed')} of the "
        "incremental phase over one pre-trained base; learning rates chosen "
        "on the first chunk of seed 0 and reused for later chunks and seeds.",
    ]
    export = results.get("export")
    if export and "adapters" in export:
        lines += [
            "",
            f"Export: {export['path']} (relative to this folder), one "
            "SavedModel serving per request the adapters "
            f"{', '.join(export['adapters'])}; a request naming none gets "
            f"{export['default_adapter']}.",
        ]
    run = results.get("provenance")
    if run:
        device = run["device"]
        gpus = ", ".join(device["gpus"]) or "no GPU"
        code = (run["commit"] or "no git checkout")[:12]
        if run["uncommitted_changes"]:
            code += " with uncommitted changes"
        versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items())
        settings = run.get("environment") or {}
        settings = "".join(f"; {k}={v}" for k, v in settings.items())
        lines += [
            "",
            f"Run: {run['backend']} on {device['cpu']} "
            f"({device['cpu_count']} cores; {gpus}); code {code}; "
            f"{versions}{settings}. sacrebleu: BLEU "
            f"{run['sacrebleu']['bleu']}, chrF {run['sacrebleu']['chrf']}.",
        ]
    return lines


def _plural(count, noun):
    return f"{count} {noun}" + ("" if count == 1 else "s")


def write(results, output_dir):
    """results.json, results.md and the plots; returns the Markdown."""
    from keras_rnn_lora import files

    files.write_text(
        os.path.join(output_dir, "results.json"),
        json.dumps(results, indent=2, default=str),
    )
    report = markdown(results)
    files.write_text(os.path.join(output_dir, "results.md"), report)
    plots.write(results, output_dir)
    return report
