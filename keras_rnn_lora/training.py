"""Training with adapters: which weights train, what they count, and
merging every adapter of a model.

    keras_rnn_lora.mark_only_lora_as_trainable(lora_model)  # the protocol
    keras_rnn_lora.lora_summary(lora_model)  # trainable: 16,384 of ...
    keras_rnn_lora.merge_lora(lora_model)  # for inference; exact unmerge

Every function here that changes which weights train also refreshes a
compiled model (see `recompile`), so enable, mark, compile and fit are
right in any order.
"""

import warnings

import keras
import numpy as np

from keras_rnn_lora.merging import MergeableLoRA
from keras_rnn_lora.walk import at_layer
from keras_rnn_lora.walk import check_model
from keras_rnn_lora.walk import child_layers
from keras_rnn_lora.walk import iter_layers
from keras_rnn_lora.walk import lora_adapters
from keras_rnn_lora.walk import require_adapters

_BIAS_MODES = ("none", "all", "lora_only")


def recompile(model):
    """Recompiles a compiled `model` with its own settings (optimizer,
    loss, metrics, ...), so that what Keras compiled follows the weights
    that train now; the optimizer starts afresh. Does nothing to a model
    that is not compiled.

    Keras traces its training step and builds its optimizer over the
    trainable weights of the moment: after trainability changes, a model
    compiled before would keep training what was trainable then (or, on
    JAX, fail). The library's functions that change trainability call this
    themselves. A model whose settings cannot be rebuilt from its compile
    config (a custom `compile`, an unregistered loss function) is marked
    uncompiled instead, so that `fit` asks for `compile()` rather than
    train the wrong weights.
    """
    if getattr(model, "compiled", False):
        optimizer = getattr(model, "optimizer", None)
        built = optimizer is not None and optimizer.built
        _compile_from(model, model, model.get_compile_config())
        if built and model.compiled:  # as before: saved models load clean
            model.optimizer.build(model.trainable_variables)
    return model


def compile_like(model, source, build=False):
    """Compiles `model` with the settings `source` was compiled with, if it
    was: a fresh optimizer of the same configuration, built over what
    trains now with `build=True` (as Keras does when it loads a model),
    else at the first `fit`."""
    if getattr(source, "compiled", False):
        _compile_from(model, source, source.get_compile_config())
        if build and model.compiled and model.optimizer is not None:
            model.optimizer.build(model.trainable_variables)
    return model


def _compile_from(model, source, config):
    try:
        if type(model).compile is not keras.Model.compile or not config:
            raise TypeError("a custom compile()")
        model.compile(**keras.saving.deserialize_keras_object(config))
    except Exception:  # noqa: BLE001 - whatever fails, ask the user instead
        model.compiled = False
        warnings.warn(
            f"Model '{model.name}' needs compiling for the weights that "
            f"train now, and the compile settings of '{source.name}' could "
            "not be rebuilt from its compile config: call "
            "`model.compile(...)` before `fit` or `evaluate`.",
            stacklevel=4,
        )


def _check_bias(bias):
    if bias not in _BIAS_MODES:
        raise ValueError(
            f"Received an invalid value for `bias`, expected one of "
            f"{_BIAS_MODES}. Received: bias={bias!r}"
        )


def _named_layers(model, names):
    """The ids of every layer inside a layer of `model` named in `names`."""
    if isinstance(names, str):
        names = (names,)
    names = set(names)
    layers = list(iter_layers(model))
    known = {layer.name for _, layer in layers}
    if names - known:
        raise ValueError(
            "Received an invalid value for `trainable_layers`: model "
            f"'{model.name}' has no layer named {sorted(names - known)}. "
            f"Its layers: {sorted(known - {model.name})}"
        )
    return {
        id(inner)
        for _, layer in layers
        if layer.name in names
        for _, inner in iter_layers(layer)
    }


def mark_only_lora_as_trainable(model, bias="none", trainable_layers=()):
    """Freezes every weight of `model` that is not a LoRA factor.

    Embeddings, dense layers, input kernels and biases are frozen: the
    paper's protocol. Factors of merged adapters stay frozen too. What is
    frozen survives `model.save` and loading: layers that train nothing are
    marked `trainable=False`, and each adapter records which of its own base
    weights train (`trainable_base_weights`). A compiled model is
    recompiled with its own settings (see `recompile`).

    Args:
        model: a model holding LoRA adapters (see `enable_lora`).
        bias: `"none"` (default) freezes all biases; `"all"` keeps every
            bias trainable; `"lora_only"` keeps the biases of the layers and
            cells that carry an adapter trainable.
        trainable_layers: names of layers (at any depth) that train fully
            beside the adapters, such as a new output head (PEFT's
            `modules_to_save`). An adapted layer named here trains its
            unadapted weights too; its adapted kernels stay frozen.

    Returns:
        `model`, for chaining.
    """
    check_model(model, "mark_only_lora_as_trainable")
    _check_bias(bias)
    adapters = require_adapters(model, "mark_only_lora_as_trainable")
    full = _named_layers(model, trainable_layers)
    model.trainable = True  # open everything, then close what must be
    for adapter in adapters.values():
        if id(adapter) in full:
            adapter.set_trainable_base_weights(None)
        else:
            adapter.set_trainable_base_weights(
                () if bias == "none" else ("bias",)
            )
        for weight in adapter.lora_weights:
            weight.trainable = not adapter.lora_merged
    mixed = []
    for layer in _stock_subtrees(model):
        keep = {
            id(w)
            for _, inner in iter_layers(layer)
            for w in (
                inner.weights
                if id(inner) in full
                else [getattr(inner, "bias", None)] * (bias == "all")
            )
            if isinstance(w, keras.Variable)
        }
        weights = layer.weights
        if weights and all(id(w) in keep for w in weights):
            layer.trainable = True
        elif not keep:
            layer.trainable = False
        else:
            for weight in weights:
                weight.trainable = id(weight) in keep
            mixed.append(layer.name)
    if mixed:
        warnings.warn(
            f"Layers {mixed} now train some of their weights and not others "
            "(bias='all'). Keras saves trainability per layer, so after "
            "`model.save` and loading, all their weights train again: call "
            "`mark_only_lora_as_trainable` again after loading.",
            stacklevel=2,
        )
    return recompile(model)


