"""Tests for benchmarks/variants_real_data.py: its command line, the run it
refuses, the grid extension and the summary it computes from fit records.
The check itself runs on a smoke run in tests/iwslt_translate_test.py."""

import json
import os

import pytest
import variants_real_data as check


def record(curve):
    best = min(range(len(curve)), key=curve.__getitem__)
    return {
        "val_perplexity_curve": curve,
        "best_val_perplexity": curve[best],
        "best_epoch": best,
        "epochs_run": len(curve),
        "epoch_seconds": [1.0] * len(curve),
    }


def test_own_options_and_the_main_jobs_pass_through(tmp_path):
    _, own, run = check.parse_args(
        [
            "--variants",
            "dora, pissa",
            "--rates",
            "0.01,3e-3",
            "--smoke",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert own.variants == ("dora", "pissa")
    assert own.rates == (0.01, 0.003)
    assert run.smoke and run.output_dir == str(tmp_path)
    _, own, run = check.parse_args([])
    assert own.variants == check.VARIANTS and own.rates is None
    assert run.output_dir == "runs/iwslt_translate"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "lora,dorra"], "--variants: unknown or repeated"),
        (["--variants", ","], "--variants: unknown or repeated"),
        (["--variants", "dora,dora"], "--variants: unknown or repeated"),
        (["--rates", "0.01,x"], "--rates must be positive numbers"),
        (["--rates", "-1"], "--rates must be positive numbers"),
        (["--rates", "inf"], "--rates must be positive numbers"),
        (["--rates", "nan"], "--rates must be positive numbers"),
        (["--rates", "0.01,0.0100000001"], "names one rate twice"),
        (["--epochs", "2"], "unknown argument --epochs"),
        (["--smo"], "unknown argument --smo"),  # not --smoke
        (["--ra", "0.01"], "unknown argument --ra"),  # not --rank
        (["--output=x"], "unknown argument --output"),
        (["--units", "0"], "--units must be at least 1"),  # the main job's
    ],
)
def test_bad_arguments_give_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        check.parse_args(argv)
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_rates_name_their_folders_to_six_digits():
    _, own, _ = check.parse_args(["--rates", "0.0123456789,3e-4"])
    assert own.rates == (0.0123457, 0.0003)
    assert check.rate_name(0.009000000000000001) == "0.009"


def test_a_damaged_record_is_named(tmp_path):
    path = tmp_path / "fit.json"
    assert check.read_record(str(path)) is None
    path.write_text("{not json")
    with pytest.raises(SystemExit, match=f"{path} is not a readable fit"):
        check.read_record(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="is not a fit record"):
        check.read_record(str(path))
    unfinished = {"val_perplexity_curve": [], "best_val_perplexity": None}
    with pytest.raises(SystemExit, match="is not a finished fit"):
        check.checked_fit(unfinished, str(tmp_path))


def test_trials_are_the_folders_named_by_a_rate(tmp_path):
    _, _, run = check.parse_args(["--output-dir", str(tmp_path)])
    root = tmp_path / "learning_rates" / "lora"
    for name in ("0.003", "0.01", "backup", "notes"):
        (root / name).mkdir(parents=True)
    (root / "0.003" / "fit.json").write_text(json.dumps(record([70.0, 69.0])))
    (root / "backup" / "fit.json").write_text("{}")
    assert list(check.recorded_trials(run, "lora")) == [0.003]


def test_a_results_dir_that_cannot_be_one_is_refused(tmp_path, capsys):
    parser, _, _ = check.parse_args([])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        check.check_results_dir(parser, str(tmp_path / "file"))
    assert "--results-dir" in capsys.readouterr().err
    check.check_results_dir(parser, str(tmp_path / "new" / "results"))
    assert (tmp_path / "new" / "results").is_dir()


