"""Many adapters, one base: named adapters in a model, and mixed batches.

    lora_model = keras_rnn_lora.enable_lora(base, rank=8)  # adapter "default"
    keras_rnn_lora.add_adapter(lora_model, "news")
    keras_rnn_lora.set_adapter(lora_model, "news")  # trains and runs "news"
    keras_rnn_lora.list_adapters(lora_model)  # ["default", "news"]
    with keras_rnn_lora.disable_adapters(lora_model):
        lora_model(x)  # the base model
    keras_rnn_lora.call_with_adapters(lora_model, x, ["news", "default"])

A named adapter covers the layers and kernels of the model's adapters,
with its own `LoRAConfig` (rank, alpha, scaling rule, DoRA). The active one
computes and trains; the others wait in each layer's bank
(`adapter_bank.py`). Everything here changes variable values only, so
functions compiled before see the change; what changes which weights train
recompiles a compiled model (`training.recompile`).
"""

import contextlib
import contextvars
import math

import numpy as np

from keras_rnn_lora import lora
from keras_rnn_lora import routing
from keras_rnn_lora import variants
from keras_rnn_lora.checks import check_adapter_name
from keras_rnn_lora.training import recompile
from keras_rnn_lora.walk import at_layer
from keras_rnn_lora.walk import require_adapters

# Set within `disable_adapters`: no mixed batch there.
_DISABLED = contextvars.ContextVar("keras_rnn_lora_disabled", default=False)

#: What `call_with_adapters` and the export take for "no adapter".
NO_ADAPTER = (None, "", "base")


def list_adapters(model):
    """The names of the model's adapters, in the order they were added (the
    first is the one `enable_lora` made, `"default"` unless named); the
    indices `call_with_adapters` takes are positions in this list."""
    adapters = require_adapters(model, "list_adapters")
    names = None
    for path, adapter in adapters.items():
        held = adapter.adapter_names()
        if names is None:
            names = held
        elif held != names:
            raise ValueError(
                f"Layer '{path}' holds the adapters {held}, other layers "
                f"{names}: the model's adapters were changed layer by layer. "
                "Use the model-level functions (add_adapter, set_adapter, "
                "delete_adapter)."
            )
    return list(names)


def active_adapter(model):
    """The name of the adapter that computes and trains."""
    list_adapters(model)  # every layer agrees
    return next(
        iter(require_adapters(model, "active_adapter").values())
    ).active_adapter


def add_adapter(model, name, config=None, **lora_kwargs):
    """Adds a fresh adapter `name` (`B = 0`: it changes nothing until it
    trains) to every layer that carries one, with its own settings.

    Args:
        model: a model holding LoRA adapters (see `enable_lora`).
        name: the new adapter's name (letters, digits, `_`, `-`; not
            `"base"` or `"all"`).
        config: its `LoRAConfig`; default: each layer's own. Its targets
            must be the model's adapters' targets (a named adapter covers
            the kernels the model's adapters do); `lora_init` must be
            `"default"`.
        **lora_kwargs: instead of `config`, settings changed from each
            layer's own (`rank=16`, `use_dora=True`, ...). A new `rank`
            without `lora_alpha` keeps the layer's scale (`alpha / rank`,
            or `alpha / sqrt(rank)` with rsLoRA): alpha follows the rank.

    Returns:
        `model`, for chaining.
    """
    adapters = require_adapters(model, "add_adapter")
    check_adapter_name(name)
    if config is not None and lora_kwargs:
        raise ValueError(
            "Pass the new adapter's settings either as `config=LoRAConfig"
            "(...)` or as keyword arguments, not both."
        )
    if config is not None and not isinstance(config, lora.LoRAConfig):
        raise TypeError(
            "Received an invalid value for `config`, expected a "
            f"keras_rnn_lora.LoRAConfig. Received: config={config!r}"
        )
    if name in list_adapters(model):
        raise ValueError(
            f"Model '{model.name}' already has an adapter {name!r}."
        )
    plans = []
    for path, adapter in adapters.items():
        layer_config = _layer_config(adapter, config, lora_kwargs, path)
        at_layer(path, adapter.check_addable, name, layer_config)
        plans.append((path, adapter, layer_config))
    for path, adapter, layer_config in plans:
        at_layer(path, adapter.add_banked_adapter, name, layer_config)
    return recompile(model)


