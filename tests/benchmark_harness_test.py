"""Tests for benchmarks/harness.py: the command line, results file,
provenance and table every benchmark script shares, and measurements in a
process of their own."""

import json
import os
import re

import harness
import keras
import pytest


def test_in_fresh_process_returns_what_the_script_reports():
    # The child imports the harness as a benchmark script does.
    script = (
        "import sys, keras\n"
        "from harness import report\n"
        "print('noise before the result')\n"
        "report({'argv': sys.argv[1:], 'backend': keras.backend.backend()})\n"
    )
    result = harness.in_fresh_process(script, "x", 3)
    assert result == {"argv": ["x", "3"], "backend": keras.backend.backend()}


def test_in_fresh_process_errors_carry_the_scripts_stderr():
    with pytest.raises(RuntimeError, match=r"exit status 1(.|\n)*boom"):
        harness.in_fresh_process("raise SystemExit('boom')")
    with pytest.raises(RuntimeError, match="reported no result"):
        harness.in_fresh_process("print('no marker')")
    with pytest.raises(RuntimeError, match="within 1 s"):
        harness.in_fresh_process("import time; time.sleep(30)", timeout=1)


def test_parser_describes_the_script_and_checks_rounds(monkeypatch):
    doc = "What it measures.\n\nHow, in detail."
    monkeypatch.setenv("IWSLT2017_DIR", "data/iwslt")
    parser = harness.parser(doc, rounds=7, data_dir=True)
    assert parser.description == doc
    args = parser.parse_args([])
    assert (args.rounds, args.data_dir) == (7, "data/iwslt")
    assert parser.parse_args(["--rounds", "3"]).rounds == 3
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--rounds", bad])
    assert not hasattr(harness.parser(doc).parse_args([]), "rounds")


def test_results_carry_provenance_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    inside = os.path.join(harness.ROOT, "benchmarks", "results", "x.png")
    written = harness.write_results(
        "example",
        {"rows": {"a": 1.5}, "plot": inside, "log": f"see {inside}"},
        directory=tmp_path,
    )
    assert written == os.path.relpath(tmp_path / "example.json", harness.ROOT)
    with open(tmp_path / "example.json") as file:
        content = json.load(file)
    assert content["rows"] == {"a": 1.5}
    assert content["plot"] == "benchmarks/results/x.png"
    assert content["log"] == "see benchmarks/results/x.png"
    found = content["provenance"]
    backend = keras.backend.backend()
    assert found["backend"] == backend
    assert found["command"] and not os.path.isabs(found["command"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT.*\+00:00", found["date"])
    assert found["commit"] is None or re.fullmatch(
        "[0-9a-f]{40}", found["commit"]
    )
    assert found["uncommitted_changes"] in (True, False, None)
    assert {"python", "keras", "numpy", "keras_rnn_lora", backend} <= set(
        found["versions"]
    )
    assert found["device"]["cpu"]
    assert found["device"]["cpu_count"] == os.cpu_count()
    assert isinstance(found["device"]["gpus"], list)
    assert (
        found["environment"]["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
    )
    assert "OMP_NUM_THREADS" not in found["environment"]
    assert harness.read_results("example", directory=tmp_path) == content
    assert harness.read_results("absent", directory=tmp_path) is None


def test_results_keep_no_absolute_path():
    root = str(harness.ROOT)
    outside = os.path.join(os.path.dirname(root), "shared", "data")
    value = {
        "root": root,
        "outside": outside,
        "in text": f"File {root}/benchmarks/x.py, line 3",
        "list": [os.path.join(root, "a"), 1.5, None],
    }
    assert harness.relative_paths(value) == {
        "root": ".",
        "outside": "../shared/data",
        "in text": "File benchmarks/x.py, line 3",
        "list": ["a", 1.5, None],
    }


def test_tables_are_markdown_with_numbers_right_aligned():
    text = harness.table(["mode", "ms"], [["full", "1.0"], ["lora", 2]])
    assert text.splitlines() == [
        "| mode | ms |",
        "|---|---:|",
        "| full | 1.0 |",
        "| lora | 2 |",
    ]
    assert harness.table(["a", "b"], [], align="ll").splitlines()[1] == (
        "|---|---|"
    )
    with pytest.raises(ValueError, match="cells a row"):
        harness.table(["a", "b"], [["only one"]])
    with pytest.raises(ValueError, match="align='lx'"):
        harness.table(["a", "b"], [], align="lx")
    summary = {"median": 0.5, "min": 0.25, "max": 1.0, "rounds": 3}
    assert harness.median_range(summary) == "0.500 (0.250-1.000)"
    assert harness.median_range(summary, ".2f") == "0.50 (0.25-1.00)"
