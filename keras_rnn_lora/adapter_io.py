"""Adapter files: the LoRA factors of a model, on their own, in HDF5.

A `.lora.weights.h5` file holds one group per LoRA adapter (a recurrent
cell's, or a Dense/EinsumDense/Embedding layer's), keyed by its path in the
model ("encoder/encoder_0/cell", "decoder/logits"), with its factors as
datasets and, as attributes, its class, rank, alpha, scaling rule, targets,
LoRA dropout and a SHA-256 fingerprint of the frozen kernels the adapter
was trained on. It is small (the factors only) and loads into any model of
the same architecture built on the same base weights: into a model that
already has the adapters (`load_lora_weights`), or into the base model,
which it sets up (`load_lora_model`). The format and how a file is checked:
`adapter_file.py`.

What the fingerprint covers is the frozen base, not the factors: a file
whose factors were swapped between two layers of the same shape loads.
"""

import collections
import warnings

from keras_rnn_lora import adapter_file
from keras_rnn_lora import files
from keras_rnn_lora import lora
from keras_rnn_lora.walk import at_layer
from keras_rnn_lora.walk import check_model
from keras_rnn_lora.walk import lora_adapters
from keras_rnn_lora.walk import require_adapters

# The model-wide target of each adapter class that is not a cell.
_LAYER_TARGET = {
    "LoRADense": "dense",
    "LoRAEinsumDense": "einsum_dense",
    "LoRAEmbedding": "embedding",
}
_ROLES = ("cell", "forward", "backward", "layer")


def save_lora_weights(model, path, adapter=None):
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
        adapter: which named adapter: `None` (default) the active one, a
            name, or `"all"`: every adapter of the model in one file. The
            file records the names.
    """
    path = adapter_file.check_path(path)
    adapters = require_adapters(model, "save_lora_weights")
    from keras_rnn_lora.named_adapters import active_adapter

    names = _chosen_adapters(model, adapter)
    names_active = active_adapter(model)
    contents = {name: {} for name in names}
    for layer_path, host in sorted(adapters.items()):
        for name in names:
            host.require_known_adapter("save_lora_weights")
            contents[name][layer_path] = at_layer(
                layer_path, _adapter_contents, host, name
            )
    with files.atomic_path(path) as temporary:
        adapter_file.write(temporary, model.name, contents, names_active)


def _adapter_contents(host, name):
    return (
        adapter_file.adapter_attributes(host, name),
        host.adapter_values(name),
    )


def _chosen_adapters(model, adapter):
    from keras_rnn_lora.named_adapters import active_adapter
    from keras_rnn_lora.named_adapters import list_adapters

    names = list_adapters(model)
    if adapter is None:
        return [active_adapter(model)]
    if adapter == "all":
        return names
    if adapter not in names:
        raise ValueError(
            f"Received an invalid value for `adapter`, expected None, 'all' "
            f"or one of {names}. Received: adapter={adapter!r}"
        )
    return [adapter]


def load_lora_weights(model, path, strict=True, adapter=None):
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
        adapter: the model's named adapter a one-adapter file loads into
            (default: the active one; for a model of several adapters, only
            when the file's adapter has the active one's name: otherwise
            name it, so a file never silently replaces another adapter).
            A file of several adapters loads each into the model's adapter
            of the same name (`None` or `"all"`), or only the one named.

    Returns:
        `model`, for chaining.
    """
    path = adapter_file.check_path(path)
    check_model(model, "load_lora_weights")
    adapters = lora_adapters(model)
    if not adapters:
        raise ValueError(
            f"Model '{model.name}' has no LoRA layer to load {path!r} into. "
            "To set the adapters up from the file, load it into the base "
            "model with `keras_rnn_lora.load_lora_model(model, path)`."
        )
    with adapter_file.AdapterFile(path) as opened:
        by_name = _targets(model, opened.headers(), adapter, path)
        plans = [
            (name, plan)
            for name, headers in by_name.items()
            for plan in _plans(model, adapters, opened, headers, strict, name)
        ]
    # Every check passed: only now touch the model.
    for name, (host, factors) in plans:
        host.set_adapter_values(name, factors)
    return model


