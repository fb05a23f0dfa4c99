"""Atomic file writes: a temporary file beside the target, fsync, rename.

A crash or an error mid-write never leaves a partial file at the target
path, and an existing file there stays intact until the new one is complete.
Files are created with the usual permissions (`0o666` less the umask), like
any other file a user saves.
"""

import contextlib
import os
import uuid


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path to write `path`'s new content to.

    On leaving the block the temporary file is flushed to disk and renamed
    onto `path`; if the block raises, it is removed and `path` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = f".tmp-{uuid.uuid4().hex[:12]}-{os.path.basename(path)}"
    temporary = os.path.join(directory, name)
    # O_EXCL: never reuse a file someone else created; mode 0o666 lets the
    # umask decide, as `open(path, "w")` would.
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    _fsync_directory(directory)


def write_bytes(path, data):
    """Writes `data` to `path` atomically."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(data)


def write_text(path, text):
    """Writes `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def save_weights(model, path):
    """`model.save_weights(path)`, atomically."""
    with atomic_path(path) as temporary:
        os.remove(temporary)  # Keras writes the file itself
        model.save_weights(temporary)


def save_model(model, path):
    """`model.save(path)` (a `.keras` file), atomically."""
    with atomic_path(path) as temporary:
        os.remove(temporary)  # Keras writes the file itself
        model.save(temporary)


def _fsync_directory(directory):
    """Makes a rename in `directory` durable (where the OS allows it)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
