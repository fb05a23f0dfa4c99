"""Adapter files: the LoRA factors of a model, on their own, in HDF5.

A `.lora.weights.h5` file holds one group per LoRA adapter (a recurrent
cell's, or a Dense/EinsumDense/Embedding layer's), keyed by its path in the
model ("encoder/encoder_0/cell", "decoder/logits"), with its factors as
datasets and, as attributes, its class, rank, alpha, scaling rule, targets,
LoRA dropout and a SHA-256 fingerprint of the frozen kernels the adapter
was trained on. It is small (the factors only) and loads into any model of
the same architecture built on the same base weights: into a model that
already has the adapters (`load_lora_weights`), or into the base model,
which it sets up (`load_lora_model`).

What the fingerprint covers is the frozen base, not the factors: a file
whose factors were swapped between two layers of the same shape loads.
Files are untrusted input: everything is checked before a model is
touched, data is read only from inside the file (no links, external
storage or virtual datasets), and attributes only up to a bounded size.
"""

import collections
import hashlib
import math
import numbers
import os
import warnings

import h5py
import numpy as np

from keras_rnn_lora import files
from keras_rnn_lora.walk import check_model
from keras_rnn_lora.walk import lora_adapters

FORMAT = "keras-rnn-lora-adapter"
# 2: factors and attributes; 3: also `lora_dropout`. Both load.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
SUFFIX = ".lora.weights.h5"
# No attribute of a good file comes near this; longer ones are refused
# unread where the file says their size, and never echoed.
MAX_ATTRIBUTE_BYTES = 4096
# The model-wide target of each adapter class that is not a cell.
_LAYER_TARGET = {
    "LoRADense": "dense",
    "LoRAEinsumDense": "einsum_dense",
    "LoRAEmbedding": "embedding",
}
_ROLES = ("cell", "forward", "backward", "layer")


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
        "lora_dropout": adapter.lora_config.lora_dropout,
        "base_fingerprint": base_fingerprint(adapter),
    }


def save_lora_weights(model, path):
    """Writes the LoRA factors of `model` to an adapter file at `path`.

    The adapters' factors are written whether they are merged or not. The
    file is written to a temporary file beside `path` and renamed into
    place, so a crash never leaves a partial file behind; it gets the usual
    permissions (`0o666` less the umask). Only the factors are stored:
    biases or other weights trained alongside them (e.g. with
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
    contents = {}
    for layer_path, adapter in sorted(adapters.items()):
        try:
            contents[layer_path] = (
                _adapter_attributes(adapter),
                adapter.factor_values(),
            )
        except ValueError as error:
            raise ValueError(f"Layer '{layer_path}': {error}") from None
    with files.atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as file:
            file.attrs["format"] = FORMAT
            file.attrs["format_version"] = FORMAT_VERSION
            file.attrs["model_name"] = model.name
            for layer_path, (attributes, factors) in contents.items():
                group = file.create_group(layer_path)
                group.attrs.update(attributes)
                for name, value in factors.items():
                    group.create_dataset(name, data=value)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Attribute of an adapter group -> (check, what it must be).
_ATTRIBUTE_CHECKS = {
    "class_name": (lambda v: isinstance(v, str), "a string"),
    "rank": (_is_int, "an integer"),
    "lora_alpha": (
        lambda v: _is_real(v) and math.isfinite(v) and v > 0,
        "a finite number > 0",
    ),
    "use_rslora": (lambda v: isinstance(v, bool), "a bool"),
    "lora_targets": (lambda v: isinstance(v, str), "a string"),
    "base_fingerprint": (lambda v: isinstance(v, str), "a string"),
}
# Attributes a format-2 file lacks, with the value they stand for there.
_OPTIONAL_ATTRIBUTES = {
    "lora_dropout": (
        lambda v: _is_real(v) and 0 <= v < 1,
        "a number in [0, 1)",
        0.0,
    ),
}


def _shown(value, limit=80):
    """`repr(value)`, cut to `limit` characters for an error message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def _cut(text, limit=60):
    """`text` cut to `limit` characters for an error message."""
    return text if len(text) <= limit else f"{text[:limit]}..."


class _Refused(ValueError):
    """A file that is not what it says, found while reading it."""