def _layer_config(adapter, config, lora_kwargs, path):
    """The new adapter's config in one layer: the layer's own targets (in
    its own terms: "kernel" for a Dense), the rest from `config` or the
    layer's config changed by `lora_kwargs`."""
    own = adapter.lora_config
    if config is None:
        changes = {"lora_init": "default", **lora_kwargs}
        rank = lora_kwargs.get("rank")
        if isinstance(rank, int) and rank > 0 and "lora_alpha" not in changes:
            # A new rank keeps the layer's scale: alpha follows the rank.
            root = changes.get("use_rslora", own.use_rslora)
            changes["lora_alpha"] = own.scaling * (
                math.sqrt(rank) if root is True else rank
            )
        try:
            return own.replace(**changes)
        except TypeError as error:
            raise TypeError(f"add_adapter: {error}") from None
    wanted = set(config.lora_targets)
    held = set(own.lora_targets)
    layer_target = getattr(adapter, "model_target", None)
    if layer_target is not None:  # Dense/EinsumDense/Embedding: one kernel
        held = {layer_target}
    if not held <= wanted:
        raise ValueError(
            f"Layer '{path}' carries adapters on {sorted(held)}; the new "
            f"adapter's lora_targets {list(config.lora_targets)} do not "
            "cover it. A named adapter covers the kernels the model's "
            "adapters do: convert other layers with enable_lora."
        )
    return config.replace(lora_targets=own.lora_targets)


def set_adapter(model, name):
    """Makes adapter `name` the one that computes and trains (the one
    active before waits in the bank). A compiled model is recompiled: the
    optimizer's state belonged to the other adapter.

    Raises:
        ValueError: an unknown name; the model is merged; the adapter's
            rank, targets, scale or DoRA differ from the trainable one's
            (such an adapter can be served, not made active).
    """
    adapters = require_adapters(model, "set_adapter")
    _require_known(model, name)
    for path, adapter in adapters.items():
        at_layer(path, adapter.check_activatable, name)
    for adapter in adapters.values():
        adapter.activate(name)
    return recompile(model)


def delete_adapter(model, name):
    """Removes adapter `name` (not the active one) from every layer."""
    adapters = require_adapters(model, "delete_adapter")
    _require_known(model, name)
    if name == active_adapter(model):
        raise ValueError(
            f"Adapter {name!r} is active: make another one active first "
            "(`keras_rnn_lora.set_adapter`)."
        )
    for adapter in adapters.values():
        adapter.remove_banked_adapter(name)
    return recompile(model)


@contextlib.contextmanager
def disable_adapters(model):
    """Within the block the model computes its base: every adapter off
    (merged ones too). The adapters' values are restored on leaving, even
    after an error. The base is the frozen kernels: after a PiSSA or OLoRA
    conversion, the residual `W - s*A0@B0`, not the pre-trained `W` (as
    in PEFT); the same holds for `"base"` in a mixed batch and the
    export."""
    adapters = require_adapters(model, "disable_adapters")
    saved = []
    token = _DISABLED.set(True)
    try:
        for adapter in adapters.values():
            saved.extend(_switch_off(adapter))
        yield model
    finally:
        _DISABLED.reset(token)
        for variable, value in reversed(saved):
            variable.assign(value)


def _switch_off(adapter):
    """Sets the live `B` to zero (and DoRA's magnitude to the column norms,
    a scale of 1; a merged kernel back to its pre-merge value); returns
    `(variable, value)` to restore."""
    saved = []
    for target in adapter.lora_targets:
        kernel = adapter.lora_kernel(target)
        if adapter.lora_merged:
            adapter.require_known_adapter("disable_adapters")
            saved.append((kernel, lora.to_numpy(kernel)))
            kernel.assign(adapter.base_kernel(target))
        b = adapter.lora_factors(target)[1]
        saved.append((b, lora.to_numpy(b)))
        b.assign(np.zeros(b.shape, "float32"))
        magnitude = adapter.lora_magnitude(target)
        if magnitude is not None:
            saved.append((magnitude, lora.to_numpy(magnitude)))
            norms = variants.column_norms_numpy(lora.to_numpy(kernel))
            magnitude.assign(norms.astype("float32"))
    return saved


