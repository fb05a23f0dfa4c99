"""Folding an adapter into a kernel safely, and the checks of factor
values before they are written: nothing non-finite, and no merge that a
half-precision kernel would round away; a layer's kernels with any of its
named adapters folded in.
"""

import keras
import numpy as np
from keras import ops

from keras_rnn_lora import variants
from keras_rnn_lora.lora import to_numpy
from keras_rnn_lora.routing import magnitude_name

#: The largest share of an update's norm a merge into a half-precision
#: kernel may round away: a bfloat16 or float16 kernel rounds away most of a
#: small update (40-80% measured), which merging would make permanent.
MAX_MERGE_LOSS = 0.01
HALF_PRECISION = ("bfloat16", "float16")


def merged_kernel(base, a, b, scaling, dtype, where, magnitude=None):
    """`base + scaling * a @ b` in `dtype`, as a NumPy array.

    Computed in float64, then cast to the kernel's `dtype`. Refuses (as
    PEFT's `safe_merge` does) a result holding NaN or Inf, whether the factors
    hold them or their product overflows `dtype`: a merged kernel is often
    made permanent, so a broken one must never be written. Refuses too a
    merge into a bfloat16 or float16 kernel that would round more than
    `MAX_MERGE_LOSS` of the update away.

    Args:
        base: the frozen kernel `W`.
        a, b: the factors.
        scaling: the LoRA scale `s`.
        dtype: the kernel's dtype.
        where: what to name in the error, e.g. "cell 'gru_cell', kernel
            'recurrent_kernel'".
        magnitude: DoRA's magnitude, or `None` without DoRA.
    """
    base64 = np.asarray(base, "float32").astype("float64")
    with np.errstate(over="ignore", invalid="ignore"):
        delta = scaling * (
            np.asarray(a, "float32").astype("float64")
            @ np.asarray(b, "float32").astype("float64")
        )
        merged = base64 + delta
        if magnitude is not None:
            merged = variants.dora_merged(merged, magnitude)
        delta = merged - base64
        merged = merged.astype("float32")
    with np.errstate(over="ignore"):  # an overflow is refused just below
        merged = to_numpy(ops.cast(merged, dtype))
    check_finite(merged, f"the merged kernel of {where}")
    dtype = keras.backend.standardize_dtype(dtype)
    update = np.linalg.norm(delta)
    if dtype in HALF_PRECISION and update > 0:
        kept = merged.astype("float64") - base64
        lost = np.linalg.norm(kept - delta) / update
        if lost > MAX_MERGE_LOSS:
            raise ValueError(
                f"Refusing to merge into the {dtype} kernel of {where}: "
                "its precision would round away "
                f"{100 * lost:.0f}% of the adapter's update. Keep the "
                "adapter unmerged (it computes the same function), or "
                "convert with `to_base_model(model, dtype='float32')`, "
                "which merges into float32 kernels. Nothing was changed."
            )
    return merged


def checked_factors(owner, shapes, values):
    """`values` (factor name -> array) as float32, checked against `shapes`
    (factor name -> shape): the same names, each shape, finite values.
    `owner` names what holds them in the errors ("'gru_cell'")."""
    if set(values) != set(shapes):
        raise ValueError(
            f"{owner} has the factors {sorted(shapes)}; received values "
            f"for {sorted(values)}."
        )
    arrays = {}
    for name, value in values.items():
        array = np.asarray(value)
        if tuple(array.shape) != tuple(shapes[name]):
            raise ValueError(
                f"{owner}: factor {name!r} has shape {tuple(shapes[name])}; "
                f"received {tuple(array.shape)}."
            )
        check_finite(array, f"factor {name!r} of {owner}")
        arrays[name] = array.astype("float32")
    return arrays


def check_finite(value, what):
    """Raises `ValueError` naming `what` if `value` holds NaN or Inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(np.asarray(value).astype("float32"))
    bad = int(finite.size - np.count_nonzero(finite))
    if bad:
        raise ValueError(
            f"Refusing to write {what}: it would hold {bad} non-finite "
            f"value(s) (NaN or Inf) out of {finite.size}. The LoRA factors "
            "hold NaN/Inf, or their product overflows the kernel's dtype. "
            "Nothing was changed."
        )


def folded_kernels(layer, name=None, dtype=None):
    """`{target: kernel}` of `layer` (a layer carrying adapters; NumPy, in
    `dtype` or the kernels') with adapter `name` folded in: the active one
    (default; as merged), a banked one (its own scale and DoRA), or
    `"base"`: the kernels before any adapter. Checked as `merged_kernels`
    is."""
    name = name or layer.active_adapter
    if name == layer.active_adapter:
        if layer.lora_merged and dtype is None:
            return {
                t: to_numpy(layer.lora_kernel(t)) for t in layer.lora_targets
            }
        return layer.merged_kernels(dtype=dtype)
    if name == "base":
        return {
            t: to_numpy(
                ops.cast(
                    layer.base_kernel(t), dtype or layer.lora_kernel(t).dtype
                )
            )
            for t in layer.lora_targets
        }
    config, values = layer.adapter_config(name), layer.adapter_values(name)
    folded = {}
    for target in layer.lora_targets:
        kernel = layer.base_kernel(target)
        if target not in config.lora_targets:
            folded[target] = kernel
            continue
        a, b = (values[w.name] for w in layer.lora_factors(target))
        magnitude = values.get(magnitude_name(layer.lora_factors(target)[0]))
        folded[target] = merged_kernel(
            kernel,
            a,
            b,
            config.scaling,
            dtype or layer.lora_kernel(target).dtype,
            f"'{layer.name}', adapter {name!r}",
            magnitude if config.use_dora else None,
        )
    return folded
