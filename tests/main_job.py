"""Running the main job, examples/iwslt_translate.py, as a user does: in
a process of its own, from a folder of one's choosing."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import pytest
from conftest import iwslt_dir

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
SCRIPT = os.path.join(EXAMPLES, "iwslt_translate.py")


def environment():
    """A new user's environment: this process' Keras set TensorFlow's log
    level on import, a shell would not have it."""
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


# A smoke run is about eight minutes on an idle 2-core CPU; on JAX every job
# (a fresh process) compiles again, and a loaded machine is several times
# slower. The limit only catches a hung run.
RUN_TIMEOUT = 3000


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
