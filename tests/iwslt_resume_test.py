"""The main job killed, started again, or started twice: what it keeps,
what it does again, and what it refuses."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import keras
import pytest
from main_job import RUN_TIMEOUT
from main_job import SCRIPT
from main_job import environment
from main_job import kill_after_epoch
from main_job import only_relative_paths
from main_job import run
from main_job import smoke_args
from main_job import start


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="what a killed run keeps is the same files on every backend; "
    "the smoke run trains, saves and exports on each",
)
def test_killed_runs_resume_and_report_what_was_measured(tmp_path):
    # Started from a folder that is not the repository, with a relative
    # --output-dir (run) and --export-dir (export).
    out = tmp_path / "run"
    args = smoke_args(
        pathlib.Path(), "lora", "--update-epochs", "2", "--increments", "1"
    )
    # Killed during pre-training: it picks up after its finished epoch.
    killed = kill_after_epoch(
        args, out / "pretrain" / "epochs.json", cwd=tmp_path
    )
    assert "Epoch 1/2" in killed and not (out / "pretrained.keras").exists()
    # Killed during an arm's fit (a learning-rate trial on the first chunk).
    trial = out / "learning_rates" / "lora"
    process = start(args, tmp_path)
    deadline = time.monotonic() + RUN_TIMEOUT
    killed_trial = None
    while killed_trial is None and time.monotonic() < deadline:
        for epochs in trial.glob("*/epochs.json") if trial.exists() else []:
            if json.loads(epochs.read_text()).get("seconds"):
                os.killpg(process.pid, signal.SIGKILL)
                killed_trial = epochs.parent
        time.sleep(0.05)
    resumed_output = process.communicate()[0]
    assert killed_trial is not None, resumed_output[-3000:]
    assert "Epoch 2/2" in resumed_output.split("== lora")[0]  # pre-training
    resumed = run(args, cwd=tmp_path)
    assert resumed.returncode == 0, (
        resumed.stdout[-3000:] + resumed.stderr[-3000:]
    )
    results = json.loads((out / "results.json").read_text())
    for record in (
        results["pretrained"],
        json.loads((killed_trial / "fit.json").read_text()),
    ):
        # Every epoch's time, the killed process' ones included.
        assert record["resumed"] and len(record["epoch_seconds"]) == 2
        assert all(s > 0 for s in record["epoch_seconds"])
        assert record["train_seconds"] == pytest.approx(
            sum(record["epoch_seconds"])
        )
    assert results["arms"]["lora"]["train_seconds"]["mean"] > 0
    assert (out / "results.md").exists()
    assert results["export"]["path"] == os.path.join(
        "..", "export", "iwslt_en_de", "1"
    )
    only_relative_paths(results, tmp_path)
    # A finished run started again reuses everything, the export too.
    again = run(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "== " not in again.stdout.split("# IWSLT")[0]
    assert "Reusing the export" in again.stdout
    assert os.listdir(tmp_path / "export" / "iwslt_en_de") == ["1"]
    # What a setting outside the run key changes is done again: the export
    # to a new --export-dir, the timing with other --timing-rounds.
    # Killed, too, after pre-training saved its model but before its
    # record (written last, the mark that it is done): pre-training is
    # measured again without a step of training, to the same record.
    record = json.loads((out / "pretrain.json").read_text())
    (out / "pretrain.json").unlink()
    changed = run(
        [*args, "--export-dir", "export2", "--timing-rounds", "3"],
        cwd=tmp_path,
    )
    assert changed.returncode == 0, changed.stderr[-3000:]
    before_report = changed.stdout.split("# IWSLT")[0]
    assert "== Pre-training" in before_report
    assert "Epoch" not in before_report
    again_record = json.loads((out / "pretrain.json").read_text())
    for key in ("best_epoch", "best_val_perplexity", "epochs_run", "stopped"):
        assert again_record[key] == record[key], key
    assert again_record["test_perplexity"] == pytest.approx(
        record["test_perplexity"], rel=1e-5
    )
    assert "Reusing the export" not in changed.stdout
    assert os.listdir(tmp_path / "export2" / "iwslt_en_de") == ["1"]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["timing_rounds"] == 3
    assert results["timing"]["rounds"] == 3
    assert results["arms"]["lora"]["step_seconds"]["n"] == 3
    assert results["export"]["path"] == os.path.join(
        "..", "export2", "iwslt_en_de", "1"
    )


def test_a_backup_cut_off_mid_write_leaves_the_previous_one(tmp_path):
    # Keras' own BackupAndRestore writes in place: a kill mid-write left a
    # truncated checkpoint that the resumed run failed to load.
    import numpy as np
    from iwslt.arms import atomic_backup

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((4, 2)), np.ones((4, 1))
    backup = tmp_path / "latest.weights.h5"

    def fit(epochs):
        callback = atomic_backup(str(tmp_path))
        model.fit(x, y, epochs=epochs, callbacks=[callback], verbose=0)

    fit(1)
    before = backup.read_bytes()

    def cut_off(path, *args, **kwargs):
        with open(path, "wb") as file:
            file.write(before[:96])  # the start of an HDF5 file
        raise RuntimeError("killed mid-write")

    model.save_weights = cut_off
    with pytest.raises(RuntimeError, match="killed mid-write"):
        fit(2)
    del model.save_weights
    assert backup.read_bytes() == before
    fit(2)  # resumes from the intact checkpoint
    assert json.loads((tmp_path / "training_metadata.json").read_text()) == {
        "epoch": 2,
        "batch": 0,
    }


def _children(pid):
    """The live processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def _is_job(pid):
    """A process multiprocessing spawned to run a job (not its resource
    tracker, which ends with its parent by design)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            command = file.read().decode(errors="replace")
    except OSError:
        return False
    return "spawn_main" in command and _alive(pid)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_job_ends_with_its_killed_parent(tmp_path):
    # Only the main process is killed (not its process group): its running
    # job must not go on writing into the run folder a resumed run uses.
    # Its output goes to a file: a closed pipe would end the job anyway.
    log = open(tmp_path / "log.txt", "w")
    process = subprocess.Popen(
        [sys.executable, SCRIPT]
        + smoke_args(
            tmp_path, "lora", "--pretrain-epochs", "100", "--patience", "100"
        ),
        env=environment(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    children = []
    while not children and time.monotonic() < deadline:
        assert process.poll() is None, (tmp_path / "log.txt").read_text()
        children = [c for c in _children(process.pid) if _is_job(c)]
        time.sleep(0.2)
    assert children, "the main job started no job"
    time.sleep(3)  # the job is under way
    process.kill()
    process.wait()
    log.close()
    deadline = time.monotonic() + 5  # it checks on its parent twice a second
    while any(map(_alive, children)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [c for c in children if _alive(c)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "a job outlived the killed main process"


def test_two_runs_never_share_an_output_folder(tmp_path):
    from iwslt import processes

    out = tmp_path / "run"
    out.mkdir()
    with processes.run_lock(str(out)):
        second = run(smoke_args(tmp_path, "lora"), timeout=300)
    assert second.returncode != 0
    assert "is in use by another run" in second.stderr
    assert not (out / "pretrain").exists()
