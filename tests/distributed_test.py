"""Multi-worker training (keras_rnn_lora/distributed.py): two worker
processes on 127.0.0.1 train a small LoRA model together, and a worker
killed mid-run fails the other."""

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_rnn_lora
from keras_rnn_lora import distributed

BACKEND = keras.backend.backend()
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)
import distributed_worker  # noqa: E402

WORKER = os.path.join(TESTS, "distributed_worker.py")
# A hung pair is killed after this long; a healthy one ends in well under a
# minute on 2 busy CPU cores (each imports TensorFlow and compiles).
RUN_TIMEOUT = 300
# How long the others wait for a silent JAX process (TensorFlow's
# coordination service has its own, about 40 s here).
HEARTBEAT = 15
# A killed worker must fail the other within this long.
FAILURE_BOUND = 150

two_processes = pytest.mark.skipif(
    BACKEND == "torch",
    reason="Keras has no multi-process distribution for the torch backend "
    "(keras.distribution runs on JAX, tf.distribute on TensorFlow)",
)


def free_ports(count):
    """Ports free on 127.0.0.1 now (the kernel's choice for port 0)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker_environment(index, ports):
    env = dict(os.environ, KERAS_BACKEND=BACKEND, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    for name in ("TF_CONFIG", "XLA_FLAGS", *distributed.JAX_VARIABLES):
        env.pop(name, None)
    if BACKEND == "tensorflow":
        env["TF_CONFIG"] = json.dumps(
            {
                "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                "task": {"type": "worker", "index": index},
            }
        )
    else:
        env["KERAS_DISTRIBUTION_JOB_ADDRESSES"] = f"127.0.0.1:{ports[0]}"
        env["KERAS_DISTRIBUTION_NUM_PROCESSES"] = str(len(ports))
        env["KERAS_DISTRIBUTION_PROCESS_ID"] = str(index)
    return env


class Worker:
    """A worker process; its stdout lines arrive in `lines`, its stderr
    goes to a file."""

    def __init__(self, index, ports, args, folder):
        self.index = index
        self.stderr_path = folder / f"worker{index}.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, WORKER, *args],
                env=worker_environment(index, ports),
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.lines = queue.Queue()
        self.stdout = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.stdout.append(line)
            self.lines.put(line)

    def wait_for(self, prefix, deadline):
        """The first stdout line starting with `prefix`, before
        `deadline` (a `time.monotonic()` value)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(self.failure(f"no {prefix!r} line"))
            try:
                line = self.lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    raise AssertionError(
                        self.failure(f"exited before a {prefix!r} line")
                    ) from None
                continue
            if line.startswith(prefix):
                return line

    def result(self, deadline):
        line = self.wait_for("RESULT", deadline)
        return json.loads(line[len("RESULT") :])

    def stderr(self):
        with open(self.stderr_path, errors="replace") as file:
            return file.read()

    def failure(self, what):
        return (
            f"worker {self.index} {what} (exit code "
            f"{self.process.poll()}); its stderr ends:\n{self.stderr()[-4000:]}"
        )


@contextlib.contextmanager
def two_workers(folder, *args):
    """Two workers on 127.0.0.1, both killed on the way out whatever
    happened."""
    ports = free_ports(2)
    workers = []
    try:
        for index in range(2):
            workers.append(Worker(index, ports, args, folder))
        yield workers
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
        for worker in workers:
            worker.process.wait(timeout=30)


def factors(values, names):
    return {k: np.array(v) for k, v in values.items() if k in names}


