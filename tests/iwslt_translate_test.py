"""End-to-end tests of the main job, examples/iwslt_translate.py (--smoke)."""

import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import keras
import pytest
from conftest import iwslt_dir

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
SCRIPT = os.path.join(EXAMPLES, "iwslt_translate.py")
ARM_FIELDS = {
    "about",
    "learning_rate",
    "trainable_params",
    "step_time_ratio",
    "step_seconds",
    "train_seconds",
    "resumed",
    "peak_rss_mb",
    "device_peak_mb",
    "val_perplexity",
    "test_perplexity",
    "test_bleu",
    "test_chrf",
    "heldout_initial_perplexity",
    "forgetting_perplexity",
    "forgetting_bleu",
    "forgetting_matrix",
    "sentences",
    "seeds",
}


def environment():
    """A new user's environment: this process' Keras set TensorFlow's log
    level on import, a shell would not have it."""
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


# A smoke run is about two minutes on an idle 2-core CPU; on JAX every job
# (a fresh process) compiles again, and a loaded machine is several times
# slower. The limit only catches a hung run.
RUN_TIMEOUT = 1800


def run(args, timeout=RUN_TIMEOUT, cwd=None, script=SCRIPT, env=None):
    return subprocess.run(
        [sys.executable, script, *args],
        env={**environment(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def smoke_args(root, arms, *more):
    return [
        "--smoke",
        "--data-dir",
        os.path.abspath(iwslt_dir()),
        "--output-dir",
        str(root / "run"),
        "--export-dir",
        str(root / "export"),
        "--arms",
        arms,
        *more,
    ]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run shared by the tests below, started as the README says
    (`IWSLT2017_DIR=... python examples/iwslt_translate.py`) from a folder
    of its own, so that the default --output-dir and --export-dir, both
    relative, land there. Explicit arguments (--batch-size,
    --heldout-pairs) beat --smoke's."""
    root = tmp_path_factory.mktemp("smoke")
    (root / "examples").symlink_to(os.path.realpath(EXAMPLES))
    arms = "full,lora,lora_kernel,lora_bf16,frozen"
    more = ["--batch-size", "16", "--heldout-pairs", "30"]
    result = run(
        ["--smoke", "--arms", arms, *more],
        cwd=root,
        script=os.path.join("examples", "iwslt_translate.py"),
        env={"IWSLT2017_DIR": os.path.abspath(iwslt_dir())},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = root / "runs" / "iwslt_translate"
    results = json.loads((out / "results.json").read_text())
    return (out, root / "saved_models"), result, results


def only_relative_paths(results, *roots):
    """results.json names no path of the machine it ran on."""
    text = json.dumps(results)
    repository = os.path.realpath(os.path.join(EXAMPLES, ".."))
    for root in (*roots, repository, os.path.abspath(iwslt_dir())):
        assert str(root) not in text, root
    settings = results["settings"]
    for key in ("output_dir", "export_dir", "data_dir"):
        assert not os.path.isabs(settings[key]), (key, settings[key])
    assert not os.path.isabs(results["export"]["path"])


def check_report(folders, result, results, arms, seeds):
    out, export_root = folders
    assert results["backend"] == keras.backend.backend()
    assert set(results["arms"]) == set(arms)
    for arm, fields in results["arms"].items():
        assert ARM_FIELDS <= set(fields), arm
        assert fields["test_perplexity"]["mean"] > 1
        assert fields["test_perplexity"]["n"] == seeds
        assert len(fields["forgetting_matrix"]) == 2  # two increments
        assert set(fields["forgetting_matrix"][0]) == {
            "initial",
            "chunk_1",
            "chunk_2",
            "validation",
        }
    arms = results["arms"]
    assert arms["frozen"]["trainable_params"] == 0
    assert (
        0 < arms["lora"]["trainable_params"] < arms["full"]["trainable_params"]
    )
    for method in ("full", "lora"):
        choice = results["learning_rates"][method]
        assert choice["chosen"] == arms[method]["learning_rate"]
        assert len(choice["validation_perplexity"]) >= 2
    assert set(results["reductions"]) == {
        "time_reduction",
        "memory_reduction",
        "trainable_reduction",
        "test_perplexity_change",
    }
    for arm in set(arms) - {"frozen"}:
        assert arms[arm]["step_time_ratio"]["rounds"] == 2
        assert arms[arm]["peak_rss_mb"] > 0
    assert results["provenance"]["backend"] == keras.backend.backend()
    assert "tok:13a" in results["provenance"]["sacrebleu"]["bleu"]
    assert isinstance(results["provenance"]["environment"], dict)
    report = (out / "results.md").read_text()
    assert "| lora |" in report and "83.7%" in report
    assert "why they differ" not in report and "\nRun: " in report
    assert "Forgetting matrices" in report and "*Climate change" in report
    assert report.strip() in result.stdout
    for plot in ("curves.png", "forgetting.png"):
        assert (out / plot).stat().st_size > 10_000
    assert os.listdir(export_root / "iwslt_en_de") == ["1"]
    exported = out / results["export"]["path"]
    assert exported.resolve() == (export_root / "iwslt_en_de" / "1").resolve()
    only_relative_paths(results, out.parent.parent, export_root)


def test_smoke_run_reports_every_field_for_every_arm(smoke_run):
    folders, result, results = smoke_run
    assert results["settings"]["batch_size"] == 16
    assert results["data"]["heldout"]["initial"] == 30
    check_report(
        folders,
        result,
        results,
        ("full", "lora", "lora_kernel", "lora_bf16", "frozen"),
        1,
    )
    # Relative to the output folder; --data-dir came from IWSLT2017_DIR.
    recorded = results["settings"]
    assert recorded["output_dir"] == "."
    assert recorded["export_dir"] == os.path.join("..", "..", "saved_models")
    assert recorded["data_dir"].endswith(os.path.basename(iwslt_dir()))


SERVE_EACH_ADAPTER = """
import json, sys
sys.modules["keras_rnn_lora"] = None  # importing it would fail here
import tensorflow as tf
import tensorflow_text  # registers the SentencePiece ops
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
texts, adapters = json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {}
for name in adapters:  # each adapter alone, then all of them in one batch
    got = serve(text=tf.constant(texts), adapter=tf.constant([name] * 2))
    out[name] = [t.decode() for t in got["translation"].numpy()]
mixed = serve(
    text=tf.constant(texts * len(adapters)),
    adapter=tf.constant([a for a in adapters for _ in texts]),
)
out["mixed"] = [t.decode() for t in mixed["translation"].numpy()]
print("RESULT" + json.dumps(out))
"""


def test_the_export_serves_every_lora_arm_after_every_chunk(smoke_run):
    """One SavedModel holds the pre-trained model and every LoRA arm after
    every chunk. A merging arm's stacked adapter computes what its merged
    model computed, and the export, loaded in a process that imports only
    tensorflow and tensorflow_text, translates as the Keras model does with
    each adapter, alone and in one mixed batch."""
    import types

    import numpy as np
    from iwslt import increments
    from iwslt.arms import build_arm

    import keras_rnn_lora
    from keras_rnn_lora.translation import evaluation
    from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor

    (out, export_root), _, results = smoke_run
    arms = ["lora", "lora_kernel", "lora_bf16"]
    names = [f"{arm}_after_{k}" for arm in arms for k in (1, 2)]
    record = results["export"]
    assert record["adapters"] == ["base", *names]
    assert record["default_adapter"] == f"{record['arm']}_after_2"
    # The default is an arm whose served model is the one it evaluated.
    assert record["arm"] in ("lora", "lora_kernel")
    report = (out / "results.md").read_text()
    assert f"Export: {record['path']} " in report
    assert ", ".join(record["adapters"]) in report
    args = types.SimpleNamespace(
        output_dir=str(out), rank=results["settings"]["rank"], increments=2
    )
    served = increments.increments_model(args, arms)
    rng = np.random.default_rng(0)
    tokens = [rng.integers(3, 400, (4, 9)), rng.integers(3, 400, (4, 6))]
    pretrained = str(out / "pretrained.keras")
    logits = {
        name: keras.ops.convert_to_numpy(
            keras_rnn_lora.call_with_adapters(served, tokens, [name] * 4)
        )
        for name in ["base", *names]
    }
    for arm in ("lora", "lora_kernel"):
        for k in (1, 2):
            merged = build_arm(args, arm, pretrained)
            merged.load_weights(
                str(out / "seeds" / "0" / arm / f"after_chunk_{k}.weights.h5")
            )
            expected = keras.ops.convert_to_numpy(merged(tokens))
            got = logits[f"{arm}_after_{k}"]
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
            assert np.abs(got - logits["base"]).max() > 1e-3
    assert np.abs(logits["lora_after_2"] - logits["lora_after_1"]).max() > 1e-3

    preprocessor = TranslationPreprocessor.load(str(out / "preprocessor"))
    texts = ["We have to do something.", "Thank you very much."]
    expected = {
        name: evaluation.translate(served, preprocessor, texts, adapters=name)
        for name in ["base", *names]
    }
    exported = out / record["path"]
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SERVE_EACH_ADAPTER,
            str(exported),
            json.dumps(texts),
            json.dumps(["base", *names]),
        ],
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.split("RESULT", 1)[1])
    mixed = got.pop("mixed")
    assert got == expected
    assert mixed == [t for name in ["base", *names] for t in expected[name]]


@pytest.mark.large
def test_every_arm_two_seeds_and_the_ablation(tmp_path):
    """The whole protocol at smoke size: about 10 minutes on 2 CPU cores."""
    arms = ("full", "lora", "lora_kernel", "lora_bf16", "frozen")
    result = run(
        smoke_args(tmp_path, ",".join(arms), "--seeds", "2", "--ablation"),
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    check_report(
        (tmp_path / "run", tmp_path / "export"), result, results, arms, 2
    )
    assert "±" in (tmp_path / "run" / "results.md").read_text()
    assert set(results["ablation"]) == {
        "recurrent",  # at --rank 2, which the rank points do not cover
        "rank 4",
        "rank 8",
        "rank 16",
        "rank 32",
        "input+recurrent",
        "+dense",
        "+embedding",
    }
    assert (tmp_path / "run" / "ablation.png").stat().st_size > 10_000


def test_console_shows_progress_not_noise(smoke_run):
    _, result, _ = smoke_run
    console = result.stdout + result.stderr
    assert "== Pre-training" in console and "learning rate" in console
    for noise in (
        "cuInit",
        "absl::InitializeLog",
        "oneDNN",
        "ran out of data",
        "`shuffle=True` was passed",
        "Skipping variable loading for optimizer",
    ):
        assert noise not in console, noise


def test_the_variants_check_learns_the_first_chunk_of_a_finished_run(
    smoke_run, tmp_path
):
    """benchmarks/variants_real_data.py from the smoke run's folder, with
    the run's own arguments: each variant fits the first chunk, full and
    lora come from the run's learning-rate trials, and a second call reuses
    every fit."""
    (out, _), _, results = smoke_run
    root = out.parent.parent
    script = os.path.join(EXAMPLES, "..", "benchmarks", "variants_real_data.py")
    own = ["--rates", "0.01", "--results-dir", str(tmp_path)]
    same_run = ["--smoke", "--batch-size", "16", "--heldout-pairs", "30"]
    env = {"IWSLT2017_DIR": os.path.abspath(iwslt_dir())}
    first = run([*own, *same_run], cwd=root, script=script, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    written = json.loads((tmp_path / "variants_real_data.json").read_text())
    summary = written["variants"]
    variants = ("dora", "pissa", "olora", "lora_plus")
    assert set(summary) == {"full", "lora", *variants}
    for name in variants:  # --smoke: one epoch a fit
        assert summary[name]["learning_rate"] == 0.01
        assert len(summary[name]["val_perplexity_curve"]) == 1
        assert (out / "variants" / name / "0.01" / "fit.json").exists()
    for method in ("full", "lora"):
        chosen = results["learning_rates"][method]["chosen"]
        assert summary[method]["learning_rate"] == chosen
    base = written["pretrained_val_perplexity"]
    gain = base - summary["full"]["best_val_perplexity"]
    assert summary["dora"]["share_of_full_gain"] == pytest.approx(
        (base - summary["dora"]["best_val_perplexity"]) / gain
    )
    assert "| dora | 0.01 |" in first.stdout
    again = run([*own, *same_run], cwd=root, script=script, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "== dora" not in again.stdout  # nothing trained again
    other = run([*own, "--smoke"], cwd=root, script=script, env=env)
    assert other.returncode == 2
    assert "holds a run with other settings, data or code" in other.stderr


def start(args, cwd=None):
    """The main job in its own process group, so a kill reaches its jobs."""
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args],
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=cwd,
    )


def kill_after_epoch(args, epochs_file, timeout=RUN_TIMEOUT, cwd=None):
    """Starts the main job and SIGKILLs it (and its jobs) as soon as
    `epochs_file` records a finished epoch."""
    process = start(args, cwd)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if epochs_file.exists() and json.loads(epochs_file.read_text()).get(
                "seconds"
            ):
                os.killpg(process.pid, signal.SIGKILL)
                break
            if process.poll() is not None:
                pytest.fail(
                    f"finished before the kill:\n{process.stdout.read()}"
                )
            time.sleep(0.05)
        else:
            pytest.fail("no epoch finished in time")
    finally:
        output = process.communicate()[0]
    assert process.returncode == -signal.SIGKILL
    return output


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
    changed = run(
        [*args, "--export-dir", "export2", "--timing-rounds", "3"],
        cwd=tmp_path,
    )
    assert changed.returncode == 0, changed.stderr[-3000:]
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


def load_main():
    spec = importlib.util.spec_from_file_location("iwslt_main", SCRIPT)
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    return main


def test_run_key_follows_the_data_content(tmp_path):
    """Changed data under the same path (same size, same mtime) is a
    different run."""
    from translation.iwslt2017_test import tiny_release

    load_main()
    from iwslt import settings
    from iwslt.data import data_fingerprint

    folder = tiny_release(tmp_path)
    _, args = settings.parse(["--smoke", "--data-dir", str(tmp_path)])
    before = settings.run_key(args, data_fingerprint(args))
    path = folder / "IWSLT17.TED.tst2012.en-de.de.xml"
    stat = path.stat()
    path.write_text(path.read_text().replace("Ja.", "Ne."))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert settings.run_key(args, data_fingerprint(args)) != before


@pytest.mark.parametrize(
    "args,message",
    [
        (["--pretrain-fraction", "1.5"], "--pretrain-fraction must lie"),
        (["--pretrain-fraction", "0"], "--pretrain-fraction must lie"),
        (["--arms", "full,bogus"], "--arms: unknown arm ['bogus']"),
        (["--data-dir", "/nonexistent/iwslt"], "does not exist"),
        (["--pretrain-epochs", "-1"], "--pretrain-epochs must be at least 1"),
        (["--update-epochs", "0"], "--update-epochs must be at least 1"),
        (["--rank", "64", "--units", "32"], "--rank must lie in [1, --units"),
        (["--max-length", "1"], "--max-length must be at least 2"),
        (["--pretrain-learning-rate", "nan"], "must be finite"),
        (["--pretrain-learning-rate", "-0.1"], "must be finite"),
        (["--vocab-size", "3"], "--vocab-size must be at least 8"),
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--increments", "0"], "--increments must be at least 1"),
        (["--dropout", "1.0"], "--dropout must lie in [0, 1)"),
    ],
)
def test_bad_arguments_give_one_clear_line(args, message, tmp_path):
    base = ["--smoke", "--output-dir", str(tmp_path / "out")]
    if "--data-dir" not in args:
        base += ["--data-dir", str(tmp_path)]
    result = run(
        [*base, "--export-dir", str(tmp_path / "export"), *args], timeout=120
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    # Refused before any work: nothing trained, nothing exported.
    assert not (tmp_path / "export").exists()
    assert not (tmp_path / "out").exists()


def test_a_refused_run_leaves_its_output_folder_free(tmp_path):
    out = tmp_path / "out"
    base = [
        "--smoke",
        "--data-dir",
        iwslt_dir(),
        "--output-dir",
        str(out),
        "--export-dir",
        str(tmp_path / "export"),
    ]
    # --smoke: 200 new pairs, chunks of 32 (a batch) + 10 held out.
    refused = run([*base, "--increments", "1000"], timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    assert "--increments 4 or fewer (now 1000)" in refused.stderr
    assert not out.exists()
    # The next run into the folder is judged on its own settings.
    again = run([*base, "--increments", "999"], timeout=300)
    assert "holds a run with other settings" not in again.stderr
    assert "--increments 4 or fewer (now 999)" in again.stderr


@pytest.mark.parametrize(
    "setting,value,advice",
    [
        ("--heldout-pairs", "250", "a smaller --heldout-pairs (now 250)"),
        ("--chunk-heldout-pairs", "150", "--increments 1 or fewer (now 2)"),
    ],
)
def test_held_out_pairs_never_wrap_around(setting, value, advice):
    # --smoke: 200 initial pairs, two chunks of 100. Holding out more than
    # a part has left 50 of it to train on: the cut counted from the end.
    load_main()
    from iwslt import settings
    from iwslt.data import DataRefused
    from iwslt.data import Split

    _, args = settings.parse(
        ["--smoke", "--data-dir", os.path.abspath(iwslt_dir()), setting, value]
    )
    with pytest.raises(DataRefused, match=re.escape(advice)):
        Split(args)


def broken_data(kind, root):
    """A data folder (or archive) that cannot be read, and the file its
    error must name."""
    from translation.iwslt2017_test import pack
    from translation.iwslt2017_test import tiny_release

    if kind == "empty folder":
        (root / "data").mkdir()
        return root / "data", "data holds neither"
    folder = tiny_release(root / "data")
    if kind == "missing file":
        os.remove(folder / "IWSLT17.TED.tst2014.en-de.en.xml")
        return root / "data", "tst2014.en-de.en.xml"
    if kind == "truncated file":
        path = folder / "IWSLT17.TED.dev2010.en-de.de.xml"
        path.write_bytes(path.read_bytes()[:150])
        return root / "data", "dev2010.en-de.de.xml"
    archive = pack(folder, root / "en-de.tgz")
    archive.write_bytes(archive.read_bytes()[:200])
    return archive, "en-de.tgz: truncated"


@pytest.mark.parametrize(
    "kind", ["empty folder", "missing file", "truncated file", "archive"]
)
def test_unreadable_data_gives_one_clear_line(tmp_path, kind, monkeypatch):
    monkeypatch.setenv("KERAS_RNN_LORA_CACHE", str(tmp_path / "cache"))
    data, names = broken_data(kind, tmp_path)
    result = run(
        [
            "--smoke",
            "--data-dir",
            str(data),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"iwslt_translate.py: error: --data-dir {data}")
    assert names in error
    assert not (tmp_path / "out").exists()
