"""Converting a model: `enable_lora` puts adapters on its recurrent layers,
`to_base_model` turns them back into stock Keras layers with merged
weights.

    lora_model = keras_rnn_lora.enable_lora(model, rank=8)
    keras_rnn_lora.mark_only_lora_as_trainable(lora_model)
    lora_model.compile(...); lora_model.fit(new_data)

Both rewrite the model's Keras config (`config_rewrite.py`), rebuild the
model from it and copy the trained weights in, in order, through NumPy.
`keras.models.clone_model` was considered and not used: it rebuilds a
functional subclass (such as the translator, which owns
`encode`/`decode_step`) as a plain functional model, and its
`clone_function` cannot see the cells inside `RNN`, `Bidirectional` or
`StackedRNNCells`.
"""

import dataclasses

import keras

from keras_rnn_lora import config_rewrite
from keras_rnn_lora import folding
from keras_rnn_lora import lora
from keras_rnn_lora import variants
from keras_rnn_lora.checks import check_adapter_name
from keras_rnn_lora.merging import MergeableLoRA
from keras_rnn_lora.training import compile_like
from keras_rnn_lora.walk import at_layer
from keras_rnn_lora.walk import check_model
from keras_rnn_lora.walk import iter_layers
from keras_rnn_lora.walk import lora_adapters
from keras_rnn_lora.walk import lora_weight_ids
from keras_rnn_lora.walk import require_adapters

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _check_base_dtype(base_dtype, argument="base_dtype"):
    """`base_dtype` as a `keras.DTypePolicy` of floating dtypes."""
    try:
        policy = keras.DTypePolicy(base_dtype)
    except (ValueError, TypeError):
        policy = None
    dtypes = {policy.variable_dtype, policy.compute_dtype} if policy else None
    if not dtypes or not dtypes <= set(_FLOAT_DTYPES):
        raise ValueError(
            f"Received an invalid value for `{argument}`, expected a floating "
            f"dtype ({', '.join(map(repr, _FLOAT_DTYPES))}) or a mixed "
            "policy name such as 'mixed_bfloat16'. Received: "
            f"{argument}={base_dtype!r}"
        )
    return policy


def _lora_config(rank, config, lora_kwargs):
    """The adapter's `LoRAConfig`, from `config` or from keyword arguments."""
    if config is not None:
        if not isinstance(config, lora.LoRAConfig):
            raise TypeError(
                "Received an invalid value for `config`, expected a "
                f"keras_rnn_lora.LoRAConfig. Received: config={config!r}"
            )
        if rank is not None or lora_kwargs:
            given = (["rank"] if rank is not None else []) + sorted(lora_kwargs)
            raise ValueError(
                "Pass the LoRA settings either as `config=LoRAConfig(...)` or "
                f"as keyword arguments, not both. Received config={config} "
                f"and {given}."
            )
        return config
    unknown = sorted(set(lora_kwargs) - set(lora.LORA_CONFIG_KEYS))
    fields = {f.name for f in dataclasses.fields(lora.LoRAConfig)}
    internal = sorted((set(lora.LORA_CONFIG_KEYS) - fields) & set(lora_kwargs))
    if unknown or internal:
        raise TypeError(
            "enable_lora got unexpected keyword arguments "
            f"{unknown + internal}; the LoRA settings are `rank` and the other "
            "fields of keras_rnn_lora.LoRAConfig: "
            f"{[f.name for f in dataclasses.fields(lora.LoRAConfig)]}."
        )
    if rank is None:
        raise ValueError(
            "enable_lora needs the adapter's settings: pass `rank` (and any "
            "other LoRA argument), or `config=LoRAConfig(...)`."
        )
    return lora.LoRAConfig(rank=rank, **lora_kwargs)


