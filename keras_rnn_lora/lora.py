"""LoRA settings and math: `LoRAConfig`, argument checks, scaling, factor
creation, the delta and safe merging.

Everything here is backend-agnostic (`keras.ops` and NumPy) and shared by
the cells, the layers and the model-level functions alike.
"""

import copy
import dataclasses
import json
import math

import keras
import numpy as np
from keras import initializers
from keras import ops

from keras_rnn_lora import variants
from keras_rnn_lora.checks import invalid
from keras_rnn_lora.checks import is_int
from keras_rnn_lora.checks import is_real

#: What an adapter can target: the input and recurrent kernels of the
#: recurrent cells, and (model-wide, through Keras' own LoRA) the kernels of
#: `Dense` and `EinsumDense` layers and the table of `Embedding` layers.
CELL_TARGETS = ("kernel", "recurrent")
LAYER_TARGETS = ("dense", "einsum_dense", "embedding")
LORA_TARGETS = (*CELL_TARGETS, *LAYER_TARGETS)

#: The Keras attribute (and weight name) of the kernel behind each target.
KERNEL_ATTRIBUTES = {"kernel": "kernel", "recurrent": "recurrent_kernel"}


def validate_rank(rank, units=None):
    """Checks `rank` is a positive integer (no larger than `units` when
    given) and returns it."""
    if not is_int(rank) or rank < 1 or (units is not None and rank > units):
        expected = "a positive integer" + (
            "" if units is None else f" no larger than `units` ({units})"
        )
        raise invalid("rank", expected, rank)
    return int(rank)


def validate_lora_alpha(lora_alpha, rank):
    """Returns `lora_alpha` as a float (default: `rank`); must be > 0."""
    if lora_alpha is None:
        return float(rank)
    if not is_real(lora_alpha) or not math.isfinite(lora_alpha):
        raise invalid("lora_alpha", "a finite number > 0", lora_alpha)
    if lora_alpha <= 0:
        raise invalid("lora_alpha", "a finite number > 0", lora_alpha)
    return float(lora_alpha)


def validate_lora_dropout(lora_dropout):
    """Returns `lora_dropout` as a float; must lie in `[0, 1)`."""
    if not is_real(lora_dropout) or not 0.0 <= lora_dropout < 1.0:
        raise invalid("lora_dropout", "a float in [0, 1)", lora_dropout)
    return float(lora_dropout)


def validate_use_rslora(use_rslora):
    if not isinstance(use_rslora, bool):
        raise invalid("use_rslora", "a bool", use_rslora)
    return use_rslora


def validate_use_dora(use_dora):
    if not isinstance(use_dora, bool):
        raise invalid("use_dora", "a bool", use_dora)
    return use_dora


#: How an adapter's factors start: `"default"` from the initializers (B = 0),
#: `"pissa"` from the kernel's top singular vectors and `"olora"` from its
#: QR decomposition (the frozen kernel becoming the residual).
LORA_INITS = ("default", "pissa", "olora")


def validate_lora_init(lora_init):
    if lora_init not in LORA_INITS:
        raise invalid("lora_init", f"one of {LORA_INITS}", lora_init)
    return lora_init


def validate_lora_targets(lora_targets, allowed=LORA_TARGETS):
    """Returns `lora_targets` as a tuple in canonical order.

    Accepts a single name or a sequence drawn from `allowed`.
    """
    if isinstance(lora_targets, str):
        lora_targets = (lora_targets,)
    try:
        targets = tuple(lora_targets)
    except TypeError:
        targets = None
    if (
        not targets
        or any(t not in allowed for t in targets)
        or len(set(targets)) != len(targets)
    ):
        raise invalid(
            "lora_targets",
            f"a non-empty sequence of distinct names from {allowed}",
            lora_targets,
        )
    return tuple(t for t in allowed if t in targets)


def validate_initializer(name, value):
    """Returns a Keras initializer for `value`, naming `name` if invalid."""
    try:
        return initializers.get(value)
    except (ValueError, TypeError):
        raise invalid(name, "a Keras initializer", value) from None


def new_initializer(identifier):
    """A Keras initializer of its own for `identifier` (a name, a config
    dict or an initializer object).

    An initializer object is cloned: an unseeded Keras initializer draws a
    seed once, at construction, so one object shared by several factors
    would give them all the same values.
    """
    initializer = initializers.get(identifier)
    if initializer is identifier and isinstance(
        initializer, initializers.Initializer
    ):
        initializer = initializer.clone()
    return initializer


def _initializer_key(identifier):
    """What makes two initializer identifiers the same initializer: its
    class and configuration. Read from `get_config` rather than Keras'
    serializer, which imports TensorFlow on every backend."""
    initializer = initializers.get(identifier)
    if not isinstance(initializer, initializers.Initializer):
        # A plain function, or an array of values: the very object.
        return "identity", id(identifier)
    config = json.dumps(initializer.get_config(), sort_keys=True, default=repr)
    return type(initializer), config


#: The `LoRAConfig` fields that hold initializers.
INITIALIZER_FIELDS = ("lora_a_initializer", "lora_b_initializer")


