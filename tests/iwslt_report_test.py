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
                "train_seconds": seconds[0],
                "val_perplexity_curve": [80.0, 75.0],
                "forgetting_row": row,
            },
            {
                "epochs_run": 2,
                "train_seconds": seconds[1],
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
    arm = report.aggregate("lora", seeds, PRETRAIN, {}, {"peak_rss_mb": 50})
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
    arm = report.aggregate("full", seeds, PRETRAIN, {}, {})
    assert arm["train_seconds"] is None
    assert report.fmt(arm["train_seconds"]) == "not measured"


def test_reductions_come_from_the_interleaved_ratio():
    timing = {
        "ratio_to_full": {
            "lora": {"median": 0.6, "min": 0.5, "max": 0.7, "rounds": 7},
            "full": {"median": 1.0, "min": 1.0, "max": 1.0, "rounds": 7},
        }
    }
    arms = {
        "full": report.aggregate(
            "full", [seed_result(100.0)], PRETRAIN, timing, {"peak_rss_mb": 200}
        ),
        "lora": report.aggregate(
            "lora", [seed_result(120.0)], PRETRAIN, timing, {"peak_rss_mb": 150}
        ),
    }
    arms["lora"]["trainable_params"] = 1
    reductions = report.reductions(arms)
    assert reductions["time_reduction"] == {
        "median": pytest.approx(0.4),
        "min": pytest.approx(0.5),
        "max": pytest.approx(0.3),
    }
    assert reductions["memory_reduction"] == pytest.approx(0.25)
    assert reductions["trainable_reduction"] == pytest.approx(0.99)
    assert reductions["test_perplexity_change"] == pytest.approx(0.2)
    arms["lora"]["step_time_ratio"] = None
    arms["lora"]["peak_rss_mb"] = None
    assert report.reductions(arms)["time_reduction"] is None
    assert report.reductions(arms)["memory_reduction"] is None


def report_results(pretrain_epochs=30, epochs_run=30, best_epoch=27, seeds=1):
    """A results dict as `collect` makes it, for `markdown`."""
    timing = {"ratio_to_full": {}, "rounds": 3}
    arms = {
        arm: report.aggregate(arm, [seed_result(ppl)], PRETRAIN, timing, {})
        for arm, ppl in (("full", 100.0), ("lora", 120.0))
    }
    arms["lora"]["trainable_params"] = 1
    settings = {
        "pretrain_epochs": pretrain_epochs,
        "patience": 3,
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
