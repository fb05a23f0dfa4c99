"""Model-level LoRA: put adapters on any Keras RNN model, train, merge them.

    lora_model = keras_rnn_lora.enable_lora(model, rank=8)
    keras_rnn_lora.mark_only_lora_as_trainable(lora_model)
    lora_model.compile(...); lora_model.fit(new_data)

Conversion works on the model's Keras config: every recurrent layer
(`SimpleRNN`, `GRU`, `LSTM`, `RNN` over a stock cell or `StackedRNNCells`,
also inside `Bidirectional` and nested models) is rewritten as
`keras.layers.RNN` over the matching LoRA cell, the model is rebuilt from the
config and the trained weights are copied in. Saving adapters to their own
file lives in `adapter_io.py`.
"""

import copy

import keras
import numpy as np
from keras import ops

from keras_rnn_lora import cells as cells_lib
from keras_rnn_lora import layers as layers_lib
from keras_rnn_lora import lora

_LORA_FOR_STOCK = {cls._keras_cell: cls for cls in cells_lib.LORA_CELLS}
_LORA_FOR_STOCK_LAYER = {
    cls._keras_layer: cls for cls in layers_lib.LORA_LAYERS
}
_STOCK_CELL_NAMES = {c.__name__ for c in _LORA_FOR_STOCK}
_RECURRENT_LAYER_NAMES = {"SimpleRNN", "GRU", "LSTM", "RNN"}
_BIAS_MODES = ("none", "all", "lora_only")

# -- walking a built model -------------------------------------------------


_ROLES = {
    "forward_layer": "forward",
    "backward_layer": "backward",
    "layer": "layer",
    "cell": "cell",
}


def iter_layers(layer, path=None):
    """Yields `(path, layer)` for `layer` and everything inside it.

    Paths name what the user controls: layers of a model by their names,
    the parts of a recurrent layer by their role (`cell`, `forward`,
    `backward`, the position in `StackedRNNCells`). So "encoder/cell" or
    "bi/forward/cell" stay the same when the same architecture is built
    again, even where Keras numbered the cells' auto-generated names.
    """
    path = layer.name if path is None else path
    yield path, layer
    children = []
    if isinstance(layer, keras.Model):
        children = [(child.name, child) for child in layer.layers]
    for attribute, role in _ROLES.items():
        child = getattr(layer, attribute, None)
        if isinstance(child, keras.layers.Layer):
            children.append((role, child))
    stacked = getattr(layer, "cells", None) or []
    children.extend((str(i), child) for i, child in enumerate(stacked))
    for name, child in children:
        yield from iter_layers(child, f"{path}/{name}")


def lora_cells(model):
    """`{path: cell}` for every LoRA cell in `model`, paths below it."""
    return {
        path.split("/", 1)[1]: layer
        for path, layer in iter_layers(model)
        if isinstance(layer, cells_lib.LORA_CELLS)
    }


def _lora_weight_ids(model):
    return {
        id(w) for cell in lora_cells(model).values() for w in cell.lora_weights
    }


