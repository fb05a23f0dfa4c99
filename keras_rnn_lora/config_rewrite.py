"""Rewriting a model's Keras config: its recurrent layers (and, for
model-wide targets, its Dense/EinsumDense/Embedding layers) as LoRA layers,
and LoRA layers back as stock Keras layers.

`enable_lora` and `to_base_model` (convert.py) work on the serialized model:
the layers in it are rewritten (`GRU` -> `LoRAGRU`, `keras.layers.RNN` over
a stock cell -> the same `RNN` over the LoRA cell, also inside
`Bidirectional`, `StackedRNNCells`, nested models and models whose config
nests their sub-models), then the model is rebuilt from the config.
"""

import copy

import keras

from keras_rnn_lora import lora
from keras_rnn_lora.cells import LORA_CELLS
from keras_rnn_lora.keras_lora import KERAS_LORA_LAYERS
from keras_rnn_lora.keras_lora import LORA_LAYER_FOR_TARGET
from keras_rnn_lora.layers import LORA_LAYERS

#: Keras class name -> its LoRA twin, for the recurrent cells and layers.
LORA_CELL_FOR = {cls.stock_class.__name__: cls for cls in LORA_CELLS}
LORA_LAYER_FOR = {cls.stock_class.__name__: cls for cls in LORA_LAYERS}
#: LoRA class name -> its stock Keras twin.
STOCK_FOR = {
    cls.__name__: cls.stock_class
    for cls in (*LORA_CELLS, *LORA_LAYERS, *KERAS_LORA_LAYERS)
}
#: Keras class name -> (model-wide target, its LoRA twin).
KERAS_LORA_FOR = {
    cls.stock_class.__name__: (target, cls)
    for target, cls in LORA_LAYER_FOR_TARGET.items()
}


def _is_keras_class(node, names):
    return (
        isinstance(node, dict)
        and node.get("class_name") in names
        and str(node.get("module", "")).startswith("keras")
        and not node.get("registered_name")
    )


def _from_config(node):
    # Deep copy: Keras' `from_config` pops keys from the dict it is given.
    return keras.saving.deserialize_keras_object(copy.deepcopy(node))


def _serialized(layer, node):
    """`layer` serialized, keeping what else `node` carried (the functional
    graph's `inbound_nodes`, for one)."""
    return {**node, **keras.saving.serialize_keras_object(layer)}


def _lora_cell(node, lora_args):
    """A serialized stock cell (or `StackedRNNCells`) as its LoRA twin:
    `(new_node, converted)`. LoRA cells and custom cells stay as they are."""
    if _is_keras_class(node, {"StackedRNNCells"}):
        cells = [
            _lora_cell(child, lora_args) for child in node["config"]["cells"]
        ]
        config = {**node["config"], "cells": [cell for cell, _ in cells]}
        return {**node, "config": config}, any(done for _, done in cells)
    if not _is_keras_class(node, set(LORA_CELL_FOR)):
        return node, False
    stock = _from_config(node)
    cell = LORA_CELL_FOR[node["class_name"]](**stock.get_config(), **lora_args)
    return _serialized(cell, node), True


def _lora_recurrent_layer(node, lora_args):
    """A serialized recurrent layer rewritten to run LoRA cells:
    `(new_node, converted)`. `SimpleRNN`, `GRU` and `LSTM` become
    `LoRASimpleRNN`, `LoRAGRU` and `LoRALSTM` (which keep the fused path on
    a GPU); `RNN` keeps its class with its cell swapped."""
    if node["class_name"] == "RNN":
        try:
            cell, converted = _lora_cell(node["config"]["cell"], lora_args)
        except ValueError as error:
            name = node["config"].get("name")
            raise ValueError(f"Layer '{name}': {error}") from None
        return {**node, "config": {**node["config"], "cell": cell}}, converted
    stock = _from_config(node)
    try:
        layer = LORA_LAYER_FOR[node["class_name"]].from_config(
            {**stock.get_config(), **lora_args}
        )
    except ValueError as error:
        raise ValueError(f"Layer '{stock.name}': {error}") from None
    return _serialized(layer, node), True


def _lora_keras_layer(node, lora_cls, keras_args):
    """A serialized Keras `Dense`/`EinsumDense`/`Embedding` as its LoRA twin,
    which enables Keras' own LoRA on it."""
    stock = _from_config(node)
    try:
        lora_cls.check_dora(keras_args.get("use_dora", False))
    except ValueError as error:
        raise ValueError(f"Layer '{stock.name}': {error}") from None
    config = stock.get_config()
    # Keras' own LoRA settings become ours (`keras_args`).
    config.pop("lora_rank", None)
    config.pop("lora_alpha", None)
    try:
        layer = lora_cls.from_config({**config, **keras_args})
    except ValueError as error:
        raise ValueError(f"Layer '{stock.name}': {error}") from None
    return _serialized(layer, node)


def _keras_lora_settings(node):
    """The rank and alpha of Keras' own LoRA on a serialized layer, or
    `None` when it has none."""
    config = node.get("config") if isinstance(node, dict) else None
    if not isinstance(config, dict) or not config.get("lora_rank"):
        return None
    rank = config["lora_rank"]
    return {"rank": rank, "lora_alpha": config.get("lora_alpha") or rank}