def _scalar_attribute(item, name, where):
    """One scalar attribute of an HDF5 object, or `None` when absent.

    Refused unread: a non-scalar (however large) or an attribute whose
    stored size exceeds `MAX_ATTRIBUTE_BYTES`; a variable-length string is
    refused once read if it is longer."""
    if name not in item.attrs:
        return None
    attribute = item.attrs.get_id(name)
    too_long = _Refused(
        f"{where} has an attribute {name!r} longer than "
        f"{MAX_ATTRIBUTE_BYTES} bytes; refusing it."
    )
    if attribute.shape != ():
        raise _Refused(
            f"{where} has a bad attribute {name!r}: expected a scalar, found "
            f"a non-scalar of shape {attribute.shape}."
        )
    if attribute.get_storage_size() > MAX_ATTRIBUTE_BYTES:
        raise too_long
    value = _plain(item.attrs[name])
    if isinstance(value, str) and len(value) > MAX_ATTRIBUTE_BYTES:
        raise too_long
    return value


def _check_dataset_storage(dataset, path):
    """Refuses data that does not live in the file itself: external raw
    storage and virtual datasets, which would read other files."""
    plist = dataset.id.get_create_plist()
    layout = plist.get_layout()
    inside = (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED, h5py.h5d.COMPACT)
    if layout not in inside or plist.get_external_count() > 0:
        raise _Refused(
            f"The adapter file {path!r} stores dataset {dataset.name!r} "
            "outside itself (external storage or a virtual dataset); "
            "refusing it without reading it."
        )


class _Header:
    """One adapter group as the file declares it: attributes, and each
    dataset's shape and dtype. No factor data is read to make it."""

    def __init__(self, name, group, path):
        where = f"Layer '{name}' in the adapter file {path!r}"
        self.name = name
        self.attributes = {
            key: _scalar_attribute(group, key, where)
            for key in (*_ATTRIBUTE_CHECKS, *_OPTIONAL_ATTRIBUTES)
        }
        self.datasets = {}
        self.other = []
        for key, item in group.items():
            if isinstance(item, h5py.Dataset):
                _check_dataset_storage(item, path)
                self.datasets[key] = (tuple(item.shape), item.dtype)
            else:
                self.other.append(key)

    def check(self, path):
        """Every attribute present and of the right type."""
        for key, (check, expected) in _ATTRIBUTE_CHECKS.items():
            self._check_attribute(key, check, expected, path)
        for key, (check, expected, default) in _OPTIONAL_ATTRIBUTES.items():
            if self.attributes[key] is None:
                self.attributes[key] = default
            self._check_attribute(key, check, expected, path)

    def _check_attribute(self, key, check, expected, path):
        value = self.attributes[key]
        if value is None or not check(value):
            found = "nothing" if value is None else _shown(value)
            raise ValueError(
                f"Layer '{self.name}': the adapter file {path!r} has a bad "
                f"attribute '{key}': expected {expected}, found {found}."
            )


class _AdapterFile:
    """An adapter file read whole through one open handle: its headers and,
    on request, the factor data of some groups. A save that replaces the
    file meanwhile (by rename) cannot mix into what is read."""

    def __init__(self, path):
        self.path = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No adapter file at path={path!r}")
        try:
            self.file = h5py.File(path, "r")
        except OSError as error:
            raise ValueError(
                f"{path!r} is not a keras-rnn-lora adapter file (not HDF5: "
                f"{error})."
            ) from None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()

    def headers(self):
        """`{layer path: _Header}`, reading no factor data."""
        file, path = self.file, self.path
        where = f"The adapter file {path!r}"
        try:
            if _scalar_attribute(file, "format", where) != FORMAT:
                raise _Refused(
                    f"{path!r} is not a keras-rnn-lora adapter file (no "
                    f"'format={FORMAT}' attribute)."
                )
            version = _scalar_attribute(file, "format_version", where)
            if version not in READABLE_VERSIONS:
                raise _Refused(
                    f"{where} has format_version {_shown(version)}; this "
                    f"version of keras-rnn-lora reads {READABLE_VERSIONS}. "
                    "Was it written by a newer keras-rnn-lora?"
                )
            links = []
            file.visit_links(links.append)
            for name in links:
                if not isinstance(file.get(name, getlink=True), h5py.HardLink):
                    raise _Refused(
                        f"{where} holds a link {name!r} (soft or external); "
                        "refusing it without following it."
                    )
            names = []
            file.visit(names.append)
            headers = {}
            for name in names:
                item = file[name]
                if isinstance(item, h5py.Group) and "rank" in item.attrs:
                    headers[name] = _Header(name, item, path)
            for name in names:
                parent = name.rpartition("/")[0]
                if isinstance(file[name], h5py.Dataset) and (
                    parent not in headers
                ):
                    raise _Refused(
                        f"{where} holds an unexpected dataset {name!r} "
                        "outside any layer's adapter; refusing it."
                    )
        except _Refused as error:
            raise ValueError(str(error)) from None
        if not headers:
            raise ValueError(f"{where} holds no adapter.")
        return headers

    def factors(self, header):
        """The factor datasets of one adapter, as NumPy arrays."""
        group = self.file[header.name]
        return {key: np.array(group[key][()]) for key in header.datasets}


