"""End-to-end tests of the main job, examples/iwslt_translate.py (--smoke)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import keras
import pytest
from conftest import iwslt_dir

SCRIPT = os.path.join(
    os.path.dirname(__file__), "..", "examples", "iwslt_translate.py"
)
ARM_FIELDS = {
    "arm",
    "backend",
    "trainable_params",
    "total_params",
    "epoch_seconds",
    "train_seconds",
    "val_perplexity_curve",
    "peak_rss_mb",
    "device_peak_mb",
    "resumed",
    "val_perplexity",
    "test_perplexity",
    "heldout_initial_perplexity",
    "test_bleu",
    "test_chrf",
    "example",
}


def run(args, env=None, timeout=600):
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend(), **(env or {}))
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def smoke_args(tmp_path, arms):
    return [
        "--smoke",
        "--data-dir",
        iwslt_dir(),
        "--output-dir",
        str(tmp_path / "run"),
        "--export-dir",
        str(tmp_path / "export"),
        "--arms",
        arms,
    ]


def test_smoke_run_reports_every_field_for_every_arm(tmp_path):
    out = tmp_path / "run"
    # Explicit arguments win over what --smoke would set.
    result = run(
        [
            *smoke_args(tmp_path, "full,lora,lora_kernel,lora_bf16,frozen"),
            "--batch-size",
            "16",
            "--heldout-pairs",
            "30",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["batch_size"] == 16
    assert results["heldout_pairs"] == 30
    assert set(results["arms"]) == {
        "full",
        "lora",
        "lora_kernel",
        "lora_bf16",
        "frozen",
    }
    for arm, fields in results["arms"].items():
        assert ARM_FIELDS <= set(fields), arm
        assert fields["backend"] == keras.backend.backend()
        assert fields["test_perplexity"] > 1
    arms = results["arms"]
    assert arms["frozen"]["trainable_params"] == 0
    assert (
        0 < arms["lora"]["trainable_params"] < arms["full"]["trainable_params"]
    )
    assert len(arms["lora"]["epoch_seconds"]) == 2
    # bfloat16 base, float32 adapters: quality close to the float32 arm.
    bf16, f32 = arms["lora_bf16"], arms["lora"]
    assert bf16["trainable_params"] == f32["trainable_params"]
    assert abs(bf16["test_perplexity"] / f32["test_perplexity"] - 1) < 0.02
    assert set(results["reductions"]) == {
        "time_reduction",
        "memory_reduction",
        "trainable_reduction",
        "test_perplexity_change",
    }
    report = (out / "results.md").read_text()
    assert "| lora |" in report and "83.7%" in report
    assert report.strip() in result.stdout
    assert (out / "curves.png").stat().st_size > 10_000


def start(args):
    """The main job in its own process group, so a kill reaches its arms."""
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_after_epoch(args, progress_file, timeout=600):
    """Starts the main job and SIGKILLs it (and its arm processes) as soon
    as `progress_file` records a finished epoch."""
    process = start(args)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if progress_file.exists() and json.loads(
                progress_file.read_text()
            ).get("seconds"):
                os.killpg(process.pid, signal.SIGKILL)
                break
            if process.poll() is not None:
                pytest.fail(
                    f"finished before the kill:\n{process.stdout.read()}"
                )
            time.sleep(0.1)
        else:
            pytest.fail("no epoch finished in time")
    finally:
        output = process.communicate()[0]
    assert process.returncode == -signal.SIGKILL
    return output


def test_killed_run_resumes_without_losing_work(tmp_path):
    out = tmp_path / "run"
    args = smoke_args(tmp_path, "lora")
    killed = kill_after_epoch(args, out / "progress" / "pretrain.json")
    assert "Epoch 1/2" in killed and not (out / "pretrained.keras").exists()
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Pre-training picked up after its finished first epoch.
    assert "Epoch 1/2" not in resumed.stdout.split("== Arm")[0]
    assert "Epoch 2/2" in resumed.stdout
    again = run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Reusing the pre-trained model" in again.stdout
    assert "Reusing the finished arm lora" in again.stdout
    # Nothing changed, so nothing new is exported.
    assert "Reusing the export" in again.stdout
    assert os.listdir(tmp_path / "export" / "iwslt_en_de") == ["1"]


def test_arm_killed_mid_training_reports_what_was_measured(tmp_path):
    out = tmp_path / "run"
    args = smoke_args(tmp_path, "full,lora")
    kill_after_epoch(args, out / "progress" / "lora.json")
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    lora = results["arms"]["lora"]
    assert lora["resumed"] and not results["arms"]["full"]["resumed"]
    # Both epochs' times, the killed process' one included.
    assert len(lora["epoch_seconds"]) == 2
    assert all(s > 0 for s in lora["epoch_seconds"])
    assert lora["train_seconds"] == pytest.approx(sum(lora["epoch_seconds"]))
    assert lora["peak_rss_mb"] > 10
    reductions = results["reductions"]
    assert reductions["time_reduction"] < 0.9
    assert reductions["memory_reduction"] < 0.9
    assert "(resumed)" in (out / "results.md").read_text()


def test_run_key_follows_the_data_content(tmp_path):
    """Changed data under the same path (same size, same mtime) is a
    different run."""
    from iwslt2017_test import tiny_release

    spec = importlib.util.spec_from_file_location("iwslt_main", SCRIPT)
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    folder = tiny_release(tmp_path)
    _, args = main.parse_args(["--smoke", "--data-dir", str(tmp_path)])
    before = main.run_key(args)
    path = folder / "IWSLT17.TED.tst2012.en-de.de.xml"
    stat = path.stat()
    path.write_text(path.read_text().replace("Ja.", "Ne."))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert main.run_key(args) != before


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
        (["--learning-rate", "nan"], "--learning-rate must be finite"),
        (["--learning-rate", "inf"], "--learning-rate must be finite"),
        (["--learning-rate", "-0.1"], "--learning-rate must be finite"),
        (["--vocab-size", "3"], "--vocab-size must be at least 8"),
    ],
)
def test_bad_arguments_give_one_clear_line(args, message, tmp_path):
    base = ["--smoke", "--output-dir", str(tmp_path)]
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
    assert not (tmp_path / "pretrained.keras").exists()
