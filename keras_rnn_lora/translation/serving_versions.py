"""Numbered versions of a TF Serving model directory, published safely.

TensorFlow Serving watches `export_dir/<name>/` and serves the highest
numeric sub-folder. A version appears complete or not at all: it is
written to a hidden staging folder and renamed into place. Without an
explicit version, concurrent exports each claim their own number (the
rename onto a number fails if another export got there first, and the next
number is taken). Replacing a version moves the old one aside to a hidden
folder named after its owner and puts it back if the swap fails; the next
publication in the directory recovers what a killed one left behind and
removes stale staging folders of dead processes.
"""

import contextlib
import errno
import os
import shutil
import socket
import tempfile


def versions(model_dir):
    """The published version numbers in `model_dir`, ascending."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(n) for n in os.listdir(model_dir) if is_decimal(n))


def is_decimal(name):
    """Whether `name` is a run of ASCII digits, the only names TF Serving
    reads as versions. (`str.isdigit` also accepts "²" or "٣", which
    `int()` refuses or reads as another number.)"""
    return name.isascii() and name.isdigit()


@contextlib.contextmanager
def staging_folder(model_dir):
    """A fresh hidden folder in `model_dir` to write a version into, after
    recovering what killed publications left there; removed on exit."""
    os.makedirs(model_dir, exist_ok=True)
    _recover(model_dir)
    staging = tempfile.mkdtemp(
        prefix=f"{_owner_prefix('.tmp')}-", dir=model_dir
    )
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(export, model_dir, version=None, overwrite=False):
    """Renames the finished folder `export` into `model_dir` as `version`
    (default: the next free number) and returns its path. An existing
    `version` is refused (`FileExistsError`) unless `overwrite`."""
    if version is None:
        return _publish_next(export, model_dir)
    target = os.path.join(model_dir, str(version))
    if overwrite and os.path.exists(target):
        _replace(export, target, model_dir, version)
    else:
        _claim(export, target)
    return target


def refuse_existing(target):
    """Raises `FileExistsError` if version folder `target` exists."""
    if os.path.exists(target):
        raise FileExistsError(
            f"Export version {target} already exists. Pass overwrite=True to "
            "replace it, or leave `version` unset for the next free one."
        )


def _claim(export, target):
    """Renames `export` onto `target`, which must not exist yet."""
    try:
        os.rename(export, target)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            refuse_existing(target)
        raise


def _publish_next(export, model_dir):
    """Claims the next free version number for `export`."""
    while True:
        target = os.path.join(
            model_dir, str(max(versions(model_dir), default=0) + 1)
        )
        try:
            _claim(export, target)
            return target
        except FileExistsError:
            continue  # another export took this number first


def _replace(export, target, model_dir, version):
    """Swaps `export` in for the existing `target`, recoverably: the old
    version waits in a hidden folder named after it until the new one is in
    place, and is put back if the swap fails or is interrupted."""
    old = os.path.join(model_dir, f"{_owner_prefix('.old')}-v{version}")
    os.rename(target, old)
    try:
        os.rename(export, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _owner_prefix(kind):
    """`<kind>-<host>-<pid>`: who made a hidden folder, so that only folders
    of processes that are gone are recovered or removed."""
    return f"{kind}-{socket.gethostname()}-{os.getpid()}"


def _orphaned(name, kind):
    """Whether hidden folder `name` of `kind` belongs to a dead process on
    this host."""
    parts = name.split("-")
    if len(parts) < 4 or parts[0] != kind:
        return False
    host, pid = "-".join(parts[1:-2]), parts[-2]
    if host != socket.gethostname() or not is_decimal(pid):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _recover(model_dir):
    """Undoes what killed exports left behind in `model_dir`: an old version
    moved aside by an interrupted overwrite goes back (or, if its
    replacement made it, away), staging folders are removed."""
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if _orphaned(name, ".old"):
            target = os.path.join(model_dir, name.rsplit("-v", 1)[1])
            if os.path.exists(target):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, target)
        elif _orphaned(name, ".tmp"):
            shutil.rmtree(path, ignore_errors=True)
