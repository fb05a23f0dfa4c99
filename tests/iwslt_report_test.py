"""Unit tests of the main job's report: aggregation over seeds, figures
that were not measured, the reductions (examples/iwslt/report.py)."""

import pytest
from iwslt import report


def seed_result(test_ppl, seconds=(10.0, 12.0), bleu=5.0):
    row = {"initial": 80.0, "chunk_1": 70.0, "validation": 75.0}
    return {
        "learning_rate": 1e-3,
        "trainable_params": 100,
        "test_perplexity": test_ppl,
        "test_bleu": bleu,
        "test_chrf": 30.0,
        "heldout_initial_bleu": 6.0,
        "sentences": {"Hi.": "Hallo."},
        "chunks": [
            {
                "epochs_run": 2,
                "stopped": "early stopping",
                "train_seconds": seconds[0],
                "epoch_steps": [10, 10],
                "val_perplexity_curve": [80.0, 75.0],
                "forgetting_row": row,
            },
            {
                "epochs_run": 2,
                "stopped": "early stopping",
                "train_seconds": seconds[1],
                "epoch_steps": [10, 10],
                "val_perplexity_curve": [74.0, 73.0],
                "forgetting_row": {**row, "initial": 82.0},
            },
        ],
    }


PRETRAIN = {
    "forgetting_row": {"initial": 90.0, "chunk_1": 95.0, "validation": 92.0},
    "heldout_initial_bleu": 5.5,
}


def test_seeds_give_mean_and_standard_deviation():
    seeds = [seed_result(100.0), seed_result(110.0)]
    memory = [{"peak_rss_mb": 500.0, "increment_mb": 50.0}]
    arm = report.aggregate("lora", seeds, PRETRAIN, {}, memory)
    assert arm["test_perplexity"] == {
        "mean": 105.0,
        "std": pytest.approx(7.0711, rel=1e-4),
        "n": 2,
    }
    assert arm["train_seconds"]["mean"] == 22.0
    assert arm["forgetting_perplexity"]["mean"] == -8.0  # 82 after, 90 before
    assert arm["forgetting_bleu"]["mean"] == 0.5
    assert report.fmt(arm["test_perplexity"]) == "105.00 ± 7.07"
    assert report.fmt(report.mean_std([3.0])) == "3.00"
    assert report.fmt(report.mean_std([-1.0, -3.0]), "+.2f") == "-2.00 ± 1.41"


def test_a_lost_epoch_time_is_not_measured_never_zero():
    seeds = [seed_result(100.0, seconds=(10.0, None))]
    arm = report.aggregate("full", seeds, PRETRAIN, {}, [])
    assert arm["train_seconds"] is None
    assert report.fmt(arm["train_seconds"]) == "not measured"


def memory(peak, increment):
    return [{"peak_rss_mb": peak, "increment_mb": increment}]


def test_reductions_come_from_the_interleaved_ratio():
    timing = {
        "ratio_to_full": {
            "lora": {"median": 0.6, "min": 0.5, "max": 0.7, "rounds": 7},
            "full": {"median": 1.0, "min": 1.0, "max": 1.0, "rounds": 7},
        }
    }
    arms = {
        "full": report.aggregate(
            "full", [seed_result(100.0)], PRETRAIN, timing, memory(800, 200)
        ),
        "lora": report.aggregate(
            "lora", [seed_result(120.0)], PRETRAIN, timing, memory(750, 150)
        ),
    }
    arms["lora"]["trainable_params"] = 1
    reductions = report.reductions(arms)
    # The slowest round (ratio 0.7) is the smallest reduction.
    assert reductions["time_reduction"] == {
        "median": pytest.approx(0.4),
        "min": pytest.approx(0.3),
        "max": pytest.approx(0.5),
    }
    shown = report_results()
    shown["reductions"] = reductions
    assert "| 40.0% [30.0%, 50.0%] |" in report.markdown(shown)
    assert reductions["memory_reduction"] == pytest.approx(0.25)
    assert reductions["trainable_reduction"] == pytest.approx(0.99)
    assert reductions["test_perplexity_change"] == pytest.approx(0.2)
    arms["lora"]["step_time_ratio"] = None
    arms["lora"]["memory_increment_mb"] = None
    assert report.reductions(arms)["time_reduction"] is None
    assert report.reductions(arms)["memory_reduction"] is None