class Conversion:
    """One walk over a serialized model, converting the selected layers:
    recurrent layers for the cell targets ("recurrent", "kernel"), Keras'
    Dense/EinsumDense/Embedding for theirs."""

    def __init__(self, settings, wanted, adapter_name=None):
        cell_targets = [
            t for t in settings.lora_targets if t in lora.CELL_TARGETS
        ]
        named = {"active_adapter": adapter_name} if adapter_name else {}
        self.cell_args = (
            {**settings.to_dict(), "lora_targets": cell_targets, **named}
            if cell_targets
            else None
        )
        keras_args = {**settings.to_dict(), **named}
        del keras_args["lora_targets"]
        self.keras_args = keras_args
        self.layer_targets = set(settings.lora_targets) & set(
            lora.LAYER_TARGETS
        )
        if self.layer_targets and settings.lora_dropout:
            raise ValueError(
                "Received an invalid value for `lora_dropout`, expected 0 "
                f"with `lora_targets` {sorted(self.layer_targets)}: Keras' "
                "own LoRA on Dense/EinsumDense/Embedding has no dropout (LoRA "
                "dropout applies to the recurrent adapters). Received: "
                f"lora_dropout={settings.lora_dropout}"
            )
        self.wanted = wanted  # layer names to convert below; None: all
        self.seen = set()  # every layer name met, to report unknown ones
        self.converted = 0
        self.adopted = set()  # layers that had Keras' own LoRA
        self.untargeted = {}  # named layer -> the target it would need

    def walk(self, node, selected=False):
        if isinstance(node, list):
            return [self.walk(item, selected) for item in node]
        if not isinstance(node, dict):
            return node
        config = node.get("config")
        name = config.get("name") if isinstance(config, dict) else None
        if name is not None and "class_name" in node:
            self.seen.add(name)
            selected = selected or self.wanted is None or name in self.wanted
        recurrent = set(LORA_LAYER_FOR) | {"RNN"}
        if selected and self.cell_args and _is_keras_class(node, recurrent):
            node, converted = _lora_recurrent_layer(node, self.cell_args)
            self.converted += converted
            return node
        class_name = node.get("class_name")
        target, lora_cls = KERAS_LORA_FOR.get(class_name, (None, None))
        keras_lora = _keras_lora_settings(node)
        if keras_lora and _is_keras_class(node, {class_name}):
            if lora_cls is None:
                raise ValueError(
                    f"Layer '{name}' ({class_name}) has Keras' own LoRA "
                    "enabled (`enable_lora`), which this library adopts on "
                    "Dense, EinsumDense and Embedding only: its factors "
                    "would train nowhere. Build the model without it, or "
                    "merge it into the kernel first."
                )
            # Keras' own adapter becomes one of ours, with its values.
            self.adopted.add(name)
            self.converted += 1
            return _lora_keras_layer(
                node,
                lora_cls,
                {
                    **self.keras_args,
                    **keras_lora,
                    "use_rslora": False,
                    "lora_dropout": 0.0,
                    "use_dora": False,
                    "lora_init": "default",
                },
            )
        if (
            selected
            and target in self.layer_targets
            and _is_keras_class(node, {class_name})
        ):
            self.converted += 1
            return _lora_keras_layer(node, lora_cls, self.keras_args)
        if (
            name is not None
            and self.wanted
            and name in self.wanted
            and target is not None
        ):
            self.untargeted[name] = target
        return {key: self.walk(value, selected) for key, value in node.items()}


def with_dtype(node, policy):
    """Sets the dtype policy of every layer (not the inputs) in a config."""
    if isinstance(node, list):
        return [with_dtype(item, policy) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: with_dtype(value, policy) for key, value in node.items()}
    config = out.get("config")
    is_input = node.get("class_name") == "InputLayer"
    if "class_name" in node and isinstance(config, dict) and not is_input:
        if "dtype" in config and "module" in node:
            config["dtype"] = keras.saving.serialize_keras_object(policy)
        initializer = config.get("recurrent_initializer")
        if isinstance(initializer, dict) and (
            initializer.get("class_name") == "Orthogonal"
        ):
            # No backend has a bfloat16 QR; the copied trained weights
            # replace whatever is initialized, so any initializer will do.
            config["recurrent_initializer"] = "glorot_uniform"
    return out


def stock_config(node):
    """A serialized model with every LoRA cell and layer replaced by its
    stock Keras twin."""
    if isinstance(node, list):
        return [stock_config(item) for item in node]
    if not isinstance(node, dict):
        return node
    stock_cls = STOCK_FOR.get(node.get("class_name"))
    if stock_cls is not None and "config" in node:
        config = {
            k: v
            for k, v in node["config"].items()
            if k not in lora.LORA_CONFIG_KEYS
        }
        stock = stock_cls.from_config(copy.deepcopy(config))
        return _serialized(stock, node)
    return {key: stock_config(value) for key, value in node.items()}