def load_lora_weights(model, path, strict=True):
    """Loads an adapter file written by `save_lora_weights` into `model`,
    which already holds the adapters (to set them up from the file, use
    `load_lora_model`).

    The file is read through one open handle and everything is checked
    before the model is touched; every refusal names the layer, and a
    refused file leaves the model exactly as it was. Refused always: an
    adapter whose class, rank, alpha, scaling rule, targets or factor shapes
    differ; attributes missing, of the wrong type or too long; factors that
    are not floating point, hold NaN or Inf, would merge into a non-finite
    kernel, or are stored outside the file; datasets the layer does not
    have; a file that matches no adapter of the model. Refused unless
    `strict=False`: a layer in the file that the model lacks (or the
    reverse), and a base whose frozen kernels differ from the ones the
    adapter was trained on (fingerprint mismatch). With `strict=False` the
    matching layers load and a `UserWarning` lists what was skipped.

    The merge state is the model's: a merged model stays merged, with the
    loaded adapter folded in. Functions compiled before (`predict`, a
    `tf.function`) compute with the loaded adapter.

    Args:
        model: a model holding LoRA adapters of the same architecture.
        path: an adapter file (`.lora.weights.h5`).
        strict: bool, default `True`.

    Returns:
        `model`, for chaining.
    """
    path = _check_path(path)
    check_model(model, "load_lora_weights")
    adapters = lora_adapters(model)
    if not adapters:
        raise ValueError(
            f"Model '{model.name}' has no LoRA layer to load {path!r} into. "
            "To set the adapters up from the file, load it into the base "
            "model with `keras_rnn_lora.load_lora_model(model, path)`."
        )
    with _AdapterFile(path) as adapter_file:
        headers = adapter_file.headers()
        plans = _plans(model, adapters, adapter_file, headers, strict)
    # Every check passed: only now touch the model.
    for adapter, factors in plans:
        adapter.set_lora_factors(factors)
    return model


def _plans(model, adapters, adapter_file, headers, strict):
    """`[(adapter, factors)]` for every adapter the file loads into, every
    check done."""
    path = adapter_file.path
    for header in headers.values():
        header.check(path)
    only_in_file = sorted(set(headers) - set(adapters))
    only_in_model = sorted(set(adapters) - set(headers))
    if strict and only_in_file:
        raise ValueError(
            f"The adapter file {path!r} holds LoRA factors for layer "
            f"'{only_in_file[0]}', which model '{model.name}' does not "
            f"have. Its LoRA layers: {sorted(adapters)}. Pass strict=False to "
            "load the layers that match."
        )
    if strict and only_in_model:
        raise ValueError(
            f"Model '{model.name}' has LoRA layer '{only_in_model[0]}', "
            f"which the adapter file {path!r} does not hold. Pass "
            "strict=False to load the layers that match."
        )
    matched = sorted(set(headers) & set(adapters))
    if not matched:
        raise ValueError(
            f"The adapter file {path!r} matches no LoRA layer of model "
            f"'{model.name}': it holds {sorted(headers)}, the model has "
            f"{sorted(adapters)}. Nothing was loaded."
        )
    plans = []
    for layer_path in matched:
        adapter, header = adapters[layer_path], headers[layer_path]
        _check_header(layer_path, adapter, header, path, strict)
        factors = adapter_file.factors(header)
        try:
            plans.append((adapter, adapter.check_lora_factors(factors)))
        except ValueError as error:
            raise ValueError(
                f"Layer '{layer_path}' from {path!r}: {error}"
            ) from None
    skipped = only_in_file + only_in_model
    if skipped:
        warnings.warn(
            f"load_lora_weights(strict=False) loaded {len(matched)} adapter(s) "
            f"from {path!r} and skipped {len(skipped)}: in the file only "
            f"{only_in_file}, in the model only {only_in_model}.",
            stacklevel=3,
        )
    return plans


