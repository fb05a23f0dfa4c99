"""Adapter files: the LoRA factors of a model, on their own, in HDF5.

A `.lora.weights.h5` file holds one group per LoRA adapter (a recurrent
cell's, or a Dense/EinsumDense/Embedding layer's), keyed by its path in the
model ("encoder/encoder_0/cell", "decoder/logits"), with its factors as
datasets and, as attributes, its class, rank, alpha, scaling rule, targets
and a SHA-256 fingerprint of the frozen kernels the adapter was trained on.
It is small (the factors only) and loads into any model of the same
architecture built on the same base weights.
"""

import hashlib
import math
import numbers
import os

import h5py
import numpy as np

from keras_rnn_lora import files
from keras_rnn_lora import lora
from keras_rnn_lora.walk import check_model
from keras_rnn_lora.walk import lora_adapters

FORMAT = "keras-rnn-lora-adapter"
FORMAT_VERSION = 2  # 1: 0.1.0, which also stored each cell's `units`
SUFFIX = ".lora.weights.h5"


def _check_path(path):
    path = os.fspath(path)
    if not path.endswith(SUFFIX):
        raise ValueError(
            f"Received an invalid value for `path`, expected a file name "
            f"ending in '{SUFFIX}'. Received: path={path!r}"
        )
    return path


def base_fingerprint(adapter):
    """SHA-256 over the shapes and float32 bytes of the targeted kernels."""
    digest = hashlib.sha256()
    for target in adapter.lora_targets:
        kernel = np.ascontiguousarray(
            np.asarray(adapter.base_kernel(target), dtype="float32")
        )
        digest.update(f"{target}:{kernel.shape}".encode())
        digest.update(kernel.tobytes())
    return digest.hexdigest()


def _adapter_attributes(adapter):
    return {
        "class_name": type(adapter).__name__,
        "rank": adapter.rank,
        "lora_alpha": adapter.lora_config.lora_alpha,
        "use_rslora": adapter.lora_config.use_rslora,
        "lora_targets": ",".join(adapter.lora_targets),
        "base_fingerprint": base_fingerprint(adapter),
    }


def save_lora_weights(model, path):
    """Writes the LoRA factors of `model` to an adapter file at `path`.

    The file is written to a temporary file beside `path` and renamed into
    place, so a crash never leaves a partial file behind; it gets the usual
    permissions (`0o666` less the umask). Only the factors
    are stored: biases or other weights trained alongside them (e.g. with
    `mark_only_lora_as_trainable(bias="all")`) belong in a full
    `model.save_weights` file.

    Args:
        model: a model holding LoRA adapters.
        path: the file to write; must end in `.lora.weights.h5`.
    """
    path = _check_path(path)
    check_model(model, "save_lora_weights")
    adapters = lora_adapters(model)
    if not adapters:
        raise ValueError(
            f"Model '{model.name}' has no LoRA cell to save (nor any other "
            "LoRA layer). "
            "Convert it first: `enable_lora(model, rank=...)`."
        )
    with files.atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as file:
            file.attrs["format"] = FORMAT
            file.attrs["format_version"] = FORMAT_VERSION
            file.attrs["model_name"] = model.name
            for layer_path, adapter in sorted(adapters.items()):
                group = file.create_group(layer_path)
                group.attrs.update(_adapter_attributes(adapter))
                for weight in adapter.lora_weights:
                    group.create_dataset(
                        weight.name, data=lora.to_numpy(weight)
                    )


def _scalar_attribute(item, name):
    """One scalar attribute of an HDF5 object, or `None`; a non-scalar one
    (however large) is never read."""
    if name not in item.attrs:
        return None
    if item.attrs.get_id(name).shape != ():
        return _NOT_SCALAR
    return _plain(item.attrs[name])


_NOT_SCALAR = object()

