"""Adapter files: the LoRA factors of a model, on their own, in HDF5.

A `.lora.weights.h5` file holds one group per LoRA cell, keyed by the cell's
path in the model ("encoder/gru_cell"), with its factors as datasets and, as
attributes, the cell class, rank, alpha, scaling rule, targets and a SHA-256
fingerprint of the frozen kernels the adapter was trained on. It is small
(the factors only) and loads into any model of the same architecture built
on the same base weights.
"""

import hashlib
import os
import tempfile

import h5py
import numpy as np
from keras import ops

from keras_rnn_lora.adapters import lora_cells

FORMAT = "keras-rnn-lora-adapter"
FORMAT_VERSION = 1
SUFFIX = ".lora.weights.h5"


def _check_path(path):
    path = os.fspath(path)
    if not path.endswith(SUFFIX):
        raise ValueError(
            f"Received an invalid value for `path`, expected a file name "
            f"ending in '{SUFFIX}'. Received: path={path!r}"
        )
    return path


def _base_kernel(cell, target):
    """The frozen kernel the adapter applies to (pre-merge when merged)."""
    if cell.lora_merged:
        if target not in cell._premerge_kernels:
            raise ValueError(
                f"Cell '{cell.name}' is merged and its pre-merge kernel is "
                "unknown, so its base cannot be fingerprinted. Call "
                "`unmerge_lora()` first."
            )
        return cell._premerge_kernels[target]
    return ops.convert_to_numpy(cell._kernel(target))


def base_fingerprint(cell):
    """SHA-256 over the shapes and float32 bytes of the targeted kernels."""
    digest = hashlib.sha256()
    for target in cell.lora_targets:
        kernel = np.ascontiguousarray(
            np.asarray(_base_kernel(cell, target), dtype="float32")
        )
        digest.update(f"{target}:{kernel.shape}".encode())
        digest.update(kernel.tobytes())
    return digest.hexdigest()


def _cell_attributes(cell):
    return {
        "class_name": type(cell).__name__,
        "units": cell.units,
        "rank": cell.rank,
        "lora_alpha": cell.lora_alpha,
        "use_rslora": cell.use_rslora,
        "lora_targets": ",".join(cell.lora_targets),
        "base_fingerprint": base_fingerprint(cell),
    }