@two_processes
def test_two_workers_train_like_one_process_on_the_whole_batch(tmp_path):
    steps = 3
    adapters = tmp_path / "adapters"
    args = ["--steps", str(steps), "--adapter-dir", str(adapters)]
    deadline = time.monotonic() + RUN_TIMEOUT
    with two_workers(tmp_path, *args) as (chief, other):
        results = [chief.result(deadline), other.result(deadline)]
        for worker in (chief, other):
            assert worker.process.wait(max(1, deadline - time.monotonic())) == 0
    assert [r["is_chief"] for r in results] == [True, False]
    assert [r["worker_count"] for r in results] == [2, 2]
    trainable = set(results[0]["trainable"])
    assert trainable == {
        "gru/gru_cell/lora_recurrent_kernel_a",
        "gru/gru_cell/lora_recurrent_kernel_b",
    }

    # (a) Both workers end with identical LoRA factors, which moved.
    first, second = (factors(r["after"], trainable) for r in results)
    for name in trainable:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
        start = np.array(results[0]["before"][name])
        assert not np.allclose(first[name], start), name

    # (b) The frozen weights are bit-identical to the start on both.
    for result in results:
        for name, value in result["before"].items():
            if name not in trainable:
                np.testing.assert_array_equal(
                    np.array(result["after"][name]), value, err_msg=name
                )

    # (c) One process training on the concatenated batches ends the same.
    model = distributed_worker.lora_model()
    x, y = distributed_worker.global_batches(steps)
    history = model.fit(
        x,
        y,
        batch_size=distributed_worker.BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    alone = {w.path: to_numpy(w.value) for w in model.trainable_weights}
    for name in trainable:
        np.testing.assert_allclose(
            first[name], alone[name], rtol=1e-5, atol=1e-6, err_msg=name
        )
    np.testing.assert_allclose(
        results[0]["loss"], history.history["loss"], rtol=1e-5
    )

    # (d) The chief alone wrote an adapter file; it loads into a fresh
    # model, checks included (the base it was trained on: same fingerprint).
    written = os.listdir(adapters)
    assert written == [f"adapter-{chief.process.pid}.lora.weights.h5"]
    fresh = keras_rnn_lora.load_lora_model(
        distributed_worker.base_model(), str(adapters / written[0])
    )
    loaded = {w.path: to_numpy(w.value) for w in fresh.weights}
    for name in trainable:
        np.testing.assert_array_equal(loaded[name], first[name], err_msg=name)


@two_processes
@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "chief"])
def test_a_killed_worker_fails_the_other_within_the_bound(tmp_path, victim):
    adapters = tmp_path / "adapters"
    args = ["--forever", "--adapter-dir", str(adapters)]
    args += ["--heartbeat", str(HEARTBEAT)]
    deadline = time.monotonic() + RUN_TIMEOUT
    with two_workers(tmp_path, *args) as workers:
        killed, survivor = workers[victim], workers[1 - victim]
        killed.wait_for("STEP 2", deadline)  # both are mid-run
        killed.process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            code = survivor.process.wait(timeout=FAILURE_BOUND)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                survivor.failure(
                    f"still ran {FAILURE_BOUND} s after the other was killed"
                )
            ) from None
        took = time.monotonic() - killed_at
    assert code != 0, survivor.failure("ended without an error")
    stderr = survivor.stderr()
    messages = {
        # TensorFlow's collectives, aborted by its coordination service
        # (a silent worker) or by the lost connection (the chief).
        "tensorflow": ("Collective ops is aborted",),
        # JAX's distributed runtime ends the process.
        "jax": ("another task died", "detected fatal errors"),
    }[BACKEND]
    assert any(m in stderr for m in messages), survivor.failure(
        f"failed {took:.0f} s after the kill without a clear error"
    )
    assert not adapters.exists()


# -- the cluster, read from the environment -----------------------------------


