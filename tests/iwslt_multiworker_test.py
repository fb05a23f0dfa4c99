"""The main job's `--multi-worker` flag (examples/iwslt/multiworker.py): its
parsing, its refusals, and that a run without it is untouched. Training
on two workers is tested on the library itself (distributed_test.py)."""

import contextlib
import os

import keras
import numpy as np
import pytest

import keras_rnn_lora
from keras_rnn_lora import distributed

BACKEND = keras.backend.backend()


@pytest.fixture
def no_cluster(monkeypatch):
    for name in ("TF_CONFIG", *distributed.JAX_VARIABLES):
        monkeypatch.delenv(name, raising=False)


def parse(*argv):
    from iwslt import settings

    return settings.parse(["--smoke", *argv])


def check(capsys, *argv):
    """`multiworker.check` on the parsed `argv`: the error line, or `None`
    when the run is accepted."""
    from iwslt import multiworker

    parser, args = parse(*argv)
    try:
        multiworker.check(parser, args)
    except SystemExit as exit:
        assert exit.code == 2
        return capsys.readouterr().err
    return None


def test_one_worker_is_the_default():
    assert parse()[1].multi_worker is False
    assert parse("--multi-worker")[1].multi_worker is True


def test_the_run_key_covers_the_flag_and_the_code(monkeypatch):
    """A run with the flag, or from other code, never resumes a folder
    made without it or from this code."""
    from iwslt import settings

    _, args = parse()
    _, multi = parse("--multi-worker")
    key = settings.run_key(args, "fingerprint")
    assert settings.run_key(multi, "fingerprint") != key
    assert settings.run_key(args, "fingerprint") == key  # deterministic
    monkeypatch.setattr(settings, "code_fingerprint", lambda: "other code")
    assert settings.run_key(args, "fingerprint") != key


def test_the_code_fingerprint_follows_the_source(tmp_path, monkeypatch):
    import importlib.util
    import shutil

    from iwslt import settings

    fingerprint = settings.code_fingerprint()
    assert len(fingerprint) == 12 and fingerprint == settings.code_fingerprint()
    # A copy of the library with one changed line has another fingerprint.
    package = importlib.util.find_spec("keras_rnn_lora")
    copy = tmp_path / "keras_rnn_lora"
    shutil.copytree(list(package.submodule_search_locations)[0], copy)
    assert settings.code_fingerprint(str(copy)) == fingerprint
    with open(copy / "lora.py", "a") as file:
        file.write("\n# changed\n")
    assert settings.code_fingerprint(str(copy)) != fingerprint


def test_the_code_fingerprint_leaves_out_the_report(tmp_path):
    """The report is made afresh from the records on every run: a change to
    it reuses them; a change to a module that trains does not."""
    import shutil

    from iwslt import settings

    examples = tmp_path / "examples"
    shutil.copytree(
        os.path.dirname(os.path.dirname(settings.__file__)),
        examples,
        ignore=shutil.ignore_patterns("results", "__pycache__"),
    )
    fingerprint = settings.code_fingerprint(examples_dir=str(examples))
    assert fingerprint == settings.code_fingerprint()
    for module in settings.PRESENTATION:
        with open(examples / "iwslt" / module, "a") as file:
            file.write("\n# changed\n")
    assert settings.code_fingerprint(examples_dir=str(examples)) == fingerprint
    with open(examples / "iwslt" / "arms.py", "a") as file:
        file.write("\n# changed\n")
    assert settings.code_fingerprint(examples_dir=str(examples)) != fingerprint


@pytest.mark.skipif(BACKEND != "torch", reason="the refusal is torch's")
def test_torch_refuses_the_flag_in_one_line(capsys, no_cluster):
    error = check(capsys, "--multi-worker")
    assert "--multi-worker: Keras has no multi-process distribution for " in (
        error
    )
    assert "torch backend" in error
    assert "Traceback" not in error


