"""Walking a model: every layer with its path, and the LoRA adapters in it.

Paths name what the user controls: layers of a model by their names, the
parts of a recurrent layer by their role (`cell`, `forward`, `backward`,
the position in `StackedRNNCells`). So "encoder/cell" or "bi/forward/cell"
stay the same when the same architecture is built again, even where Keras
numbered auto-generated cell names differently. Adapter files key adapters
by these paths.
"""

import keras

from keras_rnn_lora.merging import MergeableLoRA

_ROLES = {
    "forward_layer": "forward",
    "backward_layer": "backward",
    "layer": "layer",
    "cell": "cell",
}


def check_model(model, function, built=False):
    """Checks the `model` argument of the model-level function `function`:
    a `TypeError` naming it for anything but a `keras.Model`."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{function}` expects a keras.Model as `model`. Received: "
            f"model={type(model).__name__}"
            + (f" ({model!r})" if model is None else "")
            + (
                ": wrap the layer in a model first, e.g. "
                "keras.Sequential([keras.Input(shape), layer])"
                if isinstance(model, keras.layers.Layer)
                else ""
            )
        )
    if built and not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built: call it on a batch, or "
            "give it an `Input`, before converting it."
        )


def child_layers(layer):
    """`(name, child)` for the layers directly inside `layer`: a model's
    layers by name, a wrapper's parts by role."""
    children = []
    if isinstance(layer, keras.Model):
        children = [(child.name, child) for child in layer.layers]
    for attribute, role in _ROLES.items():
        child = getattr(layer, attribute, None)
        if isinstance(child, keras.layers.Layer):
            children.append((role, child))
    stacked = getattr(layer, "cells", None) or []
    children.extend((str(i), child) for i, child in enumerate(stacked))
    return children


def iter_layers(layer, path=None):
    """Yields `(path, layer)` for `layer` and everything inside it."""
    path = layer.name if path is None else path
    yield path, layer
    for name, child in child_layers(layer):
        yield from iter_layers(child, f"{path}/{name}")


def lora_adapters(model):
    """`{path: layer}` for every layer or cell of `model` that carries a
    LoRA adapter (the recurrent cells, and Dense/EinsumDense/Embedding
    adapters), paths below the model."""
    return {
        path.split("/", 1)[1]: layer
        for path, layer in iter_layers(model)
        if isinstance(layer, MergeableLoRA)
    }


def at_layer(path, function, *args):
    """`function(*args)`, a `ValueError` from it naming the layer `path`."""
    try:
        return function(*args)
    except ValueError as error:
        raise ValueError(f"Layer '{path}': {error}") from None


def require_adapters(model, function):
    """`lora_adapters(model)`, or a `ValueError` saying to convert the
    model first when it has none."""
    check_model(model, function)
    adapters = lora_adapters(model)
    if not adapters:
        raise ValueError(
            f"`{function}` found no LoRA cell or layer in model "
            f"'{model.name}'. Convert it first: "
            "`keras_rnn_lora.enable_lora(model, rank=...)`, or build it from "
            "an adapter file: `keras_rnn_lora.load_lora_model(model, path)`."
        )
    return adapters


def lora_cells(model):
    """`{path: cell}` for the recurrent LoRA cells of `model` only."""
    from keras_rnn_lora.cells import LORA_CELLS

    return {
        path: layer
        for path, layer in lora_adapters(model).items()
        if isinstance(layer, LORA_CELLS)
    }


def lora_weight_ids(model):
    """The ids of every adapter variable in `model`: the live factors and
    the named adapters' banked ones."""
    return {
        id(w)
        for adapter in lora_adapters(model).values()
        for w in (*adapter.lora_weights, *adapter.bank_weights())
    }
