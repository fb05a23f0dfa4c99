"""Tests for keras_rnn_lora/measurement.py: what the benchmarks and the main
job's cost figures are measured with."""

import os

import keras
import numpy as np
import pytest

from keras_rnn_lora import measurement
from keras_rnn_lora.layers import accelerator_present


def test_peak_memory_sees_an_allocation_made_and_freed_inside():
    with measurement.PeakMemory(interval=0.001) as memory:
        block = np.ones(64 * 2**20 // 8)  # 64 MB, every page touched
        del block
    assert memory.peak_mb >= 48
    with measurement.PeakMemory() as idle:
        pass
    assert idle.peak_mb < 16


def test_device_peak_is_reported_exactly_where_there_is_an_accelerator():
    peak = measurement.device_peak_mb()
    if accelerator_present():
        assert peak >= 0
    else:
        assert peak is None


def test_interleaved_times_warm_up_then_rotate_the_order():
    calls = []
    steps = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = measurement.interleaved_times(steps, rounds=4, warmup=1)
    assert calls == list("abc" + "abc" + "bca" + "cab" + "abc")
    assert {name: len(t) for name, t in times.items()} == dict.fromkeys(
        "abc", 4
    )
    assert all(t >= 0 for values in times.values() for t in values)


def test_summaries_are_of_per_round_ratios():
    assert measurement.summary([3.0, 1.0, 2.0]) == {
        "median": 2.0,
        "min": 1.0,
        "max": 3.0,
        "rounds": 3,
    }
    times = {"lora": [1.0, 3.0, 2.0], "full": [2.0, 3.0, 8.0]}
    ratios = measurement.ratio_summary(times, "lora", "full")
    assert ratios == {"median": 0.5, "min": 0.25, "max": 1.0, "rounds": 3}
    with pytest.raises(ValueError):  # rounds must pair up
        measurement.ratio_summary({"a": [1.0], "b": [1.0, 2.0]}, "a", "b")


def test_versions_and_device_name_the_backend_and_its_library():
    backend = keras.backend.backend()
    found = measurement.versions(backend)
    assert found["keras"] == keras.__version__
    assert found[backend] == __import__(backend).__version__
    assert {"python", "numpy", "keras_rnn_lora"} <= set(found)
    device = measurement.device(backend)
    assert device["cpu"] and device["cpu_count"] >= 1
    assert isinstance(device["gpus"], list)
    assert ("torch_threads" in device) == (backend == "torch")


def test_speed_environment_holds_the_variables_set(monkeypatch):
    for key in measurement.SPEED_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    assert measurement.speed_environment() == {}
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("UNRELATED_SETTING", "1")
    assert measurement.speed_environment() == {"OMP_NUM_THREADS": "2"}


def test_git_state_of_this_checkout_and_of_no_checkout(tmp_path):
    here = measurement.git_state(os.path.dirname(__file__))
    if here["commit"] is not None:  # a clone; an sdist has no .git
        assert len(here["commit"]) == 40
        assert isinstance(here["uncommitted_changes"], bool)
    assert measurement.git_state(str(tmp_path)) == {
        "commit": None,
        "uncommitted_changes": None,
    }