@pytest.mark.skipif(BACKEND == "torch", reason="torch refuses the flag first")
def test_the_flag_needs_a_cluster_in_the_environment(capsys, no_cluster):
    error = check(capsys, "--multi-worker")
    assert "--multi-worker needs the cluster in the environment" in error


@pytest.mark.skipif(BACKEND == "torch", reason="torch refuses the flag first")
def test_a_malformed_cluster_is_refused_in_one_line(capsys, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{")
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "127.0.0.1:1")
    error = check(capsys, "--multi-worker")
    assert error.strip().endswith(
        "TF_CONFIG is not valid JSON (Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1))."
        if BACKEND == "tensorflow"
        else "missing: ['KERAS_DISTRIBUTION_NUM_PROCESSES', "
        "'KERAS_DISTRIBUTION_PROCESS_ID']."
    )


@pytest.mark.skipif(BACKEND != "jax", reason="Keras cuts JAX batches evenly")
def test_jax_batches_must_split_evenly(capsys, monkeypatch):
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "127.0.0.1:1")
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "3")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "0")
    error = check(capsys, "--multi-worker", "--batch-size", "32")
    assert "--batch-size 32 must be a multiple of the 3 JAX processes" in error
    assert check(capsys, "--multi-worker", "--batch-size", "33") is None


def test_without_the_flag_nothing_joins_a_cluster(capsys, monkeypatch):
    """No check, no strategy, batches as they were: the one-worker path."""
    from iwslt import increments
    from iwslt import jobs
    from iwslt import multiworker

    def refuse(*args, **kwargs):
        raise AssertionError("joined a cluster")

    monkeypatch.setattr(keras_rnn_lora, "multi_worker_strategy", refuse)
    monkeypatch.setenv("TF_CONFIG", "{")  # never read
    assert check(capsys) is None
    _, args = parse()
    for job in (jobs.pretrain, jobs.run_arm, increments.export):
        with multiworker.joined(job, (args, "lora", 0)):
            pass
    dataset = object()
    assert multiworker.full_batches(args, dataset) is dataset


def test_only_training_jobs_join_the_cluster(monkeypatch):
    from iwslt import costs
    from iwslt import increments
    from iwslt import jobs
    from iwslt import multiworker

    joined = []

    class Strategy:
        def scope(self):
            return contextlib.nullcontext()

    monkeypatch.setattr(keras_rnn_lora, "multi_worker_strategy", Strategy)
    monkeypatch.setattr(multiworker, "_agree", lambda s, d: joined.append(d))
    _, args = parse("--multi-worker")
    for job in (increments.export, costs.memory_probe, costs.step_timing):
        with multiworker.joined(job, (args, "lora")):
            pass
    assert joined == []
    for job in (jobs.pretrain, jobs.select_learning_rate, jobs.run_arm):
        with multiworker.joined(job, (args, "lora")):
            pass
    assert len(joined) == 3


@pytest.mark.skipif(BACKEND != "jax", reason="only JAX batches are padded")
def test_jax_cluster_batches_are_padded_with_rows_that_count_nowhere():
    import tensorflow as tf
    from iwslt import multiworker

    _, args = parse("--multi-worker", "--batch-size", "4")
    source = np.array([[5, 6, 2], [7, 2, 0], [8, 9, 2]], "int32")
    targets = np.array([[3, 4, 2], [5, 2, 0], [6, 7, 2]], "int32")
    dataset = tf.data.Dataset.from_tensors(((source, source), targets))
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    try:
        padded = multiworker.full_batches(args, dataset)
    finally:
        keras.distribution.set_distribution(None)
    (x, decoder_inputs), y = next(iter(padded.as_numpy_iterator()))
    np.testing.assert_array_equal(x, np.concatenate([source, source[:1]]))
    np.testing.assert_array_equal(decoder_inputs, x)
    np.testing.assert_array_equal(y[:3], targets)
    np.testing.assert_array_equal(y[3], 0)  # padding: masked everywhere