def _size(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


# -- converting configs ----------------------------------------------------


def _is_keras_class(node, names):
    return (
        isinstance(node, dict)
        and node.get("class_name") in names
        and str(node.get("module", "")).startswith("keras")
        and not node.get("registered_name")
    )


def _swap_cell(cell_config, lora_args):
    """A serialized stock cell (or `StackedRNNCells`) as its LoRA twin.

    Returns `(new_config, converted)`; cells that already carry LoRA, and
    custom cells, are left as they are.
    """
    if _is_keras_class(cell_config, {"StackedRNNCells"}):
        new = dict(cell_config, config=dict(cell_config["config"]))
        converted = False
        cells = []
        for child in cell_config["config"]["cells"]:
            child, changed = _swap_cell(child, lora_args)
            cells.append(child)
            converted |= changed
        new["config"]["cells"] = cells
        return new, converted
    if not _is_keras_class(cell_config, _STOCK_CELL_NAMES):
        return cell_config, False
    stock = keras.saving.deserialize_keras_object(copy.deepcopy(cell_config))
    lora_cls = _LORA_FOR_STOCK[type(stock)]
    try:
        lora_cell = lora_cls(**stock.get_config(), **lora_args)
    except ValueError as error:
        raise ValueError(f"Cell '{stock.name}': {error}") from None
    return keras.saving.serialize_keras_object(lora_cell), True


def _swap_recurrent_layer(node, lora_args):
    """A serialized recurrent layer rewritten to run LoRA cells.

    `SimpleRNN`, `GRU` and `LSTM` become `LoRASimpleRNN`, `LoRAGRU` and
    `LoRALSTM` (which keep the cuDNN path on a GPU); `RNN` keeps its class
    with its cell(s) swapped.
    """
    # Deep copy: Keras' `from_config` pops keys from the dict it is given.
    layer = keras.saving.deserialize_keras_object(
        copy.deepcopy({k: node[k] for k in ("module", "class_name", "config")})
    )
    lora_layer_cls = _LORA_FOR_STOCK_LAYER.get(type(layer))
    if lora_layer_cls is not None:
        try:
            new_layer = lora_layer_cls.from_config(
                {**layer.get_config(), **lora_args}
            )
        except ValueError as error:
            raise ValueError(f"Cell '{layer.cell.name}': {error}") from None
        return {**node, **keras.saving.serialize_keras_object(new_layer)}, True
    cell_config, converted = _swap_cell(
        keras.saving.serialize_keras_object(layer.cell), lora_args
    )
    if not converted:
        return node, False
    rnn = keras.layers.RNN(
        keras.saving.deserialize_keras_object(cell_config),
        return_sequences=layer.return_sequences,
        return_state=layer.return_state,
        go_backwards=layer.go_backwards,
        stateful=layer.stateful,
        unroll=layer.unroll,
        zero_output_for_mask=layer.zero_output_for_mask,
        name=layer.name,
        trainable=layer.trainable,
        dtype=layer.dtype_policy,
    )
    return {**node, **keras.saving.serialize_keras_object(rnn)}, True


def _convert_config(node, lora_args, selected, wanted, seen):
    """Walks a serialized model and converts the selected recurrent layers.

    `selected` is True below a layer whose name is in `wanted` (or when
    `wanted` is None); `seen` collects the names met, to report unknown
    names. Returns `(new_node, number_converted)`.
    """
    if isinstance(node, list):
        out, count = [], 0
        for item in node:
            item, n = _convert_config(item, lora_args, selected, wanted, seen)
            out.append(item)
            count += n
        return out, count
    if not isinstance(node, dict):
        return node, 0
    config = node.get("config")
    name = config.get("name") if isinstance(config, dict) else None
    if name is not None and "class_name" in node:
        seen.add(name)
        selected = selected or wanted is None or name in wanted
    if selected and _is_keras_class(node, _RECURRENT_LAYER_NAMES):
        new, converted = _swap_recurrent_layer(node, lora_args)
        return new, int(converted)
    out, count = {}, 0
    for key, value in node.items():
        out[key], n = _convert_config(value, lora_args, selected, wanted, seen)
        count += n
    return out, count


def _copy_base_weights(source, target, values=None):
    """Copies `source`'s weights into the non-LoRA weights of `target`, in
    order, through numpy (on JAX `assign(variable)` can share a buffer that
    `fit` later donates away). `values` overrides some by `id(weight)`."""
    values = values or {}
    lora_ids = _lora_weight_ids(target)
    target_weights = [w for w in target.weights if id(w) not in lora_ids]
    source_ids = _lora_weight_ids(source)
    source_weights = [w for w in source.weights if id(w) not in source_ids]
    if len(source_weights) != len(target_weights):
        raise RuntimeError(
            f"Rebuilding model '{source.name}' gave {len(target_weights)} "
            f"base weights instead of {len(source_weights)}; please report "
            "this with the model's summary."
        )
    for src, dst in zip(source_weights, target_weights, strict=True):
        if tuple(src.shape) != tuple(dst.shape) or src.name != dst.name:
            raise RuntimeError(
                f"Rebuilding model '{source.name}' misaligned weight "
                f"'{src.path}' {tuple(src.shape)} with '{dst.path}' "
                f"{tuple(dst.shape)}; please report this."
            )
        value = values.get(id(src), src)
        dst.assign(np.array(ops.convert_to_numpy(value)))


class _ModelTypeError(TypeError, ValueError):
    """Not a Keras model. Also a `ValueError`, which 0.1.0 raised here."""


def check_model(model, function, built=False):
    """Checks the `model` argument of the model-level function `function`."""
    if not isinstance(model, keras.Model):
        raise _ModelTypeError(
            f"`{function}` expects a keras.Model as `model`. Received: "
            f"model={type(model).__name__}"
            + (f" ({model!r})" if model is None else "")
        )
    if built and not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built: call it on a batch, or "
            "give it an `Input`, before converting it."
        )


