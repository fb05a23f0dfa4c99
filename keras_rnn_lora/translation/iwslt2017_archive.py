"""Unpacking the IWSLT 2017 release archive (.tgz or .zip) safely: once
per archive, atomically, with truncated or corrupt archives named."""

import gzip
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib

from keras_rnn_lora.translation.iwslt2017 import IWSLTDataError
from keras_rnn_lora.translation.iwslt2017 import source_fingerprint


def extract_archive(archive, cache_dir):
    """Unpacks `archive` once under `cache_dir`, keyed by its fingerprint.

    Each call unpacks into a staging folder of its own and renames it into
    place in one step, so concurrent unpackers (processes or threads) never
    share a half-written folder: the first rename wins and the others use
    its result."""
    extracted = os.path.join(cache_dir, "extracted")
    target = os.path.join(extracted, source_fingerprint(archive))
    folder = os.path.join(target, "en-de")
    if os.path.isdir(folder):
        return folder
    os.makedirs(extracted, exist_ok=True)
    staging = tempfile.mkdtemp(
        prefix=f".{os.path.basename(target)}-{os.getpid()}-", dir=extracted
    )
    try:
        _unpack(archive, os.path.join(staging, "archive"))
        found = [
            root
            for root, dirs, _ in os.walk(os.path.join(staging, "archive"))
            if "en-de" in dirs
        ]
        if not found:
            raise IWSLTDataError(f"{archive}: holds no `en-de/` folder")
        os.rename(
            os.path.join(found[0], "en-de"), os.path.join(staging, "en-de")
        )
        shutil.rmtree(os.path.join(staging, "archive"))
        try:
            os.rename(staging, target)
        except OSError:
            if not os.path.isdir(folder):  # not a concurrent winner's
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _unpack(archive, destination):
    """Extracts `archive` (.tgz or .zip) into `destination`; a truncated or
    corrupt archive raises `IWSLTDataError` naming it."""
    with open(archive, "rb") as file:
        magic = file.read(4)
    try:
        # By their first bytes: a truncated archive still starts like one.
        if magic.startswith(b"PK"):
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(destination)
        elif magic.startswith(b"\x1f\x8b") or tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tarred:
                tarred.extractall(destination, filter="data")
        else:
            raise IWSLTDataError(
                f"{archive}: neither a .tgz nor a .zip archive"
            )
    except (
        EOFError,
        tarfile.TarError,
        zipfile.BadZipFile,
        zlib.error,
        gzip.BadGzipFile,
    ) as error:
        raise IWSLTDataError(
            f"{archive}: truncated or corrupt archive ({error}); download "
            "it again"
        ) from None