@dataclasses.dataclass(frozen=True, eq=False)
class LoRAConfig:
    """The settings of a LoRA adapter, validated once.

    What the cells, `LoRAGRU`/`LoRALSTM`/`LoRASimpleRNN` and `enable_lora`
    all take (as keyword arguments of the same names), in one place:

    Args:
        rank: int, the rank `r` of the update (at most the layer's width).
        lora_alpha: float > 0, the LoRA alpha. Defaults to `rank` (scale 1).
        use_rslora: bool, default `False`: scale by `lora_alpha / rank`;
            `True`: by `lora_alpha / sqrt(rank)` (rank-stabilised LoRA).
        lora_dropout: float in `[0, 1)`, default 0. Dropout on the input of
            the LoRA branch, in training only (recurrent adapters).
        lora_targets: what gets a LoRA update: `"recurrent"` (the
            hidden-state kernels, the default and the paper's method) and
            `"kernel"` (the input kernels) of recurrent cells; model-wide
            also `"dense"`, `"einsum_dense"` and `"embedding"` layers.
            Default `("recurrent",)`.
        lora_a_initializer: initializer of the `A` factors. Default
            `"he_uniform"`.
        lora_b_initializer: initializer of the `B` factors. Default
            `"zeros"`, so a fresh adapter leaves the outputs unchanged.
        use_dora: bool, default `False`. DoRA: the adapted kernel is
            `m * (W + s*A@B) / column_norm(W + s*A@B)` with a trainable
            magnitude `m` per column, initialized to the column norms of
            `W` (a fresh adapter still leaves the outputs unchanged). The
            step stays factored; the column norm is computed once per call.
            Not on embeddings.
        lora_init: how the factors start: `"default"` (the initializers
            above), `"pissa"` (the kernel's top-`rank` singular vectors,
            PiSSA) or `"olora"` (its QR decomposition, OLoRA). With
            `"pissa"`/`"olora"` the frozen kernel becomes the residual
            `W - s*A@B`, so the outputs are unchanged at initialization.

    Reference: PEFT's `LoraConfig` (rank, alpha, rsLoRA, dropout, targets,
    `use_dora`, `init_lora_weights`); Liu et al. 2024, DoRA
    (https://arxiv.org/abs/2402.09353); Meng et al. 2024, PiSSA
    (https://arxiv.org/abs/2404.02948); Büyükakyüz 2024, OLoRA
    (https://arxiv.org/abs/2406.01775).
    """

    rank: int
    lora_alpha: float = None
    use_rslora: bool = False
    lora_dropout: float = 0.0
    lora_targets: tuple = ("recurrent",)
    lora_a_initializer: object = "he_uniform"
    lora_b_initializer: object = "zeros"
    use_dora: bool = False
    lora_init: str = "default"

    def __post_init__(self):
        rank = validate_rank(self.rank)
        values = {
            "rank": rank,
            "lora_alpha": validate_lora_alpha(self.lora_alpha, rank),
            "use_rslora": validate_use_rslora(self.use_rslora),
            "lora_dropout": validate_lora_dropout(self.lora_dropout),
            "lora_targets": validate_lora_targets(self.lora_targets),
            "use_dora": validate_use_dora(self.use_dora),
            "lora_init": validate_lora_init(self.lora_init),
        }
        for name in INITIALIZER_FIELDS:
            # Stored as written (a name, a config dict or an object): Keras'
            # serializer imports TensorFlow, which a torch or JAX user should
            # not pay for at construction. Equality compares what they mean.
            value = getattr(self, name)
            validate_initializer(name, value)
            if isinstance(value, dict):  # the caller's dict may change later
                values[name] = copy.deepcopy(value)
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def _key(self):
        return tuple(
            _initializer_key(value) if name in INITIALIZER_FIELDS else value
            for name, value in self._items()
        )

    def __eq__(self, other):
        if not isinstance(other, LoRAConfig):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def _items(self):
        return [
            (field.name, getattr(self, field.name))
            for field in dataclasses.fields(self)
        ]

    @property
    def scaling(self):
        """The scale `s` of the update `s * A @ B`."""
        return lora_scaling(self.rank, self.lora_alpha, self.use_rslora)

    def to_dict(self):
        """The settings as keyword arguments (JSON-serializable)."""
        config = dict(self._items())
        config["lora_targets"] = list(self.lora_targets)
        for name in INITIALIZER_FIELDS:
            value = config[name]
            if isinstance(value, dict):
                config[name] = copy.deepcopy(value)
            elif not isinstance(value, str):
                config[name] = initializers.serialize(value)
        return config

    def replace(self, **changes):
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)


#: Constructor arguments the LoRA cells and layers add to their Keras
#: parents: every `LoRAConfig` field, the merge state and which base
#: weights train.
LORA_CONFIG_KEYS = (
    *(field.name for field in dataclasses.fields(LoRAConfig)),
    "lora_merged",
    "trainable_base_weights",
    "named_adapters",
    "active_adapter",
)


def lora_scaling(rank, lora_alpha, use_rslora=False):
    """The LoRA scale `s`: `alpha / rank`, or `alpha / sqrt(rank)` (rsLoRA).

    Reference: Kalajdzievski, "A Rank Stabilization Scaling Factor for
    Fine-Tuning with LoRA", 2023 (https://arxiv.org/abs/2312.03732).
    """
    return lora_alpha / (math.sqrt(rank) if use_rslora else rank)


def add_lora_factors(layer, prefix, input_dim, output_dim, config):
    """Creates the float32 factors `A` (input_dim, rank) and `B` (rank,
    output_dim) named `<prefix>_a` and `<prefix>_b` on `layer`.

    Weight names follow Keras: `lora_kernel_a`, `lora_recurrent_kernel_b`.
    """
    # autocast=False: reading them inside a mixed-precision call must not
    # round them to float16/bfloat16; the cells cast explicitly.
    a = layer.add_weight(
        name=f"{prefix}_a",
        shape=(input_dim, config.rank),
        initializer=new_initializer(config.lora_a_initializer),
        dtype="float32",
        autocast=False,
    )
    b = layer.add_weight(
        name=f"{prefix}_b",
        shape=(config.rank, output_dim),
        initializer=new_initializer(config.lora_b_initializer),
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