def _stock_subtrees(model):
    """The outermost layers of `model` holding no adapter: every weight of
    the model outside the adapters' own layers is in one of them."""

    def holds_adapter(layer):
        return any(
            isinstance(inner, MergeableLoRA) for _, inner in iter_layers(layer)
        )

    def walk(layer):
        for _, child in child_layers(layer):
            if holds_adapter(child):
                if not isinstance(child, MergeableLoRA):
                    yield from walk(child)
            else:
                yield child

    return list(walk(model))


def count_parameters(weights):
    """The number of values in `weights` (variables or arrays), e.g.
    `count_parameters(model.trainable_weights)`."""
    return sum(int(np.prod(w.shape)) for w in weights)


def lora_summary(model, print_fn=print, by_layer=False):
    """Counts parameters of `model`: trainable, total and in LoRA factors.

    Prints one line such as "trainable: 32,768 of 10,598,208 (0.31%)"
    (pass `print_fn=None` to stay quiet), and with `by_layer=True` a table
    before it, one row per adapter: its path, class, rank, targets, factor
    count and merge state. Returns a dict with `trainable`, `total`, `lora`,
    `ratio` (trainable / total) and `layers`: per adapted layer or cell (by
    path), its class, rank, factor count and merge state.
    """
    check_model(model, "lora_summary")
    trainable = count_parameters(model.trainable_weights)
    total = count_parameters(model.weights)
    adapters = lora_adapters(model)
    layers = {
        path: {
            "class_name": type(adapter).__name__,
            "rank": adapter.rank,
            "lora": count_parameters(adapter.lora_weights),
            "merged": adapter.lora_merged,
        }
        for path, adapter in adapters.items()
    }
    lora_size = sum(row["lora"] for row in layers.values())
    ratio = trainable / total if total else 0.0
    if print_fn is not None:
        if by_layer:
            for line in _table(adapters, layers):
                print_fn(line)
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


def _table(adapters, layers):
    header = ("adapter", "class", "rank", "targets", "LoRA params", "merged")
    rows = [
        (
            path,
            row["class_name"],
            str(row["rank"]),
            "+".join(adapters[path].lora_targets),
            f"{row['lora']:,}",
            "yes" if row["merged"] else "no",
        )
        for path, row in layers.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(6)]
    numeric = {2, 4}

    def line(cells):
        return "  ".join(
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "-" * len(line(header))
    return [rule, line(header), rule, *map(line, rows), rule]


def merge_lora(model, reset=False, adapter=None):
    """Merges every adapter of `model` (see `LoRAGRUCell.merge_lora`).

    All merges are checked before any is made: if one would write NaN or
    Inf into a kernel, or round the update away in a bfloat16 or float16
    kernel (use `to_base_model(model, dtype="float32")` there), a
    `ValueError` names its layer and the model is left exactly as it was.
    Every function compiled before (Keras' `predict`, `evaluate`, a
    `tf.function`) computes the merged model correctly; a
    compiled model is recompiled, since its factors stop (or, with
    `reset=True`, start again to) train.

    Args:
        model: a model holding LoRA adapters.
        reset: `False` (default) keeps the adapters, so `unmerge_lora`
            undoes the merge exactly. `True` makes the merge permanent and
            starts a fresh adapter on the merged base (new `A`, `B = 0`),
            ready for the next round of incremental learning: the model's
            outputs are unchanged and it is unmerged.
        adapter: a named adapter to make active and merge (default: the
            active one; see `keras_rnn_lora.set_adapter`).

    Returns:
        `model`, for chaining.
    """
    adapters = require_adapters(model, "merge_lora")
    for path, host in adapters.items():
        if reset and len(host.adapter_names()) > 1:
            raise ValueError(
                f"Layer '{path}': `merge_lora(reset=True)` would change the "
                "base every named adapter of the model was trained on "
                f"({host.adapter_names()}). Delete the others first, or "
                "merge without reset."
            )
    if adapter is not None:
        from keras_rnn_lora.named_adapters import set_adapter

        set_adapter(model, adapter)
    for path, adapter in adapters.items():
        if not adapter.lora_merged:
            at_layer(path, adapter.merged_kernels)
    for adapter in adapters.values():
        adapter.merge_lora(reset=reset)
    return recompile(model)


def unmerge_lora(model):
    """Unmerges every adapter of `model`, restoring the exact weights (a
    compiled model is recompiled: its factors train again)."""
    adapters = require_adapters(model, "unmerge_lora")
    for path, adapter in adapters.items():
        at_layer(path, adapter.require_known_adapter, "unmerge_lora")
    for adapter in adapters.values():
        adapter.unmerge_lora()
    return recompile(model)
