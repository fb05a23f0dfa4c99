"""Measuring what LoRA costs, honestly on a noisy machine.

- `PeakMemory`: the peak resident memory of this process above a baseline,
  sampled in a thread; `device_peak_mb`: the accelerator's own peak, where
  the backend reports one.
- `interleaved_times`: several steps timed round after round (A B C, A B
  C, ...), so that every one sees the same machine load; compare them with
  `ratio_summary` (median and range of per-round ratios), never across
  separate runs.

Used by `benchmarks/` and the main job alike.
"""

import os
import statistics
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
