"""The adapter file format: what `save_lora_weights` writes and how a file
is read and checked before anything is loaded from it.

A `.lora.weights.h5` file is HDF5: file attributes `format`
("keras-rnn-lora-adapter"), `format_version` and `model_name`; one group per
adapter, named by its path in the model, holding its factors as datasets
and, as attributes, `class_name`, `rank`, `lora_alpha`, `use_rslora`,
`lora_targets`, `lora_dropout` (from format 3) and `base_fingerprint`.
Files are untrusted input: data is read only from inside the file (no
links, external storage or virtual datasets), attributes only up to
`MAX_ATTRIBUTE_BYTES`, factor shapes and dtypes are checked before any
data is read, and messages never echo unbounded values.
"""

import hashlib
import math
import os

import h5py
import numpy as np

from keras_rnn_lora.checks import is_int
from keras_rnn_lora.checks import is_real
from keras_rnn_lora.lora import LORA_INITS

FORMAT = "keras-rnn-lora-adapter"
# 2: factors and attributes; 3: also `lora_dropout`. Both load.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
SUFFIX = ".lora.weights.h5"
# No attribute of a good file comes near this; longer ones are refused
# unread where the file says their size, and never echoed.
MAX_ATTRIBUTE_BYTES = 4096


# The model-wide target of each adapter class that is not a cell.
def write(path, model_name, adapters, active=None):
    """Writes an adapter file. `adapters` maps each named adapter to
    `{layer path: (attributes, factors)}` (`adapter_attributes`; factor
    name -> array). One adapter: a group per layer path, the name in the
    file's `adapter_name`; several: the same under a group per name, the
    names in the file's `adapter_names` and the `active` one in its
    `active_adapter`."""
    with h5py.File(path, "w") as file:
        file.attrs["format"] = FORMAT
        file.attrs["format_version"] = FORMAT_VERSION
        file.attrs["model_name"] = model_name
        several = len(adapters) > 1
        if several:
            file.attrs["adapter_names"] = ",".join(adapters)
            if active in adapters:
                file.attrs["active_adapter"] = active
        else:
            file.attrs["adapter_name"] = next(iter(adapters))
        for adapter_name, contents in adapters.items():
            root = file.create_group(adapter_name) if several else file
            for layer_path, (attributes, factors) in contents.items():
                group = root.create_group(layer_path)
                group.attrs.update(attributes)
                for name, value in factors.items():
                    group.create_dataset(name, data=value)


def check_path(path):
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


def adapter_attributes(adapter, name=None):
    """What a file records of the layer's adapter `name` (default: the
    active one)."""
    config = adapter.adapter_config(name or adapter.active_adapter)
    return {
        "class_name": type(adapter).__name__,
        "rank": config.rank,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "lora_targets": ",".join(config.lora_targets),
        "lora_dropout": config.lora_dropout,
        "use_dora": config.use_dora,
        "lora_init": config.lora_init,
        "base_fingerprint": base_fingerprint(adapter),
    }


