"""Measuring what LoRA costs, honestly on a noisy machine.

- `PeakMemory`: the peak resident memory of this process above a baseline,
  sampled in a thread; `device_peak_mb`: the accelerator's own peak, where
  the backend reports one.
- `interleaved_times`: several steps timed round after round (A B C, A B
  C, ...), so that every one sees the same machine load; compare them with
  `ratio_summary` (median and range of per-round ratios), never across
  separate runs.
- `versions`, `device` and `git_state`: what a figure was measured with,
  for the record beside it.

Used by `benchmarks/` and the main job alike.
"""

import contextlib
import os
import platform
import statistics
import subprocess
import threading
import time


def rss_bytes():
    """This process' resident memory, in bytes (Linux `/proc`)."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Samples this process' resident memory every `interval` seconds.

        with PeakMemory() as memory:
            model.fit(...)
        memory.peak_mb  # the peak above the memory at entry

    `peak_mb` can also be read while sampling (the peak so far).
    """

    def __init__(self, interval=0.01):
        self.interval = interval
        self.baseline = self.peak = None

    def __enter__(self):
        self.baseline = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def peak_mb(self):
        """The peak so far above the baseline, in MB."""
        return (max(self.peak, rss_bytes()) - self.baseline) / 2**20


def device_peak_mb():
    """This process' peak accelerator memory in MB where the backend reports
    it (a GPU); `None` on a CPU."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            if not tf.config.list_physical_devices("GPU"):
                return None
            peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
        elif backend == "torch":
            import torch

            if not torch.cuda.is_available():
                return None
            peak = torch.cuda.max_memory_allocated()
        else:
            import jax

            device = jax.devices()[0]
            if device.platform == "cpu":
                return None
            peak = device.memory_stats().get("peak_bytes_in_use", 0)
    except (RuntimeError, ValueError, AttributeError):
        return None
    return peak / 2**20


def interleaved_times(steps, rounds, warmup=2):
    """Times each of `steps` (name -> function) `rounds` times, one round
    running every step once; the order rotates from round to round so no
    step always runs first. Each step runs `warmup` times first, untimed
    (tracing, compiling, caches).

    Returns:
        `{name: [seconds per round]}`.
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summary(values):
    """Median, min, max and count of `values`."""
    values = list(values)
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": len(values),
    }


def ratio_summary(times, numerator, denominator):
    """`summary` over rounds of `times[numerator][r] /
    times[denominator][r]`."""
    return summary(
        a / b for a, b in zip(times[numerator], times[denominator], strict=True)
    )


# -- what a figure was measured with -----------------------------------------


def versions(backend_name):
    """Versions of Python, Keras, NumPy, this library and the library of
    `backend_name` (jaxlib too on JAX), as `{name: version}`."""
    import keras
    import numpy

    import keras_rnn_lora

    found = {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "numpy": numpy.__version__,
        "keras_rnn_lora": keras_rnn_lora.__version__,
    }
    modules = {
        "tensorflow": ("tensorflow",),
        "jax": ("jax", "jaxlib"),
        "torch": ("torch",),
    }.get(backend_name, ())
    for name in modules:
        with contextlib.suppress(ImportError):
            found[name] = __import__(name).__version__
    return found


def cpu_model():
    """The CPU's model name (Linux `/proc/cpuinfo`, else `platform`)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpus(backend_name):
    """The names of the GPUs `backend_name` sees (empty without one)."""
    if backend_name == "torch":
        import torch

        return [
            torch.cuda.get_device_name(i)
            for i in range(torch.cuda.device_count())
        ]
    if backend_name == "tensorflow":
        import tensorflow as tf

        return [
            tf.config.experimental.get_device_details(gpu).get(
                "device_name", gpu.name
            )
            for gpu in tf.config.list_physical_devices("GPU")
        ]
    if backend_name == "jax":
        import jax

        return [d.device_kind for d in jax.devices() if d.platform != "cpu"]
    return []


def device(backend_name):
    """The CPU, its core count, the GPUs `backend_name` sees and, on torch,
    its intra-op threads."""
    found = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpus": gpus(backend_name),
    }
    if backend_name == "torch":
        import torch

        found["torch_threads"] = torch.get_num_threads()
    return found


#: Environment variables that change how fast the backends run.
SPEED_VARIABLES = (
    "XLA_FLAGS",
    "TF_ENABLE_ONEDNN_OPTS",
    "TF_NUM_INTEROP_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_XLA_FLAGS",
    "JAX_PLATFORMS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
)


def speed_environment():
    """The `SPEED_VARIABLES` set in this process' environment, as
    `{name: value}`."""
    return {
        key: os.environ[key] for key in SPEED_VARIABLES if key in os.environ
    }


def git_state(directory, exclude=()):
    """`{"commit", "uncommitted_changes"}` of the git checkout holding
    `directory`: the commit checked out, and whether tracked files differ
    from it (paths in `exclude`, relative to the checkout, aside); both
    `None` outside a checkout or without git."""

    def git(*args):
        try:
            return subprocess.run(
                ["git", *args],
                cwd=directory,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    root = git("rev-parse", "--show-toplevel")
    if root is None:
        return {"commit": None, "uncommitted_changes": None}
    status = git(
        "-C",
        root,
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        *(f":(exclude){path}" for path in exclude),
    )
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": None if status is None else bool(status),
    }