def save_lora_weights(model, path):
    """Writes the LoRA factors of `model` to an adapter file at `path`.

    The file is written to a temporary file beside `path` and renamed into
    place, so a crash never leaves a partial file behind. Only the factors
    are stored: biases or other weights trained alongside them (e.g. with
    `mark_only_lora_as_trainable(bias="all")`) belong in a full
    `model.save_weights` file.

    Args:
        model: a model holding LoRA cells.
        path: the file to write; must end in `.lora.weights.h5`.
    """
    path = _check_path(path)
    cells = lora_cells(model)
    if not cells:
        raise ValueError(
            f"Model '{model.name}' has no LoRA cell to save. Convert it "
            "first: `enable_lora(model, rank=...)`."
        )
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(
        prefix=".tmp-", suffix=SUFFIX, dir=directory
    )
    os.close(handle)
    try:
        with h5py.File(temporary, "w") as file:
            file.attrs["format"] = FORMAT
            file.attrs["format_version"] = FORMAT_VERSION
            file.attrs["model_name"] = model.name
            for cell_path, cell in sorted(cells.items()):
                group = file.create_group(cell_path)
                group.attrs.update(_cell_attributes(cell))
                for weight in cell.lora_weights:
                    group.create_dataset(
                        weight.name,
                        data=np.asarray(ops.convert_to_numpy(weight)),
                    )
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _read_file(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No adapter file at path={path!r}")
    with h5py.File(path, "r") as file:
        if file.attrs.get("format") != FORMAT:
            raise ValueError(
                f"{path!r} is not a keras-rnn-lora adapter file (no "
                f"'format={FORMAT}' attribute)."
            )
        adapters = {}

        def visit(name, item):
            if isinstance(item, h5py.Group) and "rank" in item.attrs:
                adapters[name] = (
                    dict(item.attrs),
                    {key: item[key][()] for key in item.keys()},
                )

        file.visititems(visit)
    return adapters


def load_lora_weights(model, path, strict=True):
    """Loads an adapter file written by `save_lora_weights` into `model`.

    Every check names the layer it is about. Refused always: a cell whose
    class, rank, alpha, scaling rule, targets or factor shapes differ.
    Refused unless `strict=False`: a layer in the file that the model lacks
    (or the reverse), and a base whose frozen kernels differ from the ones
    the adapter was trained on (fingerprint mismatch). With `strict=False`
    the matching layers load and the rest is left as it is.

    Args:
        model: a model holding LoRA cells of the same architecture.
        path: an adapter file (`.lora.weights.h5`).
        strict: bool, default `True`.

    Returns:
        `model`, for chaining.
    """
    path = _check_path(path)
    adapters = _read_file(path)
    cells = lora_cells(model)
    missing_in_model = sorted(set(adapters) - set(cells))
    missing_in_file = sorted(set(cells) - set(adapters))
    if strict and missing_in_model:
        raise ValueError(
            f"The adapter file {path!r} holds LoRA factors for layer "
            f"'{missing_in_model[0]}', which model '{model.name}' does not "
            f"have. Its LoRA layers: {sorted(cells)}. Pass strict=False to "
            "load the layers that match."
        )
    if strict and missing_in_file:
        raise ValueError(
            f"Model '{model.name}' has LoRA layer '{missing_in_file[0]}', "
            f"which the adapter file {path!r} does not hold. Pass "
            "strict=False to load the layers that match."
        )
    plans = []
    for cell_path in sorted(set(adapters) & set(cells)):
        cell = cells[cell_path]
        attributes, factors = adapters[cell_path]
        _check_cell(cell_path, cell, attributes, factors, path, strict)
        plans.append((cell, factors))
    # Every check passed: only now touch the model.
    for cell, factors in plans:
        was_merged = cell.lora_merged
        if was_merged:
            cell.unmerge_lora()
        for weight in cell.lora_weights:
            weight.assign(factors[weight.name])
        if was_merged:
            cell.merge_lora()
    return model


def _check_cell(cell_path, cell, attributes, factors, path, strict):
    expected = _cell_attributes(cell)
    for key in ("class_name", "units", "rank", "lora_targets", "use_rslora"):
        if _plain(attributes.get(key)) != expected[key]:
            raise ValueError(
                f"Layer '{cell_path}': the adapter file {path!r} has "
                f"{key}={_plain(attributes.get(key))!r} but the model's cell "
                f"has {key}={expected[key]!r}."
            )
    if not np.isclose(float(attributes["lora_alpha"]), cell.lora_alpha):
        raise ValueError(
            f"Layer '{cell_path}': the adapter file {path!r} has "
            f"lora_alpha={float(attributes['lora_alpha'])} but the model's "
            f"cell has lora_alpha={cell.lora_alpha}."
        )
    for weight in cell.lora_weights:
        stored = factors.get(weight.name)
        if stored is None or tuple(stored.shape) != tuple(weight.shape):
            shape = None if stored is None else tuple(stored.shape)
            raise ValueError(
                f"Layer '{cell_path}': factor '{weight.name}' has shape "
                f"{shape} in {path!r} but {tuple(weight.shape)} in the model."
            )
    fingerprint = _plain(attributes.get("base_fingerprint"))
    if strict and fingerprint != expected["base_fingerprint"]:
        raise ValueError(
            f"Layer '{cell_path}': the model's frozen base weights differ "
            f"from those the adapter in {path!r} was trained on "
            "(fingerprint mismatch). Load the adapter into the base model it "
            "was trained from, or pass strict=False to load it anyway."
        )


def _plain(value):
    """h5py attributes come back as numpy scalars or bytes."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
