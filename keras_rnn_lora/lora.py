"""Shared LoRA math: argument checks, scaling, factor creation and the delta.

Everything here is backend-agnostic (`keras.ops` only) and used by the cells,
the fused layers and the model-level helpers alike.
"""

import math
import numbers

import numpy as np
from keras import ops

#: Kernels a LoRA adapter can target, by their short name.
LORA_TARGETS = ("kernel", "recurrent")

#: Constructor arguments the LoRA cells add to their Keras parents.
LORA_CONFIG_KEYS = (
    "rank",
    "lora_alpha",
    "use_rslora",
    "lora_dropout",
    "lora_targets",
    "lora_a_initializer",
    "lora_b_initializer",
    "lora_merged",
)

#: The Keras attribute (and weight name) of the kernel behind each target.
KERNEL_ATTRIBUTES = {"kernel": "kernel", "recurrent": "recurrent_kernel"}


def _invalid(argument, expected, value):
    return ValueError(
        f"Received an invalid value for `{argument}`, expected {expected}. "
        f"Received: {argument}={value!r}"
    )


def validate_rank(rank, units):
    """Checks `rank` is an integer in `[1, units]` and returns it."""
    is_int = isinstance(rank, numbers.Integral) and not isinstance(rank, bool)
    if not is_int or not 1 <= rank <= units:
        raise _invalid(
            "rank",
            f"a positive integer no larger than `units` ({units})",
            rank,
        )
    return int(rank)


def validate_lora_alpha(lora_alpha, rank):
    """Returns `lora_alpha` as a float (default: `rank`); must be > 0."""
    if lora_alpha is None:
        return float(rank)
    is_number = isinstance(lora_alpha, numbers.Real) and not isinstance(
        lora_alpha, bool
    )
    if not is_number or not math.isfinite(lora_alpha) or lora_alpha <= 0:
        raise _invalid("lora_alpha", "a finite number > 0", lora_alpha)
    return float(lora_alpha)


def validate_lora_dropout(lora_dropout):
    """Returns `lora_dropout` as a float; must lie in `[0, 1)`."""
    is_number = isinstance(lora_dropout, numbers.Real) and not isinstance(
        lora_dropout, bool
    )
    if not is_number or not 0.0 <= lora_dropout < 1.0:
        raise _invalid("lora_dropout", "a float in [0, 1)", lora_dropout)
    return float(lora_dropout)


def validate_use_rslora(use_rslora):
    if not isinstance(use_rslora, bool):
        raise _invalid("use_rslora", "a bool", use_rslora)
    return use_rslora


def validate_lora_targets(lora_targets):
    """Returns `lora_targets` as a tuple in canonical order.

    Accepts a single name or a sequence drawn from `LORA_TARGETS`.
    """
    if isinstance(lora_targets, str):
        lora_targets = (lora_targets,)
    try:
        targets = tuple(lora_targets)
    except TypeError:
        targets = None
    if (
        not targets
        or any(t not in LORA_TARGETS for t in targets)
        or len(set(targets)) != len(targets)
    ):
        raise _invalid(
            "lora_targets",
            f"a non-empty sequence of distinct names from {LORA_TARGETS}",
            lora_targets,
        )
    return tuple(t for t in LORA_TARGETS if t in targets)


def lora_scaling(rank, lora_alpha, use_rslora=False):
    """The LoRA scale `s`: `alpha / rank`, or `alpha / sqrt(rank)` (rsLoRA).

    Reference: Kalajdzievski, "A Rank Stabilization Scaling Factor for
    Fine-Tuning with LoRA", 2023 (https://arxiv.org/abs/2312.03732).
    """
    return lora_alpha / (math.sqrt(rank) if use_rslora else rank)


def add_lora_factors(layer, target, input_dim, output_dim, rank):
    """Creates the float32 factors `A` (input_dim, rank) and `B` (rank,
    output_dim) of `target` on `layer` and returns them.

    Weight names follow Keras: `lora_kernel_a`, `lora_recurrent_kernel_b`, ...
    """
    prefix = f"lora_{KERNEL_ATTRIBUTES[target]}"
    # autocast=False: reading them inside a mixed-precision call must not
    # round them to float16/bfloat16; the cells cast explicitly.
    a = layer.add_weight(
        name=f"{prefix}_a",
        shape=(input_dim, rank),
        initializer=layer.lora_a_initializer,
        dtype="float32",
        autocast=False,
    )
    b = layer.add_weight(
        name=f"{prefix}_b",
        shape=(rank, output_dim),
        initializer=layer.lora_b_initializer,
        dtype="float32",
        autocast=False,
    )
    return a, b


def lora_delta(a, b, scaling, dtype=None):
    """The full-size update `scaling * a @ b`, computed in float32."""
    a = ops.cast(a, "float32")
    b = ops.cast(b, "float32")
    delta = ops.matmul(a, b) * scaling
    return delta if dtype is None else ops.cast(delta, dtype)


def to_numpy(value):
    """A NumPy copy of a tensor, a variable or an array."""
    return np.array(ops.convert_to_numpy(value))


def merged_kernel(base, a, b, scaling, dtype, where):
    """`base + scaling * a @ b` in `dtype`, as a NumPy array.

    Computed in float32, then cast to the kernel's `dtype`. Refuses (as
    PEFT's `safe_merge` does) a result holding NaN or Inf, whether the factors
    hold them or their product overflows `dtype`: a merged kernel is often
    made permanent, so a broken one must never be written.

    Args:
        base: the frozen kernel `W`.
        a, b: the factors.
        scaling: the LoRA scale `s`.
        dtype: the kernel's dtype.
        where: what to name in the error, e.g. "cell 'gru_cell', kernel
            'recurrent_kernel'".
    """
    with np.errstate(over="ignore", invalid="ignore"):
        delta = scaling * (
            np.asarray(a, "float32").astype("float64")
            @ np.asarray(b, "float32").astype("float64")
        )
        merged = np.asarray(base, "float32").astype("float64") + delta
        merged = merged.astype("float32")
    merged = to_numpy(ops.cast(merged, dtype))
    check_finite(merged, f"the merged kernel of {where}")
    return merged


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