def report_results(pretrain_epochs=30, epochs_run=30, best_epoch=27, seeds=1):
    """A results dict as `collect` makes it, for `markdown`."""
    timing = {"ratio_to_full": {}, "rounds": 3}
    arms = {
        arm: report.aggregate(arm, [seed_result(ppl)], PRETRAIN, timing, [])
        for arm, ppl in (("full", 100.0), ("lora", 120.0))
    }
    arms["lora"]["trainable_params"] = 1
    settings = {
        "pretrain_epochs": pretrain_epochs,
        "patience": 3,
        "update_patience": 2,
        "plateau_factor": 0.5,
        "update_epochs": 4,
        "seeds": seeds,
        "units": 8,
        "embedding_dim": 8,
        "vocab_size": 100,
        "rank": 2,
        "dropout": 0.0,
        "label_smoothing": 0.1,
    }
    pretrained = {
        **PRETRAIN,
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        "test_perplexity": 90.0,
        "test_bleu": 4.0,
    }
    return {
        "backend": "tensorflow",
        "settings": settings,
        "data": {
            "initial": 9500,
            "chunks": [4700, 4700],
            "heldout": {"initial": 500, "chunk_1": 300, "chunk_2": 300},
            "test": 8079,
        },
        "pretrained": pretrained,
        "learning_rates": {},
        "timing": timing,
        "arms": arms,
        "ablation": {},
        "reductions": report.reductions(arms),
        "provenance": {
            "commit": "0123456789abcdef",
            "uncommitted_changes": False,
            "backend": "tensorflow",
            "versions": {"keras": "3.15.1", "tensorflow": "2.21.0"},
            "device": {"cpu": "Some CPU", "cpu_count": 2, "gpus": []},
            "sacrebleu": {"bleu": "nrefs:1|tok:13a", "chrf": "nrefs:1|nc:6"},
        },
    }


def test_the_report_says_how_pre_training_ended_from_its_record():
    capped = report.markdown(report_results())
    assert (
        "it ran its cap of 30 epochs without early stopping (patience 3); "
        "best epoch 28" in capped
    )
    assert "stopped improving" not in capped
    stopped = report.markdown(report_results(epochs_run=14, best_epoch=10))
    assert (
        "early stopping ended it after epoch 14, 3 epochs after its best, "
        in (stopped)
    )


def test_the_report_states_figures_not_explanations():
    text = report.markdown(report_results())
    assert "| LoRA vs full fine-tuning | paper | ours |\n" in text
    assert "why they differ" not in text
    for prose in ("dominates", "outweigh", "cannot move", "a CPU's costs"):
        assert prose not in text, prose
    assert "One seed of this phase." in text and "± std" not in text
    assert "20,000 training pairs read (9.7% of IWSLT 2017" in text
    assert "1 seed of the incremental phase" in text
    assert (
        "Run: tensorflow on Some CPU (2 cores; no GPU); code 0123456789ab; "
        "keras 3.15.1, tensorflow 2.21.0. sacrebleu: BLEU nrefs:1|tok:13a, "
        "chrF nrefs:1|nc:6." in text
    )
    three = report.markdown(report_results(seeds=3))
    assert "3 seeds of this phase: mean ± std." in three
    flagged = report_results()
    flagged["provenance"]["environment"] = {"XLA_FLAGS": "--x=1"}
    assert "tensorflow 2.21.0; XLA_FLAGS=--x=1. sacrebleu" in report.markdown(
        flagged
    )
    resumed = report_results()
    later = {**resumed["provenance"], "versions": {"keras": "3.16.0"}}
    resumed["resumed_under"] = [later]
    text = report.markdown(resumed)
    assert "Run: tensorflow on Some CPU" in text
    assert (
        "Resumed under: tensorflow on Some CPU (2 cores; no GPU); code "
        "0123456789ab; keras 3.16.0." in text
    )


def test_memory_is_the_median_and_range_of_its_samples():
    samples = [
        {"peak_rss_mb": p, "increment_mb": i, "device_peak_mb": None}
        for p, i in ((900.0, 300.0), (700.0, 100.0), (800.0, 200.0))
    ]
    arm = report.aggregate("full", [seed_result(1.0)], PRETRAIN, {}, samples)
    assert arm["peak_rss_mb"] == {
        "median": 800.0,
        "min": 700.0,
        "max": 900.0,
        "n": 3,
    }
    assert arm["memory_increment_mb"]["median"] == 200.0
    assert arm["device_peak_mb"] is None
    assert report.median_text(arm["peak_rss_mb"]) == "800 [700, 900]"
    assert report.median_text(report.summary([5.0])) == "5"


