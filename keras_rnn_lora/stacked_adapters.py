"""Stacked adapters: the sum of several adapters' updates as one adapter.

    keras_rnn_lora.add_stacked_adapter(model, "news+legal", ["news", "legal"])
    keras_rnn_lora.call_with_adapters(model, x, ["news+legal", "news"])

Two LoRA updates `s1 * A1 @ B1` and `s2 * A2 @ B2` of one kernel add up to
one factored update of rank `r1 + r2`:

    s1 * A1 @ B1 + s2 * A2 @ B2 = [A1 A2] @ [[s1 * B1], [s2 * B2]]

`A` stacked along the rank axis, each `B` times its own scale stacked
along it too, at a scale of 1. The stacked adapter is a named adapter like
any other (served per example, exported, saved): it represents the model
with each adapter's increment merged one after the other, without touching
the base. Its rank is the sum of the ranks, and so is its per-step cost.
"""

import numpy as np

from keras_rnn_lora.checks import check_adapter_name
from keras_rnn_lora.named_adapters import NO_ADAPTER
from keras_rnn_lora.named_adapters import list_adapters
from keras_rnn_lora.training import recompile
from keras_rnn_lora.walk import at_layer
from keras_rnn_lora.walk import require_adapters


def add_stacked_adapter(model, name, adapters):
    """Adds adapter `name` whose update is the sum of the updates of
    `adapters`, each with its own scale (see module).

    The new adapter's factors are copies: training or deleting an adapter
    it was stacked from later does not change it. Its `LoRAConfig` is the
    layer's own with `rank` the sum of the ranks and a scale of 1
    (`lora_alpha = rank`, no rsLoRA); unless that equals the trainable
    adapter's rank it can be served (`call_with_adapters`, the export,
    `to_base_model(model, adapter=name)`) but not made active.

    Args:
        model: a model holding named adapters (see `add_adapter`).
        name: the new adapter's name.
        adapters: the names of the adapters to stack (at least one, each
            once, from `list_adapters(model)`).

    Returns:
        `model`, for chaining.

    Raises:
        ValueError: an invalid or taken `name`; an unknown, repeated or
            missing name in `adapters`; an adapter that uses DoRA (its
            update is a column rescaling of the kernel, not a sum); or
            adapters on different kernels of one layer.

    Reference: PEFT's `add_weighted_adapter(..., combination_type="cat")`.
    """
    layers = require_adapters(model, "add_stacked_adapter")
    check_adapter_name(name)
    names = list_adapters(model)
    if name in names:
        raise ValueError(
            f"Model '{model.name}' already has an adapter {name!r}."
        )
    sources = _checked_sources(adapters, names)
    plans = [
        (path, layer, at_layer(path, stacked_factors, layer, sources))
        for path, layer in layers.items()
    ]
    for path, layer, (config, values) in plans:
        at_layer(path, layer.add_banked_adapter, name, config, values)
    return recompile(model)


def _checked_sources(adapters, names):
    if isinstance(adapters, str) or adapters is None:
        adapters = [adapters]
    adapters = list(adapters)
    if (
        not adapters
        or any(a in NO_ADAPTER or a not in names for a in adapters)
        or len(set(adapters)) != len(adapters)
    ):
        raise ValueError(
            "Received an invalid value for `adapters`, expected a list of "
            f"distinct adapter names from {names}. Received: "
            f"adapters={adapters!r}"
        )
    return adapters


def stacked_factors(layer, sources):
    """`(config, values)` of the stacked adapter of `sources` in `layer`
    (an adapter host holding every name of `sources`): its `LoRAConfig`
    and factor values, as `add_banked_adapter` takes them."""
    configs = [layer.adapter_config(source) for source in sources]
    dora = [s for s, c in zip(sources, configs, strict=True) if c.use_dora]
    if dora:
        raise ValueError(
            "Received an invalid value for `adapters`: "
            f"{dora} use DoRA, whose update rescales the kernel's columns "
            "and does not add up with another's. Stack adapters without "
            f"DoRA. Received: adapters={sources!r}"
        )
    targets = {tuple(c.lora_targets) for c in configs}
    if len(targets) > 1:
        held = {
            s: list(c.lora_targets)
            for s, c in zip(sources, configs, strict=True)
        }
        raise ValueError(
            "Received an invalid value for `adapters`: they adapt different "
            f"kernels of '{layer.name}' ({held}); a stacked adapter needs "
            f"adapters on the same targets. Received: adapters={sources!r}"
        )
    (lora_targets,) = targets
    held = [layer.adapter_values(source) for source in sources]
    values = {}
    for target in lora_targets:
        a, b = (w.name for w in layer.lora_factors(target))
        values[a] = np.concatenate([v[a] for v in held], axis=-1)
        values[b] = np.concatenate(
            [c.scaling * v[b] for c, v in zip(configs, held, strict=True)],
            axis=0,
        )
    rank = sum(c.rank for c in configs)
    config = layer.lora_config.replace(
        rank=rank,
        lora_alpha=float(rank),  # a scale of 1: each B holds its own
        use_rslora=False,
        use_dora=False,
        lora_init="default",
        lora_targets=lora_targets,
    )
    values = {k: v.astype("float32") for k, v in values.items()}
    return config, values
