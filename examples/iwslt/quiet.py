"""A quiet console: TensorFlow's C++ start-up lines stay out of it.

TensorFlow prints lines from C++ while it is imported, before its own log
level applies (oneDNN notes, "Could not find cuda drivers", and on a CPU
machine a CUDA init error): this imports the Keras backend with the
process' stderr pointed at /dev/null, and sets `TF_CPP_MIN_LOG_LEVEL=3`
(unless it is set already) for what TensorFlow's C++ would log later.
Python warnings and errors are untouched: an import that fails still
raises.
"""

import contextlib
import os
import sys


@contextlib.contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_backend():
    """Imports Keras (and so its backend, and TensorFlow) quietly."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _stderr_silenced():
        import keras  # noqa: F401

        with contextlib.suppress(ImportError):
            import tensorflow  # noqa: F401  (the data pipeline's)
            import tensorflow_text  # noqa: F401
