"""End-to-end tests of the main job, examples/iwslt_translate.py (--smoke)."""

import json
import os
import subprocess
import sys

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
    result = run(smoke_args(tmp_path, "full,lora,lora_kernel,lora_bf16,frozen"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
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


def test_killed_run_resumes_without_losing_work(tmp_path):
    out = tmp_path / "run"
    args = smoke_args(tmp_path, "lora")
    marker = tmp_path / "killed"
    killed = run(args, env={"KERAS_RNN_LORA_KILL_AFTER_EPOCH": f"{marker}:1"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert marker.exists() and not (out / "pretrained.keras").exists()
    assert "Epoch 1/2" in killed.stdout
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Pre-training picked up after its finished first epoch.
    assert "Epoch 1/2" not in resumed.stdout.split("== Arm")[0]
    assert "Epoch 2/2" in resumed.stdout
    again = run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Reusing the pre-trained model" in again.stdout
    assert "Reusing the finished arm lora" in again.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--pretrain-fraction", "1.5"], "--pretrain-fraction must lie"),
        (["--pretrain-fraction", "0"], "--pretrain-fraction must lie"),
        (["--arms", "full,bogus"], "--arms: unknown arm ['bogus']"),
        (["--data-dir", "/nonexistent/iwslt"], "does not exist"),
    ],
)
def test_bad_arguments_give_one_clear_line(args, message, tmp_path):
    base = ["--smoke", "--output-dir", str(tmp_path)]
    if "--data-dir" not in args:
        base += ["--data-dir", str(tmp_path)]
    result = run([*base, *args], timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr
