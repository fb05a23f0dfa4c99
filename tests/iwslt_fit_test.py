"""How the main job's fits end (examples/iwslt/arms.py): the learning rate
halved on a plateau, early stopping, the record of what ended the fit, and
a schedule that resumes where a killed fit stopped."""

import types

import keras
import numpy as np
import pytest
from iwslt import arms


def frozen_model():
    """A model already at its optimum (zero weights, zero targets, so zero
    gradients): every epoch after the first is a plateau."""
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(1, kernel_initializer="zeros")]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="mse",
        metrics=[keras.metrics.MeanSquaredError(name="perplexity")],
    )
    return model


class OneBatch(keras.utils.PyDataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        return np.ones((8, 3), "float32"), np.zeros((8, 1), "float32")


def fit(tmp_path, epochs, patience, factor=0.5):
    args = types.SimpleNamespace(plateau_factor=factor)
    return arms.fit_chunk(
        args,
        frozen_model(),
        OneBatch(),
        OneBatch(),
        epochs,
        str(tmp_path),
        patience,
    )


def test_a_plateau_halves_the_rate_and_early_stopping_ends_the_fit(tmp_path):
    record = fit(tmp_path / "a", epochs=10, patience=2)
    assert record["epochs_run"] == 3 and record["best_epoch"] == 0
    assert record["stopped"] == "early stopping"
    assert record["learning_rate_curve"] == pytest.approx([1e-3, 1e-3, 5e-4])
    assert record["epoch_steps"] == [1, 1, 1]
    assert record["epoch_cap"] == 10 and record["patience"] == 2


def test_a_longer_patience_waits_longer_before_halving(tmp_path):
    """Patience 4: the rate is halved after 2 epochs without a better one,
    so a single noisy epoch does not cut it, and the fit tries the lower
    rate before early stopping ends it."""
    record = fit(tmp_path, epochs=20, patience=4)
    assert record["epochs_run"] == 5 and record["plateau_patience"] == 2
    assert record["learning_rate_curve"] == pytest.approx(
        [1e-3, 1e-3, 1e-3, 5e-4, 5e-4]
    )
    assert [arms.plateau_patience(p) for p in (1, 2, 3, 4, 5)] == [
        1,
        1,
        1,
        2,
        2,
    ]


def test_a_fit_ended_by_its_cap_says_so(tmp_path):
    assert fit(tmp_path / "a", epochs=2, patience=2)["stopped"] == "cap"
    # Early stopping on the cap's last epoch is early stopping.
    assert fit(tmp_path / "b", epochs=3, patience=2)["stopped"] == (
        "early stopping"
    )


def test_a_factor_of_one_keeps_the_rate(tmp_path):
    record = fit(tmp_path, epochs=3, patience=5, factor=1.0)
    assert record["learning_rate_curve"] == pytest.approx([1e-3] * 3)
    assert arms.plateau_schedule(str(tmp_path), 1.0) is None


def test_a_resumed_schedule_goes_on_from_the_epoch_before(tmp_path):
    """A fresh schedule (a restarted process) at epoch 2 keeps the best
    value and the count of epochs without improvement of epochs 0-1: a
    worse epoch 2 reduces the rate again, as it would have without the
    restart."""
    model = frozen_model()
    model.optimizer.build(model.trainable_variables)

    def schedule():
        callback = arms.plateau_schedule(str(tmp_path), 0.5)
        callback.set_model(model)
        callback.on_train_begin()
        return callback

    first = schedule()
    for epoch, value in enumerate((10.0, 12.0)):
        first.on_epoch_begin(epoch)
        first.on_epoch_end(epoch, {"val_perplexity": value})
    assert float(model.optimizer.learning_rate) == pytest.approx(5e-4)
    resumed = schedule()
    resumed.on_epoch_begin(2)
    assert resumed.best == 10.0
    resumed.on_epoch_end(2, {"val_perplexity": 11.0})
    assert float(model.optimizer.learning_rate) == pytest.approx(2.5e-4)


def test_the_control_arm_learns_as_many_initial_pairs_as_each_chunk_holds():
    from iwslt import jobs

    args = types.SimpleNamespace(seed=3)
    split = types.SimpleNamespace(
        initial=[f"old {i}" for i in range(10)],
        chunks=[
            [f"new {i}" for i in range(4)],
            [f"newer {i}" for i in range(6)],
        ],
    )
    assert jobs.training_pairs(args, split, "full", 2) == split.chunks[1]
    first = jobs.training_pairs(args, split, "control", 1)
    second = jobs.training_pairs(args, split, "control", 2)
    assert len(first) == 4 and len(second) == 6
    # Every initial pair once before any is repeated, in a seeded order.
    assert sorted(first + second) == sorted(split.initial)
    assert first == jobs.training_pairs(args, split, "control", 1)
    assert first != jobs.training_pairs(
        types.SimpleNamespace(seed=4), split, "control", 1
    )
    split.chunks.append([f"newest {i}" for i in range(3)])
    third = jobs.training_pairs(args, split, "control", 3)
    assert third == first[:3]  # the order starts over


def test_a_finished_fit_started_again_trains_no_more(tmp_path):
    """Started again after it ended (killed before its caller saved what
    followed), a fit is the one that ended: before, it went on from its
    backup for more epochs."""
    first = fit(tmp_path, epochs=10, patience=2)
    again = fit(tmp_path, epochs=10, patience=2)
    assert again["epochs_run"] == first["epochs_run"] == 3
    assert again["stopped"] == "early stopping"
    assert again["val_perplexity_curve"] == first["val_perplexity_curve"]


class Diverged(OneBatch):
    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return x, np.full_like(y, np.nan)


def test_a_fit_that_never_has_a_finite_perplexity_stops_early(tmp_path):
    record = arms.fit_chunk(
        types.SimpleNamespace(plateau_factor=0.5),
        frozen_model(),
        OneBatch(),
        Diverged(),
        10,
        str(tmp_path),
        2,
    )
    assert record["epochs_run"] == 2 and record["stopped"] == "early stopping"
    assert (
        record["best_epoch"] is None and record["best_val_perplexity"] is None
    )


def test_a_fit_killed_after_its_log_but_before_its_best_epoch_trains_on(
    tmp_path,
):
    """Killed between the epoch log's write and the best epoch's, a fit
    judges that epoch again when resumed: before, the log alone said the
    fit had ended, and it ended with no best epoch."""
    import json

    (tmp_path / "epochs.json").write_text(
        json.dumps({"seconds": {"0": 1.0}, "val": {"0": 0.0}, "processes": 1})
    )
    record = fit(tmp_path, epochs=10, patience=1)
    assert record["best_epoch"] == 0 and record["best_val_perplexity"] == 0.0
    assert record["epochs_run"] == 2 and record["stopped"] == "early stopping"
