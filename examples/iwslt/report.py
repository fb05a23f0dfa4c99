"""The main job's report: `results.json` (everything), `results.md`
(printed last) and the plots `curves.png`, `forgetting.png` and, with
`--ablation`, `ablation.png`. Figures over seeds are mean ± standard
deviation; a figure a run did not measure is written as such, never as a
number."""

import itertools
import json
import math
import os
import statistics

from iwslt import costs
from iwslt import plots
from iwslt.arms import plateau_patience
from iwslt.arms import read_json
from iwslt.paths import recorded_settings
from iwslt.settings import PAPER
from iwslt.settings import SENTENCES
from iwslt.settings import arm_spec


def mean_std(values):
    """Mean, standard deviation and count of the finite `values` (`None`:
    not measured); `diverged` counts the non-finite ones (NaN, inf), and
    with no finite value the mean is infinite: it ranks last."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    finite = [v for v in values if math.isfinite(v)]
    stat = {
        "mean": statistics.fmean(finite) if finite else math.inf,
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "n": len(finite),
    }
    if len(finite) < len(values):
        stat["diverged"] = len(values) - len(finite)
    return stat


def fmt(stat, spec=".2f"):
    if stat is None:
        return "not measured"
    if stat["n"] == 0:
        return "diverged"
    if stat["n"] == 1:
        text = format(stat["mean"], spec)
    else:
        spread = format(stat["std"], spec.lstrip("+"))  # a spread: no sign
        text = f"{format(stat['mean'], spec)} ± {spread}"
    if stat.get("diverged"):
        text += f" ({stat['diverged']} diverged)"
    return text


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
        if arm == "frozen":  # the same model in every seed: no repetition
            seeds = seeds[:1]
        memory = costs.memory_samples(args, arm)
        arms[arm] = aggregate(arm, seeds, pretrain, timing, memory)
    add_gain_shares(arms)
    ablation_timing = read_json(
        os.path.join(out, "costs", "timing_ablation.json"), {}
    )
    ablation = collect_ablation(args, pretrain, ablation_timing)
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
        "ablation_timing": ablation_timing,
        "arms": arms,
        "equal_quality": equal_quality(arms),
        "ablation": ablation,
        "paper": PAPER,
    }
    # What the run started under, and what a resumed part ran under where
    # that differed.
    environments = read_json(os.path.join(out, "environment.json"), [])
    results["provenance"] = environments[0] if environments else None
    results["resumed_under"] = environments[1:]
    results["reductions"] = reductions(arms)
    return results


def collect_ablation(args, pretrain, timing):
    """Every finished ablation point as an arm (`aggregate`) with its
    settings, its rate choice and its share of full fine-tuning's gain over
    the control arm, over the ablation's seeds; `{}` without `--ablation`."""
    if not args.ablation:
        return {}
    from iwslt import ablation as stages

    def runs(arm):
        found = [
            read_json(
                os.path.join(
                    args.output_dir, "seeds", str(s), arm, "result.json"
                )
            )
            for s in range(stages.seeds(args))
        ]
        return None if None in found else found

    points = {}
    for point in stages.points(args):
        arm = stages.arm_of(args, point)
        if runs(arm) is None:
            continue
        spec = arm_spec(point)
        config = spec["config"]
        points[point] = {
            **aggregate(arm, runs(arm), pretrain, timing, []),
            "arm": arm,
            "targets": list(spec["targets"]),
            "rank": config["rank"],
            "variant": spec["variant"],
            "lora_alpha": config.get("lora_alpha", config["rank"]),
            "lora_dropout": config.get("lora_dropout", 0.0),
            "rate_choice": read_json(
                os.path.join(
                    args.output_dir,
                    "learning_rates",
                    arm_spec(arm)["method"],
                    "choice.json",
                )
            ),
        }
    reference = {a: runs(a) for a in ("full", "control")}
    if None not in reference.values():
        both = {
            a: aggregate(a, r, pretrain, timing, [])
            for a, r in reference.items()
        }
        add_gain_shares({**both, **points})
    return points