@pytest.mark.parametrize(
    "value,match",
    [
        ("{", "TF_CONFIG is not valid JSON"),
        ('{"cluster": {}}', "must hold a 'cluster'"),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", '
            '"index": 1}}',
            "is not in its cluster",
        ),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", '
            '"index": 0}}',
            "is not in its cluster",
        ),
        (
            '{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": '
            '"worker", "index": true}}',
            "is not in its cluster",
        ),
        (
            '{"cluster": {"worker": ["a:1"], "evaluator": ["e:1"]}, '
            '"task": {"type": "evaluator", "index": 0}}',
            "task type is 'evaluator'",
        ),
        (
            '{"cluster": {"worker": ["a:1"], "ps": ["p:1"]}, "task": '
            '{"type": "ps", "index": 0}}',
            "task type is 'ps'",
        ),
        (
            '{"cluster": {"worker": ["a:1", "b:abc"]}, "task": {"type": '
            '"worker", "index": 0}}',
            "holds the address 'b:abc'",
        ),
        (
            '{"cluster": {"worker": ["a"]}, "task": {"type": "worker", '
            '"index": 0}}',
            "holds the address 'a'",
        ),
        (
            '{"cluster": {"worker": ["a:99999"]}, "task": {"type": '
            '"worker", "index": 0}}',
            "port from 1 to 65535",
        ),
        (
            '{"cluster": {"worker": ["a:1"], "chief": "c:1"}, "task": '
            '{"type": "worker", "index": 0}}',
            "lists 'chief' as 'c:1'",
        ),
    ],
)
def test_a_malformed_tf_config_says_what_is_wrong(monkeypatch, value, match):
    monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(ValueError, match=match):
        distributed.tf_config()


def tf_config(cluster, kind, index):
    return json.dumps(
        {"cluster": cluster, "task": {"type": kind, "index": index}}
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TF_CONFIG is TensorFlow's")
@pytest.mark.parametrize(
    "cluster,kind,index,chief",
    [
        ({"worker": ["a:1", "b:1"]}, "worker", 0, True),
        ({"worker": ["a:1", "b:1"]}, "worker", 1, False),
        ({"chief": ["c:1"], "worker": ["a:1", "b:1"]}, "worker", 0, False),
        ({"chief": ["c:1"], "worker": ["a:1", "b:1"]}, "chief", 0, True),
    ],
)
def test_the_chief_is_tensorflows(monkeypatch, cluster, kind, index, chief):
    monkeypatch.setenv("TF_CONFIG", tf_config(cluster, kind, index))
    assert keras_rnn_lora.is_chief() is chief
    assert keras_rnn_lora.worker_count() == sum(map(len, cluster.values()))
    assert distributed.cluster_in_environment()


@pytest.mark.skipif(BACKEND != "jax", reason="Keras' JAX cluster variables")
def test_the_chief_is_jax_process_zero(monkeypatch):
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "a:1")
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "3")
    for process_id, chief in (("0", True), ("2", False)):
        monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", process_id)
        assert keras_rnn_lora.is_chief() is chief
        assert keras_rnn_lora.worker_count() == 3
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "3")
    with pytest.raises(ValueError, match="must lie in"):
        keras_rnn_lora.is_chief()
    monkeypatch.delenv("KERAS_DISTRIBUTION_NUM_PROCESSES")
    with pytest.raises(ValueError, match="missing:.*NUM_PROCESSES"):
        distributed.cluster_in_environment()


@pytest.mark.skipif(BACKEND != "jax", reason="Keras' JAX cluster variables")
@pytest.mark.parametrize(
    "address", ["127.0.0.1", "127.0.0.1:abc", ":1", "a:99999", "a:0", " "]
)
def test_a_jax_coordinator_reads_host_and_port(monkeypatch, address):
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", address)
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="KERAS_DISTRIBUTION_JOB_ADDRESSES"):
        distributed.cluster_in_environment()


def test_without_a_cluster_one_process_is_chief(monkeypatch):
    for name in ("TF_CONFIG", *distributed.JAX_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    assert keras_rnn_lora.is_chief()
    assert keras_rnn_lora.worker_count() == 1
    assert not distributed.cluster_in_environment()


@pytest.mark.skipif(BACKEND != "torch", reason="the refusal is torch's")
def test_torch_refuses_multi_worker_training():
    with pytest.raises(RuntimeError, match="not available on the torch"):
        keras_rnn_lora.multi_worker_strategy()


def test_a_bad_heartbeat_is_refused():
    with pytest.raises(ValueError, match="`heartbeat_timeout_seconds`"):
        keras_rnn_lora.multi_worker_strategy(heartbeat_timeout_seconds=0)
