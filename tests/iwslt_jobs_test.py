"""The main job's units of work (examples/iwslt/jobs.py) where a fit
diverges, and the record of what each invocation ran under."""

import json
import math
import types

import keras
import pytest
from iwslt import jobs
from iwslt import report

PRETRAIN = {
    "forgetting_row": {"initial": 90.0, "chunk_1": 95.0, "validation": 92.0},
    "heldout_initial_bleu": 5.5,
}


def small_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.build((None, 3))
    return model


def test_a_diverged_chunk_ends_its_seed_and_the_run_goes_on(
    tmp_path, monkeypatch
):
    """Seed 1 diverges on its first chunk: its result records that, every
    later figure as not finite, and the report counts the seed as diverged
    beside a seed that finished (a run used to stop there for good)."""
    args = types.SimpleNamespace(output_dir=str(tmp_path), increments=2)
    (tmp_path / "pretrain.json").write_text(json.dumps(PRETRAIN))
    model = small_model()
    monkeypatch.setattr(jobs, "chosen_rate", lambda args, arm: 0.1)

    def diverged(args, arm, seed_index, chunk, rate, start=None):
        return {
            "epochs_run": 2,
            "stopped": "early stopping",
            "train_seconds": 3.0,
            "epoch_steps": [5, 5],
            "val_perplexity_curve": [math.nan, math.nan],
            "best_val_perplexity": None,
            "best": None,
            "model": model,
            "split": None,
            "preprocessor": None,
            "directory": str(tmp_path / "fit"),
        }

    monkeypatch.setattr(jobs, "chunk_fit", diverged)
    jobs.run_arm(args, "full", 1)
    with open(tmp_path / "seeds" / "1" / "full" / "result.json") as file:
        result = json.load(file)
    assert result["diverged_at_chunk"] == 1
    assert result["trainable_params"] == 8  # the Dense layer's 3 * 2 + 2
    assert len(result["chunks"]) == 2
    assert result["chunks"][0]["epochs_run"] == 2
    assert all(
        math.isnan(v)
        for chunk in result["chunks"]
        for v in chunk["forgetting_row"].values()
    )
    assert math.isnan(result["test_perplexity"])

    finished = {
        **{k: 1.0 for k in ("test_perplexity", "test_bleu", "test_chrf")},
        "heldout_initial_bleu": 6.0,
        "learning_rate": 0.1,
        "trainable_params": 8,
        "sentences": {"Hi.": "Hallo."},
        "chunks": [
            {
                "epochs_run": 2,
                "train_seconds": 2.0,
                "forgetting_row": {**PRETRAIN["forgetting_row"], "initial": i},
            }
            for i in (80.0, 70.0)
        ],
    }
    arm = report.aggregate("full", [finished, result], PRETRAIN, {}, [])
    assert arm["val_perplexity"]["n"] == 1
    assert arm["val_perplexity"]["diverged"] == 1
    assert arm["forgetting_matrix"][1]["initial"] == 70.0  # the finite seed
    assert report.fmt(arm["test_perplexity"]) == "1.00 (1 diverged)"


def test_pre_training_that_diverges_says_what_to_do(tmp_path, monkeypatch):
    args = types.SimpleNamespace(
        output_dir=str(tmp_path),
        seed=1,
        embedding_dim=4,
        units=4,
        dropout=0.0,
        label_smoothing=0.0,
        pretrain_learning_rate=10.0,
        pretrain_epochs=3,
        patience=1,
    )
    split = types.SimpleNamespace(initial=[], validation=[])
    preprocessor = types.SimpleNamespace(
        source_vocabulary_size=8, target_vocabulary_size=8
    )
    monkeypatch.setattr(jobs, "setup", lambda args, seed: (split, preprocessor))
    monkeypatch.setattr(jobs, "batches", lambda *args: None)
    monkeypatch.setattr(
        jobs, "fit_chunk", lambda *args, **kwargs: {"best_val_perplexity": None}
    )
    with pytest.raises(RuntimeError, match="--pretrain-learning-rate 10"):
        jobs.pretrain(args)
    assert not (tmp_path / "pretrain.json").exists()  # so it runs again


def test_each_distinct_invocation_is_recorded(tmp_path, monkeypatch):
    """environment.json keeps what the run started under, and adds what a
    resumed part ran under only where that differs."""
    args = types.SimpleNamespace(output_dir=str(tmp_path))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    jobs.environment(args)
    jobs.environment(args)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_fast_math=false")
    jobs.environment(args)
    with open(tmp_path / "environment.json") as file:
        recorded = json.load(file)
    assert len(recorded) == 2
    assert "XLA_FLAGS" not in recorded[0]["environment"]
    assert recorded[1]["environment"]["XLA_FLAGS"].startswith("--xla")
    assert recorded[0]["backend"] == keras.backend.backend()


@pytest.mark.parametrize(
    "extensions, tried, chosen",
    [
        # 3e-2 wins at the top edge: 9e-2, then 0.27, then the cap.
        (2, [1e-2, 3e-2, 9e-2, 0.27], 0.27),
        (1, [1e-2, 3e-2, 9e-2], 9e-2),
        (0, [1e-2, 3e-2], 3e-2),
    ],
)
def test_the_grid_extends_past_a_winning_edge_as_often_as_asked(
    tmp_path, monkeypatch, extensions, tried, chosen
):
    """Validation perplexity falls with the rate: each extension tries the
    winning edge times the factor, `--grid-extensions` times at most; the
    choice records every rate tried and only the chosen trial's weights
    stay."""
    args = types.SimpleNamespace(
        output_dir=str(tmp_path),
        grids={"lora": (1e-2, 3e-2)},
        smoke=False,
        grid_extensions=extensions,
    )
    calls = []

    def fit(args, method, seed_index, chunk, rate, start=None):
        calls.append(rate)
        trial = tmp_path / "learning_rates" / method / f"{rate:.3g}"
        trial.mkdir(parents=True, exist_ok=True)
        (trial / "best.weights.h5").write_bytes(b"weights")
        return {"best": 100.0 - 100 * rate}

    monkeypatch.setattr(jobs, "chunk_fit", fit)
    jobs.select_learning_rate(args, "lora")
    assert calls == pytest.approx(tried)
    choice_path = tmp_path / "learning_rates" / "lora" / "choice.json"
    choice = json.loads(choice_path.read_text())
    assert choice["chosen"] == pytest.approx(chosen)
    assert choice["extensions"] == len(tried) - 2
    assert len(choice["validation_perplexity"]) == len(tried)
    kept = choice_path.parent.glob("*/best.weights.h5")
    assert [p.parent.name for p in kept] == [f"{chosen:.3g}"]
    jobs.select_learning_rate(args, "lora")  # chosen: nothing runs again
    assert len(calls) == len(tried)


def test_an_interior_winner_ends_the_grid(tmp_path, monkeypatch):
    args = types.SimpleNamespace(
        output_dir=str(tmp_path),
        grids={"full": (3e-4, 1e-3, 3e-3)},
        smoke=False,
        grid_extensions=2,
    )
    monkeypatch.setattr(
        jobs,
        "chunk_fit",
        lambda args, method, seed, chunk, rate, start=None: {
            "best": abs(rate - 1e-3) + 50.0
        },
    )
    jobs.select_learning_rate(args, "full")
    choice = json.loads(
        (tmp_path / "learning_rates" / "full" / "choice.json").read_text()
    )
    assert choice["chosen"] == pytest.approx(1e-3)
    assert choice["extensions"] == 0