# Attribute of an adapter group -> (check, what it must be).
_ATTRIBUTE_CHECKS = {
    "class_name": (lambda v: isinstance(v, str), "a string"),
    "rank": (is_int, "an integer"),
    "lora_alpha": (
        lambda v: is_real(v) and math.isfinite(v) and v > 0,
        "a finite number > 0",
    ),
    "use_rslora": (lambda v: isinstance(v, bool), "a bool"),
    "lora_targets": (lambda v: isinstance(v, str), "a string"),
    "base_fingerprint": (lambda v: isinstance(v, str), "a string"),
}
# Attributes a format-2 file lacks, with the value they stand for there.
_OPTIONAL_ATTRIBUTES = {
    "lora_dropout": (
        lambda v: is_real(v) and 0 <= v < 1,
        "a number in [0, 1)",
        0.0,
    ),
    "use_dora": (lambda v: isinstance(v, bool), "a bool", False),
    "lora_init": (lambda v: v in LORA_INITS, f"one of {LORA_INITS}", "default"),
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


class Header:
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


class AdapterFile:
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

    def active_adapter(self):
        """The adapter active when a file of several was saved, or `None`
        (a file of one, or of an older version)."""
        where = f"The adapter file {self.path!r}"
        active = _scalar_attribute(self.file, "active_adapter", where)
        return None if active is None else str(active)

    def headers(self):
        """`{adapter name: {layer path: Header}}`, reading no factor
        data."""
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
            groups = {}
            for name in names:
                item = file[name]
                if isinstance(item, h5py.Group) and "rank" in item.attrs:
                    groups[name] = Header(name, item, path)
            for name in names:
                parent = name.rpartition("/")[0]
                if isinstance(file[name], h5py.Dataset) and (
                    parent not in groups
                ):
                    raise _Refused(
                        f"{where} holds an unexpected dataset {name!r} "
                        "outside any layer's adapter; refusing it."
                    )
            headers = _by_adapter(file, groups, where)
        except _Refused as error:
            raise ValueError(str(error)) from None
        if not any(headers.values()):
            raise ValueError(f"{where} holds no adapter.")
        return headers

    def factors(self, header):
        """The factor datasets of one adapter, as NumPy arrays."""
        group = self.file[header.name]
        return {key: np.array(group[key][()]) for key in header.datasets}


def _by_adapter(file, groups, where):
    """The adapter groups of a file by adapter name (see `write`)."""
    several = _scalar_attribute(file, "adapter_names", where)
    if several is None:
        name = _scalar_attribute(file, "adapter_name", where) or "default"
        return {str(name): groups}
    names = str(several).split(",")
    headers = {name: {} for name in names}
    for group, header in groups.items():
        adapter, _, layer_path = group.partition("/")
        if adapter not in headers or not layer_path:
            raise _Refused(
                f"{where} holds {_cut(group)!r} outside its adapters "
                f"{names}; refusing it."
            )
        headers[adapter][layer_path] = header
    return headers


def check_header(layer_path, adapter, header, path, strict, name=None):
    """Checks an adapter's `header` against the model's `adapter`: class,
    rank, targets, scaling rule, alpha, factor names, shapes and dtypes;
    with `strict`, the base fingerprint too. Returns whether the base
    fingerprints match."""
    expected = adapter_attributes(adapter, name)
    attributes = header.attributes
    if attributes["lora_init"] != expected["lora_init"]:
        raise ValueError(
            f"Layer '{layer_path}': the adapter in {path!r} was initialized "
            f"with lora_init={attributes['lora_init']!r}, the model's layer "
            f"with lora_init={expected['lora_init']!r}: each trains on its "
            "own frozen residual of the kernel. Load the file into the base "
            "model with `keras_rnn_lora.load_lora_model(base, path)`, which "
            "sets the adapters up as the file says."
        )
    for key in ("class_name", "rank", "lora_targets", "use_rslora", "use_dora"):
        if attributes[key] != expected[key]:
            raise ValueError(
                f"Layer '{layer_path}': the adapter file {path!r} has "
                f"{key}={_shown(attributes[key])} but the model's layer "
                f"has {key}={expected[key]!r}."
            )
    alpha = expected["lora_alpha"]
    if not np.isclose(float(attributes["lora_alpha"]), alpha):
        raise ValueError(
            f"Layer '{layer_path}': the adapter file {path!r} has "
            f"lora_alpha={float(attributes['lora_alpha'])} but the model's "
            f"layer has lora_alpha={alpha}."
        )
    shapes = adapter.adapter_shapes(name or adapter.active_adapter)
    unexpected = sorted(set(header.datasets) - set(shapes)) + header.other
    if unexpected:
        raise ValueError(
            f"Layer '{layer_path}': the adapter file {path!r} holds "
            f"{[_cut(n) for n in unexpected]}, which are not factors "
            f"of this layer ({sorted(shapes)}); refusing it."
        )
    for factor, expected_shape in shapes.items():
        shape, dtype = header.datasets.get(factor, (None, None))
        if shape != expected_shape:
            raise ValueError(
                f"Layer '{layer_path}': factor '{factor}' has shape "
                f"{shape} in {path!r} but {expected_shape} in the model."
            )
        if dtype.kind != "f":
            raise ValueError(
                f"Layer '{layer_path}': factor '{factor}' in {path!r} has "
                f"dtype {dtype}; expected floating point."
            )
    same_base = attributes["base_fingerprint"] == expected["base_fingerprint"]
    if strict and not same_base:
        raise ValueError(
            f"Layer '{layer_path}': the model's frozen base weights differ "
            f"from those the adapter in {path!r} was trained on "
            "(fingerprint mismatch). Load the adapter into the base model it "
            "was trained from, or pass strict=False to load it anyway."
        )
    return same_base


def _plain(value):
    """h5py attributes come back as numpy scalars or bytes."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.generic):
        return value.item()
    return value