def test_a_folder_without_a_run_is_refused(tmp_path, capsys):
    parser, _, run = check.parse_args(["--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        check.check_run(parser, run)
    err = capsys.readouterr().err
    assert f"--output-dir {tmp_path} holds no run of the main job" in err


def test_the_grid_extends_past_a_winning_edge_only():
    grid = [1e-3, 3e-3]
    low = {1e-3: record([5.0]), 3e-3: record([6.0])}
    assert check.next_grid(low, grid, 0) == pytest.approx(
        [1e-3, 3e-3, 1e-3 / 3]
    )
    high = {1e-3: record([6.0]), 3e-3: record([5.0])}
    assert check.next_grid(high, grid, 1) == [1e-3, 3e-3, 0.009]
    assert check.next_grid(high, grid, 2) is None  # extensions used up
    assert check.next_grid(high, grid, None) is None  # --rates: none
    inner = {**high, 1e-2: record([7.0])}
    assert check.next_grid(inner, [*grid, 1e-2], 0) is None
    assert check.next_grid({1e-3: record([5.0])}, [1e-3], 0) is None


def test_summary_shares_and_first_epochs_from_the_records():
    trials = {
        "full": {1e-3: record([60.0, 55.0]), 3e-3: record([62.0, 61.0])},
        "lora": {3e-3: record([71.0, 69.0])},
        "dora": {1e-3: record([68.0, 67.0])},
        "pissa": {1e-3: record([72.0, 70.0])},
    }
    summary = check.summarize(trials, base_perplexity=73.0)
    assert summary["full"]["learning_rate"] == 1e-3
    assert summary["full"]["share_of_full_gain"] == pytest.approx(1.0)
    assert summary["lora"]["share_of_full_gain"] == pytest.approx(4 / 18)
    assert summary["dora"]["share_of_full_gain"] == pytest.approx(6 / 18)
    assert summary["dora"]["best_epoch"] == 2
    assert summary["full"]["first_epoch_at_lora_best"] == 1
    assert summary["dora"]["first_epoch_at_lora_best"] == 1
    assert summary["lora"]["first_epoch_at_lora_best"] == 2
    assert summary["pissa"]["first_epoch_at_lora_best"] is None
    assert summary["full"]["rates_tried"] == {"0.001": 55.0, "0.003": 61.0}
    assert summary["dora"]["resumed"] is False
    rows = {row[0]: row for row in check.rows(summary)}
    assert rows["dora"] == (
        "dora",
        "0.001",
        "68.00, 67.00",
        "67.00 (2)",
        "33.3%",
        "1",
    )
    assert rows["pissa"][-1] == "not reached"


def test_no_gain_of_full_fine_tuning_gives_no_share():
    trials = {"full": {1e-3: record([80.0])}, "lora": {1e-3: record([79.0])}}
    summary = check.summarize(trials, base_perplexity=73.0)
    assert summary["lora"]["share_of_full_gain"] is None
    assert {row[0]: row[4] for row in check.rows(summary)}["lora"] == "-"


def test_fit_folders_are_per_variant_and_rate(tmp_path):
    _, _, run = check.parse_args(["--output-dir", str(tmp_path)])
    assert check.fit_dir(run, "dora", 0.003) == os.path.join(
        str(tmp_path), "variants", "dora", "0.003"
    )


def test_a_run_made_from_other_data_names_the_data(tmp_path, capsys):
    (tmp_path / "run_key.txt").write_text("0123456789ab")
    parser, _, run = check.parse_args(["--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        check.check_run(parser, run)
    err = capsys.readouterr().err
    assert "holds a run with other settings, data or code" in err
    data = run.data_dir or "none given, the TFDS download"
    assert f"(data: {data})" in err and "IWSLT2017_DIR" in err


def test_the_main_jobs_option_names_are_its_whole_command_line():
    from iwslt import settings

    names = settings.option_names()
    for name in ("--smoke", "--output-dir", "--data-dir", "--update-epochs"):
        assert name in names
    assert len(names) == len(set(names))
    assert not any(name.startswith("--rates") for name in names)


@pytest.mark.parametrize(
    "change",
    [
        {"val_perplexity_curve": ["a"]},
        {"best_val_perplexity": True},
        {"best_epoch": 99},
        {"best_val_perplexity": 1.0},  # not the curve's value at best_epoch
        {"epoch_seconds": None},
    ],
)
def test_a_fit_record_with_damaged_fields_is_named(change, tmp_path):
    damaged = {**record([70.0, 69.0]), **change}
    with pytest.raises(SystemExit, match="is not a finished fit"):
        check.checked_fit(damaged, str(tmp_path))


def test_recorded_fits_are_read_before_anything_trains(tmp_path):
    _, _, run = check.parse_args(["--output-dir", str(tmp_path)])
    check.check_recorded_fits(run, ("dora",))  # none yet
    folder = tmp_path / "variants" / "pissa" / "0.01"
    folder.mkdir(parents=True)
    (folder / "fit.json").write_text("garbage")
    check.check_recorded_fits(run, ("dora",))  # not asked for
    with pytest.raises(SystemExit, match=f"{folder / 'fit.json'} is not"):
        check.check_recorded_fits(run, ("dora", "pissa"))


def test_a_keras_file_is_a_zip_with_a_config(tmp_path):
    import zipfile

    path = tmp_path / "model.keras"
    path.write_text("x")
    assert not check.is_keras_file(str(path))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a", "b")
    assert not check.is_keras_file(str(path))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{}")
    assert check.is_keras_file(str(path))


def test_negative_numbers_pass_through_to_the_main_job():
    assert check.parse_args(["--seed", "-1"])[2].seed == -1