def adapter_ids(model, adapters):
    """Per-example indices into `list_adapters(model)` for `adapters` (names,
    or indices; `None`, `""` or `"base"` for no adapter: -1)."""
    names = list_adapters(model)
    ids = []
    for position, adapter in enumerate(adapters):
        if adapter in NO_ADAPTER:
            ids.append(-1)
        elif isinstance(adapter, str):
            if adapter not in names:
                raise ValueError(
                    f"Unknown adapter {adapter!r} for example {position}; "
                    f"model '{model.name}' has {names}."
                )
            ids.append(names.index(adapter))
        elif (
            isinstance(adapter, (int, np.integer))
            and not isinstance(adapter, bool)
            and -1 <= adapter < len(names)
        ):
            ids.append(int(adapter))
        else:
            raise ValueError(
                f"Received an invalid adapter {adapter!r} for example "
                f"{position}: expected one of {names}, an index below "
                f"{len(names)}, or None for the base model."
            )
    return np.asarray(ids, "int32")


def call_with_adapters(model, inputs, adapters):
    """Runs `model` on `inputs` (inference), example `b` with adapter
    `adapters[b]`: a name, an index into `list_adapters(model)`, or `None`
    (also `""` or `"base"`) for the base model. Every layer gathers each
    example's factors once per call; the recurrent step stays factored.
    Works eagerly and inside a `tf.function` or `jax.jit` (pass the ids as
    a tensor with `routed_call`).

    Returns:
        The model's outputs.
    """
    if isinstance(adapters, str):
        raise TypeError(
            "Received an invalid value for `adapters`, expected one adapter "
            f"per example (a list), not a string. Received: {adapters!r}"
        )
    adapters = list(adapters)
    ids = adapter_ids(model, adapters)
    return routed_call(model, inputs, ids)


def routed_call(model, inputs, ids):
    """`model(inputs)` with per-example adapter indices `ids` (a tensor or
    array, -1 for none): the traceable core of `call_with_adapters`."""
    if _DISABLED.get():
        raise ValueError(
            "A mixed batch within `disable_adapters` would run the active "
            "adapter's examples on the base and the others on their own "
            "adapters. Leave the block and give `None` to the examples that "
            "should run on the base."
        )
    names = list_adapters(model)
    adapters = require_adapters(model, "call_with_adapters")
    for path, adapter in adapters.items():
        at_layer(path, adapter.require_routable)
    _check_ids(ids, len(names), inputs)
    try:
        with routing.routed(names, ids):
            return model(inputs, training=False)
    finally:
        routing.reset_call_caches(adapters.values())


def _check_ids(ids, count, inputs):
    """Known ids (-1 to `count - 1`), one per example, where they are known
    before the call (NumPy arrays and eager tensors)."""
    try:
        values = np.asarray(ids)
    except Exception:  # a symbolic tensor: checked by the trace's shapes
        return
    if values.dtype == object or values.ndim != 1:
        raise ValueError(
            "Received an invalid value for `ids`, expected one integer per "
            f"example. Received: shape={values.shape}"
        )
    if values.size and (values.min() < -1 or values.max() >= count):
        raise ValueError(
            f"Received an invalid value for `ids`, expected indices from -1 "
            f"to {count - 1}. Received: {values.tolist()}"
        )
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    if isinstance(first, (list, tuple)):
        first = first[0]
    batch = getattr(first, "shape", (None,))[0]
    if batch is not None and values.shape[0] != batch:
        raise ValueError(
            f"Received {values.shape[0]} adapter ids for a batch of {batch} "
            "examples: give one per example."
        )


def _require_known(model, name):
    names = list_adapters(model)
    if name == "base":
        raise ValueError(
            "'base' is the model without adapters, not an adapter: run it "
            "within `keras_rnn_lora.disable_adapters(model)`."
        )
    if name not in names:
        raise ValueError(
            f"Model '{model.name}' has no adapter {name!r}; it has {names}."
        )