def enable_lora(
    model,
    rank=None,
    *,
    config=None,
    layers=None,
    base_dtype=None,
    adapter_name=None,
    **lora_kwargs,
):
    """Returns a copy of `model` with LoRA adapters on the layers targeted.

    By default (`lora_targets=("recurrent",)`, the paper's method) every
    recurrent layer gets an adapter on its hidden-state kernel: every
    `keras.layers.SimpleRNN`, `GRU` and `LSTM` becomes `LoRASimpleRNN`,
    `LoRAGRU` and `LoRALSTM`, and every `keras.layers.RNN` over a stock cell
    or `StackedRNNCells` runs the matching LoRA cell (also inside
    `Bidirectional`, nested functional or Sequential models, and models such
    as the translator whose config nests their sub-models), carrying the
    trained weights. Until the adapters train, the new model's outputs
    equal `model`'s. `model` is left unchanged; calling this twice gives two
    independent LoRA models. Recurrent layers that already carry LoRA are
    kept as they are. `lora_targets` also takes `"kernel"` (the recurrent
    layers' input kernels) and, through Keras' own LoRA, `"dense"`,
    `"einsum_dense"` and `"embedding"`: every such Keras layer becomes
    `LoRADense`, `LoRAEinsumDense` or `LoRAEmbedding`. `layers=` narrows any
    of these to layers by name.

    Args:
        model: a built functional or Sequential `keras.Model` (subclassed
            models whose config does not describe their layers cannot be
            rebuilt: the error says what to do instead).
        rank: the LoRA rank, `1 <= rank <= units` of every converted layer.
        config: a `keras_rnn_lora.LoRAConfig` instead of `rank` and
            `**lora_kwargs`.
        layers: optional names of the layers to convert (a name also
            converts every recurrent layer inside that layer or sub-model).
            Default: all of them.
        base_dtype: optional floating dtype, e.g. `"bfloat16"`, in which
            every layer stores and computes its (frozen) weights (or a
            policy name such as `"mixed_bfloat16"`); the LoRA factors and
            their branch stay float32. Halves the base's memory and, on
            CPUs with bfloat16 matmuls, speeds the frozen work up.
        adapter_name: the name of the adapter (default `"default"`; more
            adapters: `keras_rnn_lora.add_adapter`).
        **lora_kwargs: the other `LoRAConfig` fields: `lora_alpha`,
            `use_rslora`, `lora_dropout`, `lora_targets`,
            `lora_a_initializer`, `lora_b_initializer`, `use_dora`,
            `lora_init`.

    Returns:
        A new `keras.Model` of the same architecture.

    Example:

    >>> lora_model = keras_rnn_lora.enable_lora(model, rank=8)
    >>> keras_rnn_lora.mark_only_lora_as_trainable(lora_model)
    """
    check_model(model, "enable_lora", built=True)
    settings = _lora_config(rank, config, lora_kwargs)
    policy = None if base_dtype is None else _check_base_dtype(base_dtype)
    wanted = None
    if layers is not None:
        wanted = {layers} if isinstance(layers, str) else set(layers)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    conversion = config_rewrite.Conversion(settings, wanted, adapter_name)
    new_config = conversion.walk(keras.saving.serialize_keras_object(model))
    if wanted is not None and wanted - conversion.seen:
        raise ValueError(
            f"Received an invalid value for `layers`: model '{model.name}' "
            f"has no layer named {sorted(wanted - conversion.seen)}. "
            f"Its layers: {[layer.name for layer in model.layers]}"
        )
    if conversion.converted == 0:
        raise _nothing_converted(
            model, wanted, settings.lora_targets, conversion.untargeted
        )
    if policy is not None:
        new_config = config_rewrite.with_dtype(new_config, policy)
    # Compiled afresh below: an optimizer built now would cover weights that
    # `mark_only_lora_as_trainable` is about to freeze.
    new_config.pop("compile_config", None)
    with variants.initialization_deferred():  # initialized below
        lora_model = keras.saving.deserialize_keras_object(new_config)
    _copy_base_weights(model, lora_model)
    carried = _copy_adapters(model, lora_model)
    # The new adapters start from the trained kernels just copied in (they
    # were initialized from the random ones at build): PiSSA/OLoRA factors
    # and residuals, DoRA magnitudes.
    for path, adapter in lora_adapters(lora_model).items():
        if path not in carried:
            adapter.initialize_from_base()
    compile_like(lora_model, model)
    return lora_model


def _nothing_converted(model, wanted, targets, untargeted):
    already = lora_adapters(model)
    recurrent = any(
        isinstance(layer, keras.layers.RNN) for _, layer in iter_layers(model)
    )
    if recurrent and not already and wanted is None:
        return ValueError(
            f"enable_lora cannot convert model '{model.name}': it is a "
            f"subclassed keras.Model ({type(model).__name__}) whose config "
            "does not describe its layers, so it cannot be rebuilt with LoRA "
            "layers. Build it with the functional or Sequential API, or use "
            "the LoRA layers in its code directly: keras_rnn_lora.LoRAGRU("
            "units, rank=...) for keras.layers.GRU (LoRALSTM, LoRASimpleRNN "
            "likewise), or keras.layers.RNN(keras_rnn_lora.LoRAGRUCell("
            "units, rank=...))."
        )
    detail = (
        f"it already carries LoRA in {sorted(already)}"
        if already
        else "it has no SimpleRNN, GRU, LSTM or RNN layer over a stock cell"
        + ("" if targets == ("recurrent",) else f" or layer for {targets}")
    )
    where = "" if wanted is None else f" under {sorted(wanted)}"
    hint = ""
    if untargeted:
        needed = sorted(set(untargeted.values()))
        hint = (
            f" {sorted(untargeted)} would need `lora_targets` to include "
            f"{needed}, e.g. lora_targets={(*targets, *needed)!r}."
        )
    return ValueError(
        f"enable_lora found no recurrent layer to convert in model "
        f"'{model.name}'{where}: {detail}.{hint}"
    )


