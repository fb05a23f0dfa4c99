"""Tests for benchmarks/variants.py: its command line, the summaries and
tables it computes from measured times, and the two models it times (at a
tiny size, untrained; nothing here times code)."""

import harness
import keras
import numpy as np
import pytest
import variants

TINY = {"units": 8, "features": 4, "batch": 3, "T": 5}


def test_command_line_defaults_and_checks():
    args = variants.parse_args([])
    assert (args.rounds, args.big_rounds, args.init_rounds) == (
        variants.ROUNDS,
        variants.BIG_ROUNDS,
        variants.INIT_ROUNDS,
    )
    assert args.init_units == 2048
    skip = variants.parse_args(["--big-rounds", "0", "--init-rounds", "0"])
    assert (skip.big_rounds, skip.init_rounds) == (0, 0)
    for bad in (["--big-rounds", "-1"], ["--init-rounds", "-2"]):
        with pytest.raises(SystemExit):
            variants.parse_args(bad)


def test_goal_check_and_differences():
    ratio = {"median": 1.05, "min": 0.9, "max": 1.2, "rounds": 3}
    assert variants.goal_check(ratio) == {
        "goal": 1.10,
        "median_met": True,
        "max_met": False,
    }
    assert not variants.goal_check(ratio, goal=1.0)["median_met"]
    times = {"a": [3.0, 5.0, 4.0], "b": [1.0, 1.5, 2.0]}
    assert variants.difference_summary(times, "a", "b") == {
        "median": 2.0,
        "min": 2.0,
        "max": 3.5,
        "rounds": 3,
    }


def test_tables_show_the_measured_figures():
    ratio = {"median": 1.2, "min": 1.1, "max": 1.3, "rounds": 2}
    steps = {
        "default": {
            "size": TINY,
            "rounds": 2,
            "step_ms_median": {"lora": 10.0, "dora": 12.0},
            "dora_over_lora": ratio,
            "goal_check": variants.goal_check(ratio),
            "load_average": {"before": [1.5, 2.0, 2.5], "after": None},
        }
    }
    text = harness.table(variants.STEP_HEADER, variants.step_rows(steps))
    assert text.splitlines()[-1] == (
        "| default (GRU 8, batch 3 x 5) | 2 | 10.0 | 12.0 | "
        "1.200 (1.100-1.300) | no | no | 1.5/2.0/2.5 |"
    )
    one = {"median": 2.0, "min": 2.0, "max": 2.0, "rounds": 1}
    init = {
        "seconds": dict.fromkeys(variants.INIT_METHODS, one),
        "ratio_to_default": {"pissa": one, "olora": one},
        "extra_seconds": {"pissa": one, "olora": one},
    }
    rows = variants.init_rows(init)
    assert rows[0] == ["default", "2.0 (2.0-2.0)", "1", "0"]
    assert rows[1] == ["pissa", "2.0 (2.0-2.0)", "2.00 (2.00-2.00)"] + [
        "2.0 (2.0-2.0)"
    ]
    harness.table(variants.INIT_HEADER, rows)


def test_step_models_share_the_base_and_differ_in_dora():
    models = variants.step_models(TINY, rank=2)
    cells = {name: model.layers[1].cell for name, model in models.items()}
    for name in ("kernel", "recurrent_kernel", "bias"):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(getattr(cells["lora"], name)),
            keras.ops.convert_to_numpy(getattr(cells["dora"], name)),
        )
    assert not cells["lora"].use_dora and cells["dora"].use_dora
    counts = {
        name: sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        for name, model in models.items()
    }
    gates_units = 3 * TINY["units"]
    assert counts["lora"] == 2 * (TINY["units"] + gates_units)
    assert counts["dora"] == counts["lora"] + gates_units  # the magnitude


def test_threads_are_torchs_alone():
    if keras.backend.backend() == "torch":
        assert variants.parse_args(["--threads", "2"]).threads == 2
    else:
        with pytest.raises(SystemExit):
            variants.parse_args(["--threads", "2"])
    assert variants.parse_args([]).threads is None
    with pytest.raises(SystemExit):
        variants.parse_args(["--threads", "0"])


def test_tag_names_the_results_file():
    assert variants.parse_args([]).tag is None
    assert variants.parse_args(["--tag", "xla_seq2"]).tag == "xla_seq2"
    for bad in ("Seq", "a-b", "", "../x"):
        with pytest.raises(SystemExit):
            variants.parse_args(["--tag", bad])


def test_main_writes_its_results_under_the_backend_and_tag(monkeypatch):
    written = []
    monkeypatch.setattr(
        variants, "SIZES", {"default": TINY, "hidden2048": TINY}
    )
    monkeypatch.setattr(
        harness, "write_results", lambda name, results: written.append(name)
    )
    backend = keras.backend.backend()
    argv = ["variants.py", "--rounds", "1", "--big-rounds", "1"]
    for tag, expected in (
        (None, f"variants_{backend}"),
        ("t2", f"variants_{backend}_t2"),
    ):
        written.clear()
        tagged = [] if tag is None else ["--tag", tag]
        monkeypatch.setattr("sys.argv", [*argv, "--init-rounds", "0", *tagged])
        variants.main()
        assert written == [expected]