_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _check_base_dtype(base_dtype):
    """`base_dtype` as a `keras.DTypePolicy` of floating dtypes."""
    expected = (
        f"a floating dtype ({', '.join(map(repr, _FLOAT_DTYPES))}) or a "
        "mixed policy name such as 'mixed_bfloat16'"
    )
    try:
        policy = keras.DTypePolicy(base_dtype)
    except (ValueError, TypeError):
        policy = None
    if policy is None or not {
        policy.variable_dtype,
        policy.compute_dtype,
    } <= set(_FLOAT_DTYPES):
        raise ValueError(
            f"Received an invalid value for `base_dtype`, expected "
            f"{expected}. Received: base_dtype={base_dtype!r}"
        )
    return policy


def _subclassed_error(model):
    return ValueError(
        f"enable_lora cannot convert model '{model.name}': it is a "
        f"subclassed keras.Model ({type(model).__name__}) whose config does "
        "not describe its layers, so it cannot be rebuilt with LoRA layers. "
        "Build it with the functional or Sequential API, or use the LoRA "
        "layers in its code directly: keras_rnn_lora.LoRAGRU(units, "
        "rank=...) for keras.layers.GRU (LoRALSTM, LoRASimpleRNN likewise), "
        "or keras.layers.RNN(keras_rnn_lora.LoRAGRUCell(units, rank=...))."
    )


def enable_lora(
    model,
    rank,
    *,
    lora_alpha=None,
    use_rslora=False,
    lora_dropout=0.0,
    lora_targets=("recurrent",),
    layers=None,
    base_dtype=None,
):
    """Returns a copy of `model` whose recurrent layers run LoRA cells.

    Every `keras.layers.SimpleRNN`, `GRU`, `LSTM` and `keras.layers.RNN`
    over a stock cell or `StackedRNNCells` (also inside `Bidirectional` and
    nested functional or Sequential models) becomes `keras.layers.RNN` over
    the matching LoRA cell, carrying the trained weights. Until the adapters
    train, the new model's outputs equal `model`'s. `model` is left
    unchanged; calling this twice gives two independent LoRA models.
    Recurrent layers that already carry LoRA are kept as they are.

    Args:
        model: a built functional or Sequential `keras.Model`.
        rank: the LoRA rank, `1 <= rank <= units` of every converted layer.
        lora_alpha, use_rslora, lora_dropout, lora_targets: as for the
            cells (`keras_rnn_lora.LoRAGRUCell`).
        layers: optional names of the layers to convert (a name also
            converts every recurrent layer inside that layer or sub-model).
            Default: all of them.
        base_dtype: optional floating dtype, e.g. `"bfloat16"`, in which
            every layer stores and computes its (frozen) weights (or a
            policy name such as `"mixed_bfloat16"`); the LoRA factors and
            their branch stay float32. Halves the base's memory and, on
            CPUs with bfloat16 matmuls, speeds the frozen work up.

    Returns:
        A new `keras.Model` of the same architecture.

    Example:

    >>> lora_model = keras_rnn_lora.enable_lora(model, rank=8)
    >>> keras_rnn_lora.mark_only_lora_as_trainable(lora_model)
    """
    check_model(model, "enable_lora", built=True)
    if base_dtype is not None:
        base_dtype = _check_base_dtype(base_dtype)
    lora_args = {
        "rank": rank,
        "lora_alpha": lora_alpha,
        "use_rslora": use_rslora,
        "lora_dropout": lora_dropout,
        "lora_targets": lora_targets,
    }
    wanted = None
    if layers is not None:
        wanted = {layers} if isinstance(layers, str) else set(layers)
    seen = set()
    config, converted = _convert_config(
        keras.saving.serialize_keras_object(model),
        lora_args,
        False,
        wanted,
        seen,
    )
    if wanted is not None and wanted - seen:
        raise ValueError(
            f"Received an invalid value for `layers`: model '{model.name}' "
            f"has no layer named {sorted(wanted - seen)}. "
            f"Its layers: {[layer.name for layer in model.layers]}"
        )
    if converted == 0:
        has_recurrent = any(
            isinstance(layer, keras.layers.RNN)
            for _, layer in iter_layers(model)
        )
        if has_recurrent and not lora_cells(model) and wanted is None:
            raise _subclassed_error(model)
        already = lora_cells(model)
        detail = (
            f"it already carries LoRA in {sorted(already)}"
            if already
            else "it has no SimpleRNN, GRU, LSTM or RNN layer over a stock cell"
        )
        raise ValueError(
            f"enable_lora found no recurrent layer to convert in model "
            f"'{model.name}'{'' if wanted is None else f' under {wanted}'}: "
            f"{detail}."
        )
    if base_dtype is not None:
        config = _with_dtype(config, base_dtype)
    lora_model = keras.saving.deserialize_keras_object(config)
    _copy_base_weights(model, lora_model)
    _copy_lora_weights(model, lora_model)
    return lora_model