# Attribute of an adapter group -> (check, what it must be).
_ATTRIBUTE_CHECKS = {
    "class_name": (lambda v: isinstance(v, str), "a string"),
    "rank": (
        lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
        "an integer",
    ),
    "lora_alpha": (
        lambda v: (
            isinstance(v, numbers.Real)
            and not isinstance(v, bool)
            and math.isfinite(v)
            and v > 0
        ),
        "a finite number > 0",
    ),
    "use_rslora": (lambda v: isinstance(v, bool), "a bool"),
    "lora_targets": (lambda v: isinstance(v, str), "a string"),
    "base_fingerprint": (lambda v: isinstance(v, str), "a string"),
}


class _Header:
    """One adapter group as the file declares it: attributes, and each
    dataset's shape and dtype. No factor data is read to make it."""

    def __init__(self, name, group):
        self.name = name
        self.attributes = {
            key: _scalar_attribute(group, key) for key in _ATTRIBUTE_CHECKS
        }
        self.datasets = {}
        self.other = []
        for key, item in group.items():
            if isinstance(item, h5py.Dataset):
                self.datasets[key] = (tuple(item.shape), item.dtype)
            else:
                self.other.append(key)


def _read_headers(path):
    """`{layer path: _Header}` of an adapter file, reading no data."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No adapter file at path={path!r}")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(
            f"{path!r} is not a keras-rnn-lora adapter file (not HDF5: "
            f"{error})."
        ) from None
    with file:
        if _scalar_attribute(file, "format") != FORMAT:
            raise ValueError(
                f"{path!r} is not a keras-rnn-lora adapter file (no "
                f"'format={FORMAT}' attribute)."
            )
        links = []
        file.visit_links(links.append)
        for name in links:
            if not isinstance(file.get(name, getlink=True), h5py.HardLink):
                raise ValueError(
                    f"The adapter file {path!r} holds a link {name!r} (soft "
                    "or external); refusing it without following it."
                )
        groups = []
        file.visit(groups.append)
        headers = {}
        for name in groups:
            item = file[name]
            if isinstance(item, h5py.Group) and "rank" in item.attrs:
                headers[name] = _Header(name, item)
        for name in groups:
            parent = name.rpartition("/")[0]
            item = file.get(name)
            if isinstance(item, h5py.Dataset) and parent not in headers:
                raise ValueError(
                    f"The adapter file {path!r} holds an unexpected dataset "
                    f"{name!r} outside any layer's adapter; refusing it."
                )
    return headers


def _read_factors(path, name, keys):
    """The factor datasets `keys` of group `name`, once checked."""
    with h5py.File(path, "r") as file:
        return {key: np.array(file[name][key][()]) for key in keys}


def load_lora_weights(model, path, strict=True):
    """Loads an adapter file written by `save_lora_weights` into `model`.

    Everything is checked before the model is touched, and every refusal
    names the layer: a refused file leaves the model exactly as it was.
    Refused always: an adapter whose class, rank, alpha, scaling rule, targets
    or factor shapes differ; attributes missing or of the wrong type;
    factors that are not floating point, hold NaN or Inf, or would merge
    into a non-finite kernel; datasets the layer does not have. Declared
    shapes and dtypes are checked before any data is read. Refused unless
    `strict=False`: a layer in the file that the model lacks (or the
    reverse), and a base whose frozen kernels differ from the ones the
    adapter was trained on (fingerprint mismatch). With `strict=False` the
    matching layers load and the rest is left as it is.

    Args:
        model: a model holding LoRA adapters of the same architecture.
        path: an adapter file (`.lora.weights.h5`).
        strict: bool, default `True`.

    Returns:
        `model`, for chaining.
    """
    path = _check_path(path)
    check_model(model, "load_lora_weights")
    headers = _read_headers(path)
    adapters = lora_adapters(model)
    missing_in_model = sorted(set(headers) - set(adapters))
    missing_in_file = sorted(set(adapters) - set(headers))
    if strict and missing_in_model:
        raise ValueError(
            f"The adapter file {path!r} holds LoRA factors for layer "
            f"'{missing_in_model[0]}', which model '{model.name}' does not "
            f"have. Its LoRA layers: {sorted(adapters)}. Pass strict=False to "
            "load the layers that match."
        )
    if strict and missing_in_file:
        raise ValueError(
            f"Model '{model.name}' has LoRA layer '{missing_in_file[0]}', "
            f"which the adapter file {path!r} does not hold. Pass "
            "strict=False to load the layers that match."
        )
    plans = []
    for layer_path in sorted(set(headers) & set(adapters)):
        adapter = adapters[layer_path]
        header = headers[layer_path]
        _check_header(layer_path, adapter, header, path, strict)
        factors = _read_factors(path, header.name, header.datasets)
        for key, value in factors.items():
            lora.check_finite(
                value, f"factor '{key}' of layer '{layer_path}' from {path!r}"
            )
        if adapter.lora_merged:  # it will be re-merged: check that result too
            try:
                adapter.merged_kernels(factors)
            except ValueError as error:
                raise ValueError(f"Layer '{layer_path}': {error}") from None
        plans.append((adapter, factors))
    # Every check passed: only now touch the model.
    for adapter, factors in plans:
        adapter.set_lora_factors(factors)
    return model


def _check_header(layer_path, adapter, header, path, strict):
    for key, (check, expected_type) in _ATTRIBUTE_CHECKS.items():
        value = header.attributes[key]
        if value is None or value is _NOT_SCALAR or not check(value):
            found = "nothing" if value is None else "a non-scalar"
            if value is not None and value is not _NOT_SCALAR:
                found = repr(value)
            raise ValueError(
                f"Layer '{layer_path}': the adapter file {path!r} has a bad "
                f"attribute '{key}': expected {expected_type}, found {found}."
            )
    expected = _adapter_attributes(adapter)
    attributes = header.attributes
    for key in ("class_name", "rank", "lora_targets", "use_rslora"):
        if attributes[key] != expected[key]:
            raise ValueError(
                f"Layer '{layer_path}': the adapter file {path!r} has "
                f"{key}={attributes[key]!r} but the model's layer "
                f"has {key}={expected[key]!r}."
            )
    alpha = adapter.lora_config.lora_alpha
    if not np.isclose(float(attributes["lora_alpha"]), alpha):
        raise ValueError(
            f"Layer '{layer_path}': the adapter file {path!r} has "
            f"lora_alpha={float(attributes['lora_alpha'])} but the model's "
            f"layer has lora_alpha={alpha}."
        )
    weights = {w.name: w for w in adapter.lora_weights}
    unexpected = sorted(set(header.datasets) - set(weights)) + header.other
    if unexpected:
        raise ValueError(
            f"Layer '{layer_path}': the adapter file {path!r} holds "
            f"{unexpected}, which are not factors of this layer "
            f"({sorted(weights)}); refusing it."
        )
    for name, weight in weights.items():
        shape, dtype = header.datasets.get(name, (None, None))
        if shape != tuple(weight.shape):
            raise ValueError(
                f"Layer '{layer_path}': factor '{name}' has shape "
                f"{shape} in {path!r} but {tuple(weight.shape)} in the model."
            )
        if dtype.kind != "f":
            raise ValueError(
                f"Layer '{layer_path}': factor '{name}' in {path!r} has dtype "
                f"{dtype}; expected floating point."
            )
    if (
        strict
        and attributes["base_fingerprint"] != expected["base_fingerprint"]
    ):
        raise ValueError(
            f"Layer '{layer_path}': the model's frozen base weights differ "
            f"from those the adapter in {path!r} was trained on "
            "(fingerprint mismatch). Load the adapter into the base model it "
            "was trained from, or pass strict=False to load it anyway."
        )


def _plain(value):
    """h5py attributes come back as numpy scalars or bytes."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.generic):
        return value.item()
    return value
