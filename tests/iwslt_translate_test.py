"""End-to-end tests of the main job, examples/iwslt_translate.py (--smoke)."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import keras
import pytest
from conftest import iwslt_dir
from main_job import EXAMPLES
from main_job import SCRIPT
from main_job import only_relative_paths
from main_job import run
from main_job import smoke_args

# Every arm on TensorFlow; elsewhere `full`, `lora` and the two that
# compare against them. `lora_kernel` and `lora_bf16` differ from `lora`
# in what the library adapts and stores (tested on every backend) and in
# how the export serves them (a TensorFlow SavedModel): the smoke run's
# fits are CI's slowest part.
SMOKE_ARMS = ("full", "lora", "lora_kernel", "lora_bf16", "control", "frozen")
if keras.backend.backend() != "tensorflow":
    SMOKE_ARMS = ("full", "lora", "control", "frozen")
LORA_ARMS = [a for a in SMOKE_ARMS if a.startswith("lora")]
MERGING_ARMS = [a for a in ("lora", "lora_kernel") if a in SMOKE_ARMS]

ARM_FIELDS = {
    "about",
    "learning_rate",
    "trainable_params",
    "step_time_ratio",
    "step_seconds",
    "train_seconds",
    "resumed",
    "peak_rss_mb",
    "memory_increment_mb",
    "device_peak_mb",
    "epochs",
    "fits_at_cap",
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


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run shared by the tests below, started as the README says
    (`IWSLT2017_DIR=... python examples/iwslt_translate.py`) from a folder
    of its own, so that the default --output-dir and --export-dir, both
    relative, land there. Explicit arguments (--batch-size,
    --heldout-pairs) beat --smoke's."""
    root = tmp_path_factory.mktemp("smoke")
    (root / "examples").symlink_to(os.path.realpath(EXAMPLES))
    arms = ",".join(SMOKE_ARMS)
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
        assert arms[arm]["peak_rss_mb"]["median"] > 0
        assert arms[arm]["memory_increment_mb"]["n"] == 1  # --smoke: 1
        # Every fit ends by early stopping or its cap, and says which.
        for seed in arms[arm]["seeds"]:
            for chunk in seed["chunks"]:
                assert chunk["stopped"] in ("early stopping", "cap")
                assert len(chunk["epoch_steps"]) == chunk["epochs_run"]
                assert len(chunk["learning_rate_curve"]) == chunk["epochs_run"]
        assert [len(e) for e in arms[arm]["epochs"]] == [2] * seeds
    # The control arm learns initial pairs with full fine-tuning's rate; the
    # shares of the gain are measured above it.
    assert arms["control"]["learning_rate"] == arms["full"]["learning_rate"]
    assert arms["full"]["gain_share"] == pytest.approx(1.0)
    assert arms["control"]["gain_share"] == pytest.approx(0.0)
    quality = results["equal_quality"]
    assert quality["target"]["weakest_arm"] in (
        "lora",
        "lora_kernel",
        "lora_bf16",
        "full",
    )
    assert quality["arms"]["full"]["reached"] == seeds
    assert results["pretrained"]["stopped"] in ("early stopping", "cap")
    assert results["provenance"]["backend"] == keras.backend.backend()
    assert "tok:13a" in results["provenance"]["sacrebleu"]["bleu"]
    assert isinstance(results["provenance"]["environment"], dict)
    report = (out / "results.md").read_text()
    assert "| lora |" in report and "83.7%" in report
    assert "why they differ" not in report and "\nRun: " in report
    assert "Forgetting matrices" in report and "*Climate change" in report
    assert "| control | " in report and "s to common target" in report
    assert "± 0.00" not in report
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
    check_report(folders, result, results, SMOKE_ARMS, 1)
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
    arms = LORA_ARMS
    names = [f"{arm}_after_{k}" for arm in arms for k in (1, 2)]
    record = results["export"]
    assert record["adapters"] == ["base", *names]
    assert record["default_adapter"] == f"{record['arm']}_after_2"
    # The default is an arm whose served model is the one it evaluated.
    assert record["arm"] in MERGING_ARMS
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
    for arm in MERGING_ARMS:
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


def arm_copy(smoke_run, tmp_path, arm):
    """The pre-trained model and `arm`'s seed-0 files of the smoke run,
    copied under `tmp_path`, and the arguments that read them."""
    import types

    (out, _), _, results = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(out / "seeds" / "0" / arm, copy / "seeds" / "0" / arm)
    shutil.copy(out / "pretrained.keras", copy / "pretrained.keras")
    args = types.SimpleNamespace(
        output_dir=str(copy), rank=results["settings"]["rank"], increments=2
    )
    return args, copy / "seeds" / "0" / arm