def _with_dtype(node, dtype):
    """Sets the dtype policy of every layer (not the inputs) in a config."""
    if isinstance(node, list):
        return [_with_dtype(item, dtype) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _with_dtype(value, dtype) for key, value in node.items()}
    config = out.get("config")
    is_input = node.get("class_name") == "InputLayer"
    if "class_name" in node and isinstance(config, dict) and not is_input:
        if "dtype" in config and "module" in node:
            config["dtype"] = keras.saving.serialize_keras_object(dtype)
        initializer = config.get("recurrent_initializer")
        if isinstance(initializer, dict) and (
            initializer.get("class_name") == "Orthogonal"
        ):
            # No backend has a bfloat16 QR; the copied trained weights
            # replace whatever is initialized, so any initializer will do.
            config["recurrent_initializer"] = "glorot_uniform"
    return out


def _copy_lora_weights(source, target):
    """Carries cells that already had LoRA (factors, merge state, pre-merge
    kernels) into the new model, through the cells' own store format."""
    target_cells = lora_cells(target)
    for path, cell in lora_cells(source).items():
        store = {}
        cell.save_own_variables(store)
        target_cells[path].load_own_variables(store)


# -- trainability and counting ---------------------------------------------


def mark_only_lora_as_trainable(model, bias="none"):
    """Freezes every weight of `model` that is not a LoRA factor.

    Embeddings, dense layers, input kernels and biases are frozen: the
    paper's protocol. Recompile the model afterwards, as after any change of
    trainability in Keras.

    Args:
        model: a model holding LoRA cells (see `enable_lora`).
        bias: `"none"` (default) freezes all biases; `"all"` keeps every
            bias trainable; `"lora_only"` keeps the biases of the LoRA cells
            trainable.

    Returns:
        `model`, for chaining.
    """
    check_model(model, "mark_only_lora_as_trainable")
    if bias not in _BIAS_MODES:
        raise ValueError(
            f"Received an invalid value for `bias`, expected one of "
            f"{_BIAS_MODES}. Received: bias={bias!r}"
        )
    cells = lora_cells(model)
    if not cells:
        raise ValueError(
            f"Model '{model.name}' has no LoRA cell, so nothing would stay "
            "trainable. Convert it first: `enable_lora(model, rank=...)`."
        )
    keep = _lora_weight_ids(model)
    for cell in cells.values():
        if cell.lora_merged:
            keep -= {id(w) for w in cell.lora_weights}
        if bias == "lora_only" and cell.bias is not None:
            keep.add(id(cell.bias))
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