def with_curves(result, curves, steps=10):
    for chunk, curve in zip(result["chunks"], curves, strict=True):
        chunk["val_perplexity_curve"] = curve
        chunk["epoch_steps"] = [steps] * len(curve)
        chunk["epochs_run"] = len(curve)
    return result


def cost_arms(step_seconds, curves, seeds=1):
    timing = {"seconds": {a: [s, s] for a, s in step_seconds.items()}}
    return {
        arm: report.aggregate(
            arm,
            [with_curves(seed_result(1.0), curves[arm]) for _ in range(seeds)],
            PRETRAIN,
            timing,
            [],
        )
        for arm in curves
    }


def test_cost_to_equal_quality_counts_every_step_until_the_target():
    arms = cost_arms(
        {"full": 2.0, "lora": 1.0, "control": 2.0},
        {
            # full reaches 60 in its first epoch: 10 steps of 2 s.
            "full": [[60.0, 55.0], [50.0, 52.0, 53.0]],
            # lora's best, 60, is the common target: epoch 2 of chunk 2,
            # after 5 epochs of 10 steps of 1 s.
            "lora": [[70.0, 66.0, 67.0], [62.0, 60.0]],
            "control": [[69.0, 68.0], [68.5, 68.0]],
        },
    )
    quality = report.equal_quality(arms)
    assert quality["target"]["weakest_arm"] == "lora"
    assert quality["target"]["val_perplexity"]["mean"] == 60.0
    full, lora = quality["arms"]["full"], quality["arms"]["lora"]
    assert full["seconds_to_target"]["mean"] == 20.0
    assert lora["seconds_to_target"]["mean"] == 50.0
    assert lora["ratio_to_full"]["mean"] == 2.5
    assert full["seconds_to_own_best"]["mean"] == 60.0  # 50 after 3 epochs
    assert quality["arms"]["control"]["reached"] == 0
    assert quality["arms"]["control"]["seconds_to_target"] is None
    assert quality["cheapest"] == "full"
    results = report_results()
    results["arms"] = arms
    results["equal_quality"] = quality
    text = report.markdown(results)
    assert "| control | " in text and "not reached" in text
    assert "Cheapest to the common target: full, 20 s of training." in text
    assert (
        "| training time reduction (to the common target) | - | -150.0% |"
        in text
    )


def test_cost_to_equal_quality_needs_the_step_timing():
    arms = cost_arms({}, {"full": [[60.0], [50.0]], "lora": [[70.0], [60.0]]})
    assert report.equal_quality(arms) is None
    results = report_results()
    results["arms"] = arms
    results["equal_quality"] = None
    assert "| full | not measured | - | " in report.markdown(results)


def last_validation(arm, *values):
    for seed, value in zip(arm["seeds"], values, strict=True):
        seed["chunks"][-1]["forgetting_row"]["validation"] = value


def share_arms(seeds=1):
    return {
        arm: report.aggregate(
            arm, [seed_result(1.0) for _ in range(seeds)], PRETRAIN, {}, []
        )
        for arm in ("full", "lora", "control", "frozen")
    }


def test_the_gain_share_is_measured_above_the_control_arm():
    arms = share_arms()
    for arm, value in (("full", 50.0), ("lora", 62.0), ("control", 66.0)):
        last_validation(arms[arm], value)
    last_validation(arms["frozen"], 70.0)
    report.add_gain_shares(arms)
    assert arms["full"]["gain_share"] == 1.0
    assert arms["control"]["gain_share"] == 0.0
    assert arms["lora"]["gain_share"] == 0.25
    assert arms["frozen"]["gain_share"] == -0.25
    del arms["control"]
    for arm in arms.values():
        del arm["gain_share"]
    report.add_gain_shares(arms)
    assert "gain_share" not in arms["lora"]


