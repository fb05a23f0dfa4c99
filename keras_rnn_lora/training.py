"""Training with adapters: which weights train, what they count, and
merging every adapter of a model.

    keras_rnn_lora.mark_only_lora_as_trainable(lora_model)  # the protocol
    keras_rnn_lora.lora_summary(lora_model)  # trainable: 16,384 of ...
    keras_rnn_lora.merge_lora(lora_model)  # for inference; exact unmerge
"""

import keras
import numpy as np

from keras_rnn_lora.walk import check_model
from keras_rnn_lora.walk import iter_layers
from keras_rnn_lora.walk import lora_adapters
from keras_rnn_lora.walk import lora_weight_ids

_BIAS_MODES = ("none", "all", "lora_only")


def _require_adapters(model, function):
    check_model(model, function)
    adapters = lora_adapters(model)
    if not adapters:
        raise ValueError(
            f"`{function}` found no LoRA cell or layer in model "
            f"'{model.name}'. Convert it first: `enable_lora(model, rank=...)`."
        )
    return adapters


def mark_only_lora_as_trainable(model, bias="none"):
    """Freezes every weight of `model` that is not a LoRA factor.

    Embeddings, dense layers, input kernels and biases are frozen: the
    paper's protocol. Factors of merged adapters stay frozen too. Recompile
    the model afterwards, as after any change of trainability in Keras.

    Args:
        model: a model holding LoRA adapters (see `enable_lora`).
        bias: `"none"` (default) freezes all biases; `"all"` keeps every
            bias trainable; `"lora_only"` keeps the biases of the layers and
            cells that carry an adapter trainable.

    Returns:
        `model`, for chaining.
    """
    check_model(model, "mark_only_lora_as_trainable")
    if bias not in _BIAS_MODES:
        raise ValueError(
            f"Received an invalid value for `bias`, expected one of "
            f"{_BIAS_MODES}. Received: bias={bias!r}"
        )
    adapters = lora_adapters(model)
    if not adapters:
        raise ValueError(
            f"Model '{model.name}' has no LoRA cell or layer, so nothing "
            "would stay trainable. Convert it first: `enable_lora(model, "
            "rank=...)`."
        )
    keep = lora_weight_ids(model)
    for adapter in adapters.values():
        if adapter.lora_merged:
            keep -= {id(w) for w in adapter.lora_weights}
        adapter_bias = getattr(adapter, "bias", None)
        if bias == "lora_only" and adapter_bias is not None:
            keep.add(id(adapter_bias))
    for _, layer in iter_layers(model):
        layer_bias = getattr(layer, "bias", None)
        if bias == "all" and isinstance(layer_bias, keras.Variable):
            keep.add(id(layer_bias))
    # A frozen layer hides even its trainable weights, and Keras' layer
    # `trainable` setter overwrites every weight's flag: open all layers
    # first, then set each weight's own flag.
    model.trainable = True
    for weight in model.weights:
        weight.trainable = id(weight) in keep
    return model


def _size(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def lora_summary(model, print_fn=print):
    """Counts parameters of `model`: trainable, total and in LoRA factors.

    Prints one line such as "trainable: 32,768 of 10,598,208 (0.31%)"
    (pass `print_fn=None` to stay quiet) and returns a dict with `trainable`,
    `total`, `lora`, `ratio` (trainable / total) and `layers`: per adapted
    layer or cell (by path), its class, rank and factor count.
    """
    check_model(model, "lora_summary")
    trainable = _size(model.trainable_weights)
    total = _size(model.weights)
    adapters = lora_adapters(model)
    layers = {
        path: {
            "class_name": type(adapter).__name__,
            "rank": adapter.rank,
            "lora": _size(adapter.lora_weights),
            "merged": adapter.lora_merged,
        }
        for path, adapter in adapters.items()
    }
    lora_size = sum(row["lora"] for row in layers.values())
    ratio = trainable / total if total else 0.0
    if print_fn is not None:
        print_fn(
            f"trainable: {trainable:,} of {total:,} ({100 * ratio:.2f}%); "
            f"LoRA factors: {lora_size:,}"
        )
    return {
        "trainable": trainable,
        "total": total,
        "lora": lora_size,
        "ratio": ratio,
        "layers": layers,
    }


def _at(path, function, *args):
    """Calls `function`, naming the layer `path` in a `ValueError`."""
    try:
        return function(*args)
    except ValueError as error:
        raise ValueError(f"Layer '{path}': {error}") from None


def merge_lora(model, reset=False):
    """Merges every adapter of `model` (see `LoRAGRUCell.merge_lora`).

    All merges are checked before any is made: if one would write NaN or
    Inf into a kernel, a `ValueError` names its layer and the model is left
    exactly as it was.

    Args:
        model: a model holding LoRA adapters.
        reset: `False` (default) keeps the adapters, so `unmerge_lora`
            undoes the merge exactly. `True` makes the merge permanent and
            starts a fresh adapter on the merged base (new `A`, `B = 0`),
            ready for the next round of incremental learning: the model's
            outputs are unchanged and it is unmerged.

    Returns:
        `model`, for chaining.
    """
    adapters = _require_adapters(model, "merge_lora")
    for path, adapter in adapters.items():
        if not adapter.lora_merged:
            _at(path, adapter.merged_kernels)
    for adapter in adapters.values():
        adapter.merge_lora(reset=reset)
    return model


def unmerge_lora(model):
    """Unmerges every adapter of `model`, restoring the exact weights."""
    for adapter in _require_adapters(model, "unmerge_lora").values():
        adapter.unmerge_lora()
    return model