def _backend():
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def summary(values):
    """Median, min, max and count of the measured `values`; `None` if
    none was measured."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _finite_mean(values):
    """The mean of the finite `values` (a diverged seed's are not); NaN if
    there is none."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def aggregate(arm, seeds, pretrain, timing, memory):
    """One arm's figures over its `seeds` (result records) and its `memory`
    samples (`costs.memory_probe` records)."""
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
            part: _finite_mean(
                s["chunks"][i]["forgetting_row"][part] for s in seeds
            )
            for part in base_row
        }
        for i in range(len(seeds[0]["chunks"]))
    ]
    fits = [c for s in seeds for c in s["chunks"] if "epochs_run" in c]
    step_seconds = timing.get("seconds", {}).get(arm)
    return {
        "about": arm_spec(arm)["about"],
        "learning_rate": seeds[0]["learning_rate"],
        "trainable_params": seeds[0]["trainable_params"],
        "step_time_ratio": timing.get("ratio_to_full", {}).get(arm),
        "step_seconds": summary(step_seconds) if step_seconds else None,
        "train_seconds": None if arm == "frozen" else mean_std(train),
        # Per seed, per chunk: epochs run and what ended the fit.
        "epochs": [
            [c["epochs_run"] for c in s["chunks"] if "epochs_run" in c]
            for s in seeds
        ],
        "fits_at_cap": sum(c.get("stopped") == "cap" for c in fits),
        "resumed": any(c.get("resumed") for s in seeds for c in s["chunks"]),
        "peak_rss_mb": summary(m.get("peak_rss_mb") for m in memory),
        "memory_increment_mb": summary(m.get("increment_mb") for m in memory),
        "device_peak_mb": summary(m.get("device_peak_mb") for m in memory),
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


def _last_validation(arm):
    return mean_std(
        [s["chunks"][-1]["forgetting_row"]["validation"] for s in arm["seeds"]]
    )


def add_gain_shares(arms):
    """Each arm's `gain_share`: the share of full fine-tuning's gain in
    validation perplexity over the control arm's (more training on the
    initial data alone) that the arm recovers after the last chunk, from
    the means over seeds: (control - arm) / (control - full). Absent
    without both arms, or unless full fine-tuning's mean is below the
    control's (no gain to share)."""
    if "full" not in arms or "control" not in arms:
        return
    full = _last_validation(arms["full"])
    control = _last_validation(arms["control"])
    if not (full["n"] and control["n"]):
        return
    gain = control["mean"] - full["mean"]
    if not gain > 0:
        return
    for arm in arms.values():
        value = _last_validation(arm)
        if value["n"]:
            arm["gain_share"] = (control["mean"] - value["mean"]) / gain


def trajectory(seed):
    """`[(cumulative training steps, validation perplexity)]` after every
    epoch of one seed's chunks in turn (every epoch run counts, also those
    after a chunk's best; an epoch whose perplexity is not finite counts
    its steps but no point)."""
    points, steps = [], 0
    for chunk in seed["chunks"]:
        for n, value in zip(
            chunk.get("epoch_steps") or [],
            chunk.get("val_perplexity_curve") or [],
            strict=True,
        ):
            steps += n
            if value is not None and math.isfinite(value):  # not diverged
                points.append((steps, value))
    return points


def steps_to(points, target):
    """Training steps until validation perplexity first reaches `target`
    (`None`: never)."""
    return next((steps for steps, v in points if v <= target), None)


ADAPTING = ("full", "lora", "lora_kernel", "lora_bf16")  # learn the new data


def equal_quality(arms):
    """Training cost to equal quality, per seed: the common target is the
    best validation perplexity of the weakest adapting arm (the highest of
    their bests); each arm's cost to reach it, and its own best, is its
    interleaved median step time times the steps it took to get there.
    `None` without the step timing or an adapting arm."""
    adapting = [a for a in ADAPTING if a in arms and arms[a]["step_seconds"]]
    if not adapting:
        return None
    seeds = len(arms[adapting[0]]["seeds"])
    per_arm = {a: [] for a in arms if arms[a]["step_seconds"]}
    targets = []
    for i in range(seeds):
        paths = {a: trajectory(arms[a]["seeds"][i]) for a in per_arm}
        if not all(paths[a] for a in adapting):
            return None
        bests = {a: min(v for _, v in paths[a]) for a in adapting}
        weakest = max(bests, key=bests.get)
        target = bests[weakest]
        targets.append((weakest, target))
        for arm, points in paths.items():
            seconds = arms[arm]["step_seconds"]["median"]
            reached = steps_to(points, target)
            own = (
                steps_to(points, min(v for _, v in points)) if points else None
            )
            per_arm[arm].append(
                {
                    "steps_to_target": reached,
                    "seconds_to_target": None
                    if reached is None
                    else reached * seconds,
                    "seconds_to_own_best": None
                    if own is None
                    else own * seconds,
                }
            )
    result = {
        "target": {
            "weakest_arm": targets[0][0],
            "weakest_arms": [t[0] for t in targets],
            "val_perplexity": mean_std([t[1] for t in targets]),
        },
        "arms": {},
    }
    for arm, runs in per_arm.items():
        full = per_arm.get("full")
        ratios = (
            [
                r["seconds_to_target"] / f["seconds_to_target"]
                for r, f in zip(runs, full, strict=True)
                if r["seconds_to_target"] is not None
            ]
            if full
            else []
        )
        result["arms"][arm] = {
            "reached": sum(r["steps_to_target"] is not None for r in runs),
            "seeds": len(runs),
            "seconds_to_target": mean_std(
                [r["seconds_to_target"] for r in runs]
            ),
            "ratio_to_full": mean_std(ratios),
            "seconds_to_own_best": mean_std(
                [r["seconds_to_own_best"] for r in runs]
            ),
        }
    complete = {
        a: r["seconds_to_target"]["mean"]
        for a, r in result["arms"].items()
        if r["reached"] == r["seeds"]
    }
    result["cheapest"] = min(complete, key=complete.get) if complete else None
    return result


def reductions(arms):
    full, lora = arms.get("full"), arms.get("lora")
    if not full or not lora:
        return None
    ratio = lora["step_time_ratio"]
    time = None
    if ratio:
        # The largest ratio is the smallest reduction.
        time = {
            "median": 1 - ratio["median"],
            "min": 1 - ratio["max"],
            "max": 1 - ratio["min"],
        }
    memory = None
    if lora["memory_increment_mb"] and full["memory_increment_mb"]:
        memory = (
            1
            - lora["memory_increment_mb"]["median"]
            / full["memory_increment_mb"]["median"]
        )
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


def median_text(stat, spec=".0f"):
    """A `summary`: the median and [min, max] of n samples."""
    if stat is None:
        return "not measured"
    if stat["n"] == 1:
        return format(stat["median"], spec)
    return (
        f"{format(stat['median'], spec)} [{format(stat['min'], spec)}, "
        f"{format(stat['max'], spec)}]"
    )


def epochs_text(r):
    """Epochs run per chunk: seed 0's, or the mean over seeds; fits that
    hit the cap are counted."""
    epochs = r["epochs"]
    if not epochs or not epochs[0]:
        return "-"
    if len(epochs) == 1:
        text = ", ".join(str(e) for e in epochs[0])
    else:
        text = ", ".join(
            f"{statistics.fmean(column):.1f}"
            for column in zip(*epochs, strict=True)
        )
    if r["fits_at_cap"]:
        text += f" ({r['fits_at_cap']} at the cap)"
    return text


def markdown(results):
    """The human-readable report: figures, and comparisons computed from
    them; what they mean is written in the docs, after the run."""
    s = results["settings"]
    pre, data = results["pretrained"], results["data"]
    chunks = data["chunks"]
    factor = s.get("plateau_factor", 1.0)

    def schedule(patience):
        if factor >= 1.0:
            return "a constant learning rate"
        wait = plateau_patience(patience)
        return (
            f"the learning rate multiplied by {factor:g} after "
            f"{_plural(wait, 'epoch')} without a better validation perplexity"
        )

    lines = [
        "# IWSLT 2017 en-de: LoRA against full fine-tuning, data arriving "
        f"in {len(chunks)} chunks ({results['backend']} backend)",
        "",
        f"Pre-trained on {data['initial']:,} pairs, "
        f"{schedule(s['patience'])}: "
        f"{_stopping(results)} (validation perplexity "
        f"{pre['forgetting_row']['validation']:.2f}, test perplexity "
        f"{pre['test_perplexity']:.2f}, BLEU {pre['test_bleu']:.2f}). Then "
        f"{sum(chunks):,} new pairs arrive in {len(chunks)} chunks "
        f"({', '.join(f'{c:,}' for c in chunks)}) and every arm learns them "
        "one after another (the control arm as many initial pairs instead) "
        "from the same pre-trained weights, at its own learning rate (chosen "
        "on validation perplexity on the first chunk), "
        f"each chunk with {schedule(s['update_patience'])}, at most "
        f"{s['update_epochs']} "
        f"epochs and early stopping {_plural(s['update_patience'], 'epoch')} "
        "after the best, keeping the best validation epoch; LoRA arms merge "
        "their adapter into the base after each chunk and start a fresh one "
        "(lora_bf16, whose bfloat16 base cannot hold a merge, keeps one "
        "adapter across chunks). "
        f"{_seeds(s['seeds'])} GRU {s['units']}, "
        f"embedding {s['embedding_dim']}, vocabulary {s['vocab_size']}, "
        f"LoRA rank {s['rank']}, dropout {s['dropout']}, label smoothing "
        f"{s['label_smoothing']} (training loss only). Perplexity excludes "
        "padding. Test: tst2010-2015 "
        f"({data['test']:,} pairs), greedy decoding, sacrebleu.",
        "",
        "Arms: "
        + "; ".join(
            f"`{arm}`: {r['about']}" for arm, r in results["arms"].items()
        )
        + ".",
        "",
        "| arm | learning rate | trainable params | epochs per chunk | "
        "val ppl | share of full's gain over control | test ppl | BLEU | "
        "chrF | held-out initial ppl | forgetting Δppl / ΔBLEU "
        "(+ppl: forgot) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, r in results["arms"].items():
        rate = (
            "-" if r["learning_rate"] is None else f"{r['learning_rate']:.3g}"
        )
        share = r.get("gain_share")
        share = "-" if share is None else f"{share:.2f}"
        lines.append(
            f"| {arm}{' (resumed)' if r['resumed'] else ''} | {rate} | "
            f"{r['trainable_params']:,} | {epochs_text(r)} | "
            f"{fmt(r['val_perplexity'])} | {share} | "
            f"{fmt(r['test_perplexity'])} | {fmt(r['test_bleu'])} | "
            f"{fmt(r['test_chrf'])} | {fmt(r['heldout_initial_perplexity'])} "
            f"| {fmt(r['forgetting_perplexity'], '+.2f')} / "
            f"{fmt(r['forgetting_bleu'], '+.2f')} |"
        )
    lines += _cost_table(results)
    lines += _paper_table(results)
    lines += _forgetting_tables(results)
    lines += _rate_table(results)
    lines += _translations(results)
    lines += _ablation_table(results)
    lines += _limits(results)
    return "\n".join(lines) + "\n"


def _cost_table(results):
    """Cost per step, cost to equal quality, memory; every arm that
    trains."""
    quality = results.get("equal_quality") or {"arms": {}}
    timing = results["timing"]
    if all(arm == "frozen" for arm in results["arms"]):
        return ["", "Costs: no arm of this run trains; none are measured."]
    samples = {
        r["peak_rss_mb"]["n"]
        for r in results["arms"].values()
        if r["peak_rss_mb"]
    }
    lines = [
        "",
        "Costs. Step time: every arm's training step interleaved in one "
        "process on the same batches, median [min, max] of "
        f"{timing.get('rounds', 0)} rounds, and as a ratio to full "
        "fine-tuning per round. Training time to a validation perplexity: "
        "the arm's median step time times the steps it took to first reach "
        "it, every epoch of every chunk counted",
    ]
    target = quality.get("target")
    if target:
        arms = sorted(set(target["weakest_arms"]))
        lines[-1] += (
            f"; the common target, {fmt(target['val_perplexity'])}, is the "
            f"best of the weakest adapting arm ({', '.join(arms)})"
        )
    lines[-1] += (
        ". Peak memory: resident memory while the arm trains on those "
        "batches, absolute and above the same process just before, median "
        f"[min, max] of {'/'.join(str(n) for n in sorted(samples)) or 'no'} "
        f"fresh process{'' if samples == {1} else 'es'} per arm."
    )
    lines += [
        "",
        "| arm | step ms | step time (× full) | train s | s to common "
        "target (× full) | s to own best | peak RSS MB | above idle MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, r in results["arms"].items():
        if arm == "frozen":
            continue
        q = quality["arms"].get(arm)
        step = r["step_seconds"]
        step = (
            "not measured"
            if step is None
            else median_text(
                {
                    **step,
                    **{k: 1000 * step[k] for k in ("median", "min", "max")},
                }
            )
        )
        if q is None:
            to_target = own = "not measured"
        else:
            to_target = (
                "not reached"
                if not q["reached"]
                else fmt(q["seconds_to_target"], ".0f")
                + (
                    f" ({fmt(q['ratio_to_full'], '.2f')}×)"
                    if q["ratio_to_full"]
                    else ""
                )
            )
            if 0 < q["reached"] < q["seeds"]:
                to_target += (
                    f", reached in {q['reached']} of {q['seeds']} seeds"
                )
            own = fmt(q["seconds_to_own_best"], ".0f")
        lines.append(
            f"| {arm} | {step} | {_ratio(r['step_time_ratio'])} | "
            f"{fmt(r['train_seconds'], '.0f')} | {to_target} | {own} | "
            f"{median_text(r['peak_rss_mb'])} | "
            f"{median_text(r['memory_increment_mb'])} |"
        )
    cheapest = quality.get("cheapest")
    if target and cheapest and len(quality["arms"]) > 1:
        seconds = quality["arms"][cheapest]["seconds_to_target"]
        lines += [
            "",
            f"Cheapest to the common target: {cheapest}, "
            f"{fmt(seconds, '.0f')} s of training.",
        ]
    return lines


def _stopping(results):
    """How pre-training ended, from its record and the settings."""
    pre, s = results["pretrained"], results["settings"]
    best, ran = pre["best_epoch"] + 1, pre["epochs_run"]
    rates = [r for r in pre.get("learning_rate_curve") or [] if r is not None]
    reduced = ""
    if rates:
        cuts = sum(b < a for a, b in itertools.pairwise(rates))
        reduced = (
            f"; the learning rate was reduced {_plural(cuts, 'time')}, to "
            f"{rates[-1]:.3g} in the last epoch"
            if cuts
            else f"; the learning rate stayed at {rates[-1]:.3g}"
        )
    if (
        pre.get(
            "stopped", "early stopping" if ran < s["pretrain_epochs"] else "cap"
        )
        == "early stopping"
    ):
        return (
            f"early stopping ended it after epoch {ran}, {ran - best} "
            f"epochs after its best, epoch {best}{reduced}"
        )
    return (
        f"it ran its cap of {ran} epochs without early stopping (patience "
        f"{s['patience']}); best epoch {best}{reduced}"
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
        else f"{100 * time['median']:.1f}% [{100 * time['min']:.1f}%, "
        f"{100 * time['max']:.1f}%]"
    )
    return [
        "",
        "| LoRA vs full fine-tuning | paper | ours |",
        "|---|---:|---:|",
        f"| training time reduction (per step) | "
        f"{PAPER['time_reduction']:.1%} | {time_text} |",
        f"| training time reduction (to the common target) | - | "
        f"{_to_target(results)} |",
        f"| peak memory reduction (above idle) | "
        f"{PAPER['memory_reduction']:.1%} | "
        f"{_pct(red['memory_reduction'])} |",
        f"| trainable parameter reduction | >99.9% | "
        f"{100 * red['trainable_reduction']:.2f}% "
        f"({arms['lora']['trainable_params']:,} against "
        f"{arms['full']['trainable_params']:,}) |",
        f"| test perplexity change | equal or better | "
        f"{100 * red['test_perplexity_change']:+.1f}% |",
    ]


def _to_target(results):
    """1 - LoRA's training time to the common target over full's."""
    quality = (results.get("equal_quality") or {}).get("arms", {})
    lora, full = quality.get("lora"), quality.get("full")
    if not lora or not full or lora["ratio_to_full"] is None:
        return "not reached" if lora and full else "not measured"
    ratio = lora["ratio_to_full"]
    text = f"{100 * (1 - ratio['mean']):.1f}%"
    if ratio["n"] > 1:
        text += f" ± {100 * ratio['std']:.1f}"
    return text


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
                + " | ".join(_perplexity(row[p]) for p in parts)
                + " |"
            )
    return lines


def _rate_table(results):
    extensions = results["settings"].get("grid_extensions", 0)
    rule = (
        f"the grid extends past an edge that wins, {extensions} time(s) at most"
        if extensions
        else "the grid is not extended"
    )
    lines = [
        "",
        "Learning rates (validation perplexity after learning the first "
        f"chunk, seed 0; {rule}):",
        "",
        "| method | rates tried: validation perplexity | chosen |",
        "|---|---|---:|",
    ]
    for method, choice in results["learning_rates"].items():
        if choice:
            tried = ", ".join(
                f"{rate}: {_perplexity(value)}"
                for rate, value in sorted(
                    choice["validation_perplexity"].items(),
                    key=lambda x: float(x[0]),
                )
            )
            lines.append(f"| {method} | {tried} | {choice['chosen']:.3g} |")
    return lines


def _perplexity(value):
    """A perplexity, or "diverged" where it is not finite (a fit that had
    no finite one, or the mean over seeds that all diverged)."""
    if value is None or not math.isfinite(value):
        return "diverged"
    return f"{value:.2f}"


def _translations(results):
    lines = ["", "Translations (greedy; seed 0):", ""]
    for sentence in SENTENCES:
        lines.append(f"- *{sentence}*")
        for arm, r in results["arms"].items():
            if "diverged_at_chunk" in r["seeds"][0]:
                text = "(diverged)"
            else:
                text = r["sentences"].get(sentence) or "(empty)"
            lines.append(f"  - {arm}: {text}")
    return lines


def _ablation_table(results):
    points = results["ablation"]
    if not points:
        return []
    seeds = {len(p["seeds"]) for p in points.values()}
    lines = [
        "",
        "Ablation (`--ablation`): every point an arm of its own under the "
        "protocol above (its own learning rate, every chunk, early "
        f"stopping), {'/'.join(str(n) for n in sorted(seeds))} seeds, "
        "mean ± std; first ranks and target sets, then the variants at the "
        "best target set, then LoRA alpha and dropout at the best point. "
        "Share of the gain: (control - point) / (control - full) in "
        "validation perplexity after the last chunk, of the means over "
        "seeds. Step time: "
        "interleaved with `full` in a timing run of its own.",
        "",
        "| point | targets | rank | variant | alpha | LoRA dropout | "
        "trainable params | learning rate | epochs per chunk | step time "
        "(× full) | val ppl | share of full's gain over control | test ppl "
        "| BLEU |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in points.items():
        share = p.get("gain_share")
        alias = f" (= {p['arm']})" if p["arm"] != name else ""
        lines.append(
            f"| {name}{alias} | {'+'.join(p['targets'])} | {p['rank']} | "
            f"{p['variant'] or '-'} | {p['lora_alpha']:g} | "
            f"{p['lora_dropout']:g} | {p['trainable_params']:,} | "
            f"{p['learning_rate']:.3g} | {epochs_text(p)} | "
            f"{_ratio(p.get('step_time_ratio'))} | {fmt(p['val_perplexity'])} "
            f"| {'-' if share is None else f'{share:.2f}'} | "
            f"{fmt(p['test_perplexity'])} | {fmt(p['test_bleu'])} |"
        )

    def chosen_on(name):  # as the stages choose: a diverged seed ranks last
        stat = points[name]["val_perplexity"]
        return math.inf if stat.get("diverged") else stat["mean"]

    best = min(points, key=chosen_on)
    p = points[best]
    share = p.get("gain_share")
    lines += [
        "",
        f"Lowest validation perplexity (the figure every choice was made "
        f"on): {best}, {fmt(p['val_perplexity'])}"
        + ("" if share is None else f", {share:.2f} of full's gain")
        + f"; test perplexity {fmt(p['test_perplexity'])}, with "
        f"{p['trainable_params']:,} trainable parameters and a step time of "
        f"{_ratio(p.get('step_time_ratio'))} × full.",
    ]
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
    environments = [
        results.get("provenance"),
        *results.get("resumed_under", []),
    ]
    for i, run in enumerate(e for e in environments if e):
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
            ("Run: " if i == 0 else "Resumed under: ")
            + f"{run['backend']} on {device['cpu']} "
            f"({device['cpu_count']} cores; {gpus}); code {code}; "
            f"{versions}{settings}. sacrebleu: BLEU "
            f"{run['sacrebleu']['bleu']}, chrF {run['sacrebleu']['chrf']}.",
        ]
    return lines


def _plural(count, noun):
    return f"{count} {noun}" + ("" if count == 1 else "s")


def plain(value):
    """`value` with every non-finite float written as a string ("nan",
    "inf"), so results.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def write(results, output_dir):
    """results.json, results.md and the plots; returns the Markdown."""
    from keras_rnn_lora import files

    files.write_text(
        os.path.join(output_dir, "results.json"),
        json.dumps(plain(results), indent=2, default=str, allow_nan=False),
    )
    report = markdown(results)
    files.write_text(os.path.join(output_dir, "results.md"), report)
    plots.write(results, output_dir)
    return report