def test_the_gain_share_comes_from_the_means_and_needs_a_gain():
    """Per-seed shares blow up when one seed's full and control arms are
    close or reversed (lora, better than control in both seeds, got a
    negative mean share that way): the share is of the means."""
    arms = share_arms(seeds=2)
    last_validation(arms["full"], 60.0, 66.5)
    last_validation(arms["control"], 66.0, 66.0)
    last_validation(arms["lora"], 65.0, 65.5)
    report.add_gain_shares(arms)
    assert arms["lora"]["gain_share"] == pytest.approx(0.75 / 2.75)
    last_validation(arms["full"], 66.0, 66.5)  # no gain over control
    for arm in arms.values():
        arm.pop("gain_share", None)
    report.add_gain_shares(arms)
    assert "gain_share" not in arms["lora"]


def test_a_diverged_seed_is_counted_not_a_crash():
    stat = report.mean_std([float("nan"), 2.0, 4.0, float("inf")])
    assert stat == {
        "mean": 3.0,
        "std": pytest.approx(1.4142, rel=1e-4),
        "n": 2,
        "diverged": 2,
    }
    assert report.fmt(stat) == "3.00 ± 1.41 (2 diverged)"
    every = report.mean_std([float("nan")])
    assert every["mean"] == float("inf") and report.fmt(every) == "diverged"
    assert report.plain({"a": [float("nan"), 1.0], "b": float("inf")}) == {
        "a": ["nan", 1.0],
        "b": "inf",
    }


def test_epochs_per_chunk_name_the_fits_at_the_cap():
    one = report.aggregate("lora", [seed_result(1.0)], PRETRAIN, {}, [])
    assert report.epochs_text(one) == "2, 2"
    capped = seed_result(1.0)
    capped["chunks"][1]["stopped"] = "cap"
    capped["chunks"][1]["epochs_run"] = 4
    two = report.aggregate("lora", [seed_result(1.0), capped], PRETRAIN, {}, [])
    assert report.epochs_text(two) == "2.0, 3.0 (1 at the cap)"


def test_the_report_names_the_schedule_and_its_reductions():
    results = report_results(pretrain_epochs=60, epochs_run=20, best_epoch=16)
    results["pretrained"]["stopped"] = "early stopping"
    results["pretrained"]["learning_rate_curve"] = [2e-3] * 15 + [
        1e-3,
        5e-4,
        5e-4,
        2.5e-4,
        1.25e-4,
    ]
    text = report.markdown(results)
    assert (
        "the learning rate multiplied by 0.5 after 1 epoch without a "
        "better validation perplexity: early stopping ended it after "
        "epoch 20, 3 epochs after its best, epoch 17; the learning rate was "
        "reduced 4 times, to 0.000125 in the last epoch" in text
    )
    results["settings"]["patience"] = 4  # half of it, to a halving
    assert "multiplied by 0.5 after 2 epochs without" in report.markdown(
        results
    )
    assert "early stopping 2 epochs after the best" in text


def test_a_diverged_epoch_counts_its_steps_but_reaches_nothing():
    seed = with_curves(
        seed_result(1.0), [[float("nan"), 70.0], [float("inf"), 60.0]]
    )
    assert report.trajectory(seed) == [(20, 70.0), (40, 60.0)]
    assert report.steps_to(report.trajectory(seed), 65.0) == 40


def test_a_diverged_learning_rate_trial_is_named_in_the_report():
    results = report_results()
    results["learning_rates"] = {
        "lora": {
            "chosen": 0.03,
            "validation_perplexity": {
                "0.01": None,
                "0.03": 216.5,
                "0.09": float("nan"),
            },
        }
    }
    text = report.markdown(results)
    assert (
        "| lora | 0.01: diverged, 0.03: 216.50, 0.09: diverged | 0.03 |" in text
    )


def test_an_empty_or_diverged_translation_is_named():
    results = report_results()
    results["arms"]["lora"]["seeds"][0]["diverged_at_chunk"] = 2
    text = report.markdown(results)
    assert "  - full: (empty)\n" in text  # no sentence of the report
    assert "  - lora: (diverged)\n" in text


def test_a_run_of_the_frozen_arm_alone_measures_no_cost():
    """`--arms frozen`: the report said costs were the median of "0
    rounds" over "no fresh processes", above an empty table."""
    results = report_results()
    frozen = report.aggregate("frozen", [seed_result(110.0)], PRETRAIN, {}, [])
    results.update(arms={"frozen": frozen}, timing={}, reductions={})
    text = report.markdown(results)
    assert "Costs: no arm of this run trains; none are measured." in text
    assert "0 rounds" not in text and "| step ms |" not in text