@pytest.mark.skipif(
    "lora_bf16" not in SMOKE_ARMS,
    reason="the export's check of an unmerged arm's files is the same on "
    "every backend; the arm runs in the TensorFlow smoke run",
)
def test_the_export_refuses_an_unmerged_arms_chunks_swapped(
    smoke_run, tmp_path
):
    """`lora_bf16` learns every chunk over the same base, so its adapter
    files all load; each must be the adapter its state after that chunk
    holds."""
    from iwslt import increments

    args, arm_dir = arm_copy(smoke_run, tmp_path, "lora_bf16")
    one = arm_dir / "chunk_1.lora.weights.h5"
    two = arm_dir / "chunk_2.lora.weights.h5"
    one.rename(arm_dir / "swap")
    two.rename(one)
    (arm_dir / "swap").rename(two)
    with pytest.raises(
        ValueError,
        match="chunk_1.lora.weights.h5 and .*after_chunk_1.weights.h5 disagree",
    ):
        increments.increments_model(args, ["lora_bf16"])


def test_the_export_names_a_missing_file_of_an_arm(smoke_run, tmp_path):
    from iwslt import increments

    args, arm_dir = arm_copy(smoke_run, tmp_path, "lora")
    (arm_dir / "after_chunk_2.weights.h5").unlink()
    with pytest.raises(
        FileNotFoundError,
        match="after_chunk_2.weights.h5 is missing: the files of arm .lora.",
    ):
        increments.increments_model(args, ["lora"])
    (arm_dir.parents[2] / "pretrained.keras").unlink()
    with pytest.raises(FileNotFoundError, match="pretrained.keras is missing"):
        increments.increments_model(args, ["lora"])


def test_a_started_again_run_reuses_only_a_complete_export(
    smoke_run, monkeypatch, capsys
):
    """Nothing changed and the SavedModel is there: reused. Its folder
    without `saved_model.pb` or its variables' index: exported again."""
    import types

    from iwslt import increments

    (out, export_root), _, results = smoke_run
    record = results["export"]
    args = types.SimpleNamespace(
        output_dir=str(out), export_dir=str(export_root), increments=2
    )
    arms = LORA_ARMS

    def exported_again(*_):
        raise RuntimeError("exported again")

    monkeypatch.setattr(increments, "increments_model", exported_again)
    increments.export(args, arms, record["arm"])
    assert "Reusing the export" in capsys.readouterr().out
    for part in ("saved_model.pb", "variables/variables.index"):
        written = out / record["path"] / part
        written.rename(written.with_suffix(".aside"))
        try:
            with pytest.raises(RuntimeError, match="exported again"):
                increments.export(args, arms, record["arm"])
        finally:
            written.with_suffix(".aside").rename(written)


@pytest.mark.large
def test_every_arm_two_seeds_and_the_ablation(tmp_path):
    """The whole protocol at smoke size, the ablation's three stages too:
    about an hour on 2 CPU cores."""
    arms = ("full", "lora", "lora_kernel", "lora_bf16", "control", "frozen")
    result = run(
        smoke_args(tmp_path, ",".join(arms), "--seeds", "2", "--ablation"),
        timeout=3 * 3600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    check_report((out, tmp_path / "export"), result, results, arms, 2)
    assert "±" in (out / "results.md").read_text()
    points = results["ablation"]
    first = {
        "rec_r2",  # --smoke's --rank 2: the lora arm itself
        "rec_r4",
        "rec_r8",
        "rec_r16",
        "rec_r32",  # --units 32: rank 64 does not fit
        "in+rec_r2",
        "in+rec+dense_r2",
        "all_r2",
    }
    assert first <= set(points) and len(points) == len(first) + 3 + 4
    assert points["rec_r2"]["arm"] == "lora"
    assert points["in+rec_r2"]["arm"] == "lora_kernel"
    for name, point in points.items():
        assert point["test_perplexity"]["n"] == 2, name
        assert "gain_share" in point, name
        assert point["step_time_ratio"]["rounds"] == 2, name
    # The main arms' timing is its own: the ablation's did not rewrite it.
    timing = json.loads((out / "costs" / "timing.json").read_text())
    assert set(timing["seconds"]) == set(arms) - {"frozen"}
    assert (out / "ablation.png").stat().st_size > 10_000


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


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the variants' own tests run on every backend; this is the "
    "script's bookkeeping over a finished run",
)
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
    for name in variants:  # --smoke: at most 2 epochs a fit
        assert summary[name]["learning_rate"] == 0.01
        assert len(summary[name]["val_perplexity_curve"]) in (1, 2)
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
        (["--ablation-seeds", "0"], "--ablation-seeds must be at least 1"),
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
