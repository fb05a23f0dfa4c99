"""The main job's processes: each unit of work in a fresh one, and one run
per output folder.

`run_in_child` starts a job with `multiprocessing` (spawn): its memory is
its own (peak memory is measured per arm), and the parent, which only
orchestrates and reports, never imports a backend.
"""

import contextlib
import multiprocessing
import os
import threading
import time


def run_in_child(job, *arguments):
    """Runs `job(*arguments)` in a fresh spawned process."""
    process = multiprocessing.get_context("spawn").Process(
        target=_child, args=(job, arguments, os.getpid())
    )
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(
            f"The job {job.__name__}{tuple(map(str, arguments[1:]))} failed "
            f"(exit code {process.exitcode}); its error is above. Start the "
            "run again to resume from the last finished step."
        )


def _child(job, arguments, parent):
    from iwslt.multiworker import joined
    from iwslt.quiet import import_backend

    _exit_with(parent)
    import_backend()
    with joined(job, arguments):  # a training job of a --multi-worker run
        job(*arguments)


def _exit_with(parent):
    """Ends this process when `parent` dies. A parent killed outright
    (SIGKILL, or `kill` of the main process alone) cannot stop its child;
    left running, the child would go on writing into the run folder that
    the resumed run works in."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


@contextlib.contextmanager
def run_lock(output_dir):
    """Holds `--output-dir` for this run: a second run on the same folder
    (which would overwrite the first one's work) stops with a clear error.
    The lock is the kernel's (`flock`), so a killed run never leaves it
    held."""
    import fcntl

    file = open(os.path.join(output_dir, "run.lock"), "w")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise SystemExit(
            f"--output-dir {output_dir} is in use by another run of this "
            "job; wait for it to end or choose another folder"
        ) from None
    try:
        yield
    finally:
        file.close()