def _keras_lora_factors(model):
    """`{path: {name: variable}}` of the factors of Keras' own LoRA on
    layers of `model` that are not adapters of this library."""
    return {
        path.split("/", 1)[1]: {
            w.name: w for w in layer.weights if w.name.startswith("lora_")
        }
        for path, layer in iter_layers(model)
        if getattr(layer, "lora_enabled", False)
        and not isinstance(layer, MergeableLoRA)
    }


def _copy_base_weights(source, target, values=None):
    """Copies `source`'s weights into the non-LoRA weights of `target`, in
    order, through NumPy (on JAX `assign(variable)` can share a buffer that
    `fit` later donates away). `values` overrides some by `id(weight)`.
    The factors of Keras' own LoRA in `source` go to the adapters `target`
    made of them."""
    values = values or {}
    keras_factors = _keras_lora_factors(source)
    source_ids = lora_weight_ids(source) | {
        id(w) for factors in keras_factors.values() for w in factors.values()
    }
    target_ids = lora_weight_ids(target)
    source_weights = [w for w in source.weights if id(w) not in source_ids]
    target_weights = [w for w in target.weights if id(w) not in target_ids]
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
        dst.assign(lora.to_numpy(values.get(id(src), src)))
    target_adapters = lora_adapters(target)
    for path, factors in keras_factors.items():
        target_adapters[path].set_lora_factors(
            {name: lora.to_numpy(w) for name, w in factors.items()}
        )


def _copy_adapters(source, target):
    """Carries adapters `source` already had (factors, merge state,
    pre-merge kernels) into the new model, through their store format;
    returns their paths."""
    target_adapters = lora_adapters(target)
    carried = lora_adapters(source)
    for path, adapter in carried.items():
        store = {}
        adapter.save_own_variables(store)
        target_adapters[path].load_own_variables(store)
    return set(carried)


def to_base_model(model, dtype=None, adapter=None):
    """The same architecture with stock Keras layers and merged weights.

    Its recurrent layers need nothing from this library to load or serve
    (a model class of your own still needs its code), and its outputs equal
    `model`'s, merged or not. Every merge is checked first: if one would
    hold NaN or Inf, or round the update away in a half-precision kernel, a
    `ValueError` names its layer. `model` is left unchanged.

    Args:
        model: a model holding LoRA adapters.
        dtype: optional dtype (or policy name) of every layer of the result,
            e.g. `"float32"` for a model trained with
            `enable_lora(..., base_dtype="bfloat16")`, whose adapters a
            bfloat16 kernel cannot hold. Default: each layer's own.
        adapter: the named adapter to fold in (default: the active one);
            `"base"` folds none in: the base model itself.
    """
    check_model(model, "to_base_model", built=True)
    adapters = require_adapters(model, "to_base_model")
    policy = None if dtype is None else _check_base_dtype(dtype, "dtype")
    if adapter not in (None, "base"):
        _require_adapter_name(model, adapter)
    merged_values = {}
    for path, host in adapters.items():
        merged = at_layer(
            path,
            folding.folded_kernels,
            host,
            adapter,
            policy.variable_dtype if policy else None,
        )
        for target, value in merged.items():
            merged_values[id(host.lora_kernel(target))] = value
    config = config_rewrite.stock_config(
        keras.saving.serialize_keras_object(model)
    )
    config.pop("compile_config", None)
    if policy is not None:
        config = config_rewrite.with_dtype(config, policy)
    base = keras.saving.deserialize_keras_object(config)
    _copy_base_weights(model, base, merged_values)
    return compile_like(base, model, build=True)


def _require_adapter_name(model, name):
    from keras_rnn_lora.named_adapters import list_adapters

    names = list_adapters(model)
    if name not in names:
        raise ValueError(
            "Received an invalid value for `adapter`, expected None, 'base' "
            f"or one of {names}. Received: adapter={name!r}"
        )