def _targets(model, file_adapters, adapter, path):
    """`{model adapter name: headers}`: what of the file goes where."""
    from keras_rnn_lora.named_adapters import active_adapter
    from keras_rnn_lora.named_adapters import list_adapters

    names = list_adapters(model)
    if len(file_adapters) == 1:
        saved, headers = next(iter(file_adapters.items()))
        if adapter == "all":  # the file's one adapter, into its namesake
            adapter = saved if saved in names else None
        if adapter is None and len(names) > 1:
            active = active_adapter(model)
            if saved != active:  # its namesake, or the active one?
                choices = [saved] if saved in names else []
                raise ValueError(
                    f"The adapter file {path!r} holds adapter {saved!r}; "
                    f"model '{model.name}' has the adapters {names}, "
                    f"{active!r} active. Pass `adapter=` to say which one "
                    "it loads into: "
                    + " or ".join(f"adapter={n!r}" for n in [*choices, active])
                    + "."
                )
        return {_chosen_adapters(model, adapter)[0]: headers}
    if adapter not in (None, "all"):
        if adapter not in file_adapters:
            raise ValueError(
                f"Received an invalid value for `adapter`: the adapter file "
                f"{path!r} holds {sorted(file_adapters)}. Received: "
                f"adapter={adapter!r}"
            )
        file_adapters = {adapter: file_adapters[adapter]}
    missing = sorted(set(file_adapters) - set(names))
    if missing:
        raise ValueError(
            f"The adapter file {path!r} holds the adapters {missing}, which "
            f"model '{model.name}' lacks (it has {names}). Add them with "
            "`keras_rnn_lora.add_adapter`, or load the file into the base "
            "model with `keras_rnn_lora.load_lora_model`."
        )
    return file_adapters


def _plans(model, adapters, opened, headers, strict, name=None):
    """`[(layer, factors)]` for every layer adapter `name` of the file
    `opened` loads into, every check done."""
    path = opened.path
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
    plans, other_base = [], []
    for layer_path in matched:
        adapter, header = adapters[layer_path], headers[layer_path]
        if not adapter_file.check_header(
            layer_path, adapter, header, path, strict, name
        ):
            other_base.append(layer_path)
        factors = opened.factors(header)
        try:
            checked = adapter.check_adapter_values(
                name or adapter.active_adapter, factors
            )
            plans.append((adapter, checked))
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
    if other_base:
        warnings.warn(
            f"load_lora_weights(strict=False) loaded the adapters of "
            f"{other_base} from {path!r} into frozen base weights that "
            "differ from those they were trained on (fingerprint mismatch).",
            stacklevel=3,
        )
    return plans


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
    return {
        "rank": attributes["rank"],
        "lora_alpha": float(attributes["lora_alpha"]),
        "use_rslora": attributes["use_rslora"],
        "lora_dropout": float(attributes["lora_dropout"]),
        "lora_targets": targets,
        "use_dora": attributes["use_dora"],
        "lora_init": attributes["lora_init"],
    }


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

    path = adapter_file.check_path(path)
    check_model(model, "load_lora_model", built=True)
    if lora_adapters(model):
        raise ValueError(
            f"Model '{model.name}' already has LoRA layers "
            f"{sorted(lora_adapters(model))}: load the file into it with "
            "`keras_rnn_lora.load_lora_weights(model, path)`, or pass the "
            "base model without adapters."
        )
    with adapter_file.AdapterFile(path) as opened:
        file_adapters = opened.headers()
        for headers in file_adapters.values():
            for header in headers.values():
                header.check(path)
        names = list(file_adapters)
        active = opened.active_adapter()
        first = file_adapters[names[0]]
        groups = collections.defaultdict(set)
        for layer_path, header in first.items():
            settings = tuple(sorted(_settings(header).items()))
            groups[settings].add(_layer_name(layer_path))
        lora_model = model
        for settings, layer_names in groups.items():
            lora_model = enable_lora(
                lora_model,
                **dict(settings),
                layers=sorted(layer_names),
                adapter_name=names[0],
            )
        adapters = lora_adapters(lora_model)
        if set(adapters) != set(first):
            raise ValueError(
                f"The adapter file {path!r} describes adapters "
                f"{sorted(first)}; set up on model '{model.name}' they "
                f"are {sorted(adapters)}. Is this the base model the adapter "
                "was trained on?"
            )
        for name in names[1:]:
            for layer_path, header in file_adapters[name].items():
                settings = _settings(header)
                host = adapters[layer_path]
                # An adapter on some of the layer's kernels keeps its own;
                # Keras' own LoRA layers name their one kernel their way.
                if not set(settings["lora_targets"]) <= set(host.lora_targets):
                    settings["lora_targets"] = host.lora_targets
                at_layer(
                    layer_path,
                    host.add_banked_adapter,
                    name,
                    lora.LoRAConfig(**settings),
                )
        plans = [
            (name, plan)
            for name in names
            for plan in _plans(
                lora_model, adapters, opened, file_adapters[name], strict, name
            )
        ]
    for name, (host, factors) in plans:
        host.set_adapter_values(name, factors)
    if active in names[1:]:  # the adapter active when the file was saved
        from keras_rnn_lora.named_adapters import set_adapter

        set_adapter(lora_model, active)
    return lora_model