def _check_header(layer_path, adapter, header, path, strict):
    expected = _adapter_attributes(adapter)
    attributes = header.attributes
    for key in ("class_name", "rank", "lora_targets", "use_rslora"):
        if attributes[key] != expected[key]:
            raise ValueError(
                f"Layer '{layer_path}': the adapter file {path!r} has "
                f"{key}={_shown(attributes[key])} but the model's layer "
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
            f"{[_cut(n) for n in unexpected]}, which are not factors "
            f"of this layer ({sorted(weights)}); refusing it."
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


def _layer_name(layer_path):
    """The name of the layer an adapter path belongs to: the path without
    the roles inside a recurrent layer ("encoder/encoder_0/cell" ->
    "encoder_0", "bi/forward/cell" -> "bi", "stacked/cell/1" -> "stacked")."""
    parts = layer_path.split("/")
    while len(parts) > 1 and (parts[-1] in _ROLES or parts[-1].isdigit()):
        parts.pop()
    return parts[-1]


def _settings(header):
    """The `enable_lora` settings an adapter was made with."""
    attributes = header.attributes
    class_name = attributes["class_name"]
    targets = (
        (_LAYER_TARGET[class_name],)
        if class_name in _LAYER_TARGET
        else tuple(attributes["lora_targets"].split(","))
    )
    return (
        attributes["rank"],
        float(attributes["lora_alpha"]),
        attributes["use_rslora"],
        float(attributes["lora_dropout"]),
        targets,
    )


def load_lora_model(model, path, strict=True):
    """A base model and an adapter file in, the adapted model out: sets up
    the adapters the file records (rank, alpha, scaling rule, targets and
    LoRA dropout, layer by layer) with `enable_lora`, then loads their
    factors as `load_lora_weights` does (every check included). `model` is
    left unchanged.

    Args:
        model: the built base model the adapter was trained on (without
            adapters).
        path: an adapter file (`.lora.weights.h5`).
        strict: as for `load_lora_weights` (the fingerprint check).

    Returns:
        A new model with the adapters, unmerged, compiled like `model` if
        it was compiled.

    Example:

    >>> path = "news.lora.weights.h5"
    >>> lora_model = keras_rnn_lora.load_lora_model(base, path)
    """
    from keras_rnn_lora.convert import enable_lora

    path = _check_path(path)
    check_model(model, "load_lora_model", built=True)
    if lora_adapters(model):
        raise ValueError(
            f"Model '{model.name}' already has LoRA layers "
            f"{sorted(lora_adapters(model))}: load the file into it with "
            "`keras_rnn_lora.load_lora_weights(model, path)`, or pass the "
            "base model without adapters."
        )
    with _AdapterFile(path) as adapter_file:
        headers = adapter_file.headers()
        for header in headers.values():
            header.check(path)
        groups = collections.defaultdict(set)
        for layer_path, header in headers.items():
            groups[_settings(header)].add(_layer_name(layer_path))
        lora_model = model
        for (rank, alpha, rslora, dropout, targets), names in groups.items():
            lora_model = enable_lora(
                lora_model,
                rank=rank,
                lora_alpha=alpha,
                use_rslora=rslora,
                lora_dropout=dropout,
                lora_targets=targets,
                layers=sorted(names),
            )
        adapters = lora_adapters(lora_model)
        if set(adapters) != set(headers):
            raise ValueError(
                f"The adapter file {path!r} describes adapters "
                f"{sorted(headers)}; set up on model '{model.name}' they "
                f"are {sorted(adapters)}. Is this the base model the adapter "
                "was trained on?"
            )
        plans = _plans(lora_model, adapters, adapter_file, headers, strict)
    for adapter, factors in plans:
        adapter.set_lora_factors(factors)
    return lora_model


def _plain(value):
    """h5py attributes come back as numpy scalars or bytes."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.generic):
        return value.item()
    return value