def lora_summary(model, print_fn=print):
    """Counts parameters of `model`: trainable, total and in LoRA factors.

    Prints one line such as "trainable: 32,768 of 10,598,208 (0.31%)"
    (pass `print_fn=None` to stay quiet) and returns a dict with `trainable`,
    `total`, `lora` and `ratio` (trainable / total).
    """
    check_model(model, "lora_summary")
    trainable = _size(model.trainable_weights)
    total = _size(model.weights)
    cells = lora_cells(model).values()
    lora_size = _size([w for cell in cells for w in cell.lora_weights])
    ratio = trainable / total if total else 0.0
    summary = {
        "trainable": trainable,
        "total": total,
        "lora": lora_size,
        "ratio": ratio,
    }
    if print_fn is not None:
        print_fn(
            f"trainable: {trainable:,} of {total:,} ({100 * ratio:.2f}%); "
            f"LoRA factors: {lora_size:,}"
        )
    return summary


# -- merging ---------------------------------------------------------------


def _require_lora(model, function):
    check_model(model, function)
    cells = lora_cells(model)
    if not cells:
        raise ValueError(
            f"`{function}` found no LoRA cell in model '{model.name}'. "
            "Convert it first: `enable_lora(model, rank=...)`."
        )
    return cells


def _at(path, function, *args):
    """Calls `function`, naming the layer `path` in a `ValueError`."""
    try:
        return function(*args)
    except ValueError as error:
        raise ValueError(f"Layer '{path}': {error}") from None


def merge_lora(model, reset=False):
    """Merges every LoRA cell of `model` (see `LoRAGRUCell.merge_lora`).

    All merges are checked before any is made: if one would write NaN or
    Inf into a kernel, a `ValueError` names its layer and the model is left
    exactly as it was.

    Args:
        model: a model holding LoRA cells.
        reset: `False` (default) keeps the adapters, so `unmerge_lora`
            undoes the merge exactly. `True` makes the merge permanent and
            starts a fresh adapter on the merged base (new `A`, `B = 0`),
            ready for the next round of incremental learning: the model's
            outputs are unchanged and it is unmerged.

    Returns:
        `model`, for chaining.
    """
    cells = _require_lora(model, "merge_lora")
    for path, cell in cells.items():
        if not cell.lora_merged:
            _at(path, cell.merged_kernels)
    for cell in cells.values():
        cell.merge_lora(reset=reset)
    return model


def unmerge_lora(model):
    """Unmerges every LoRA cell of `model`, restoring the exact weights."""
    for cell in _require_lora(model, "unmerge_lora").values():
        cell.unmerge_lora()
    return model


def _stock_config(node):
    """A serialized model with every LoRA cell replaced by its stock cell."""
    if isinstance(node, list):
        return [_stock_config(item) for item in node]
    if not isinstance(node, dict):
        return node
    lora_classes = {
        cls.__name__: cls
        for cls in (*cells_lib.LORA_CELLS, *layers_lib.LORA_LAYERS)
    }
    lora_cls = lora_classes.get(node.get("class_name"))
    if lora_cls is not None and "config" in node:
        config = {
            k: v
            for k, v in node["config"].items()
            if k not in lora.LORA_CONFIG_KEYS
        }
        stock_cls = (
            getattr(lora_cls, "_keras_cell", None) or lora_cls._keras_layer
        )
        stock = stock_cls.from_config(copy.deepcopy(config))
        return {**node, **keras.saving.serialize_keras_object(stock)}
    return {key: _stock_config(value) for key, value in node.items()}


def to_base_model(model):
    """The same architecture with stock Keras cells and merged weights.

    The result needs nothing from this library to load or serve, and its
    outputs equal `model`'s (merged or not). `model` is left unchanged.
    """
    check_model(model, "to_base_model", built=True)
    cells = _require_lora(model, "to_base_model")
    merged_values = {}
    for path, cell in cells.items():
        if cell.lora_merged:  # the kernels already hold the merge
            continue
        for target, value in _at(path, cell.merged_kernels).items():
            kernel = getattr(cell, lora.KERNEL_ATTRIBUTES[target])
            merged_values[id(kernel)] = value
    base = keras.saving.deserialize_keras_object(
        _stock_config(keras.saving.serialize_keras_object(model))
    )
    _copy_base_weights(model, base, merged_values)
    return base
