"""LoRA on Keras' `Dense`, `EinsumDense` and `Embedding`, through Keras'
own LoRA.

Keras 3 already puts LoRA on these layers: `layer.enable_lora(rank)`
creates the float32 factors (`lora_kernel_a/_b`, `lora_embeddings_a/_b`),
freezes the kernel and adds `lora_alpha / rank * A @ B` in the forward
pass. `LoRADense`, `LoRAEinsumDense` and `LoRAEmbedding` subclass the Keras
layers and call exactly that: the factors are Keras' own variables and no
second copy is ever held. What they add is the adapter interface every LoRA
layer of this library shares (`merging.MergeableLoRA`: merge, exact unmerge,
adapter files, `to_base_model`), and where Keras' own behaviour gets in the
way it is handled here, in one place:

- Saving: Keras folds the delta into the kernel when a model is saved and
  zeroes the factors when it is loaded, so the adapter is baked into the
  base for good, and it has no unmerge. These layers save and load through
  `MergeableLoRA`'s store format instead (the stock weights by position, the
  factors by name, the merge state), so a saved adapter stays an adapter.
- Merging: as for every adapter here, the live `B` reads zero while
  merged, so Keras' own forward pass (`W + s*A@B`) reads the merged kernel
  and no compiled function depends on the merge state.
- Scale: Keras scales by `lora_alpha / rank`; rsLoRA's `alpha / sqrt(rank)`
  is handed to Keras as the alpha `alpha * sqrt(rank)`. `lora_config` holds
  the settings as given.
- Not supported by Keras' LoRA, so refused rather than ignored: LoRA
  dropout, quantized layers and kernel constraints. Keras regularizes the
  factors with the kernel's regularizer itself (not `W + s*A@B`, as the
  recurrent cells do).
"""

import math

import keras
from keras import ops

from keras_rnn_lora import keras_internals
from keras_rnn_lora import lora
from keras_rnn_lora import routing
from keras_rnn_lora import variants
from keras_rnn_lora.merging import MergeableLoRA


class KerasLoRALayer(MergeableLoRA):
    """The adapter interface on top of a Keras layer's own LoRA.

    A layer class sets `stock_class` (its Keras parent) and, where Keras
    names them otherwise, `factor_names` (Keras' factor variables).
    """

    stock_class = None
    model_target = None  # its `lora_targets` name in `enable_lora`
    factor_names = ("lora_kernel_a", "lora_kernel_b")
    dora_allowed = True

    @classmethod
    def _pop_lora_arguments(cls, kwargs):
        """Takes the LoRA arguments out of `kwargs` (the rest go to the
        Keras layer, which names any it does not know)."""
        if kwargs.pop("lora_rank", None):
            raise ValueError(
                f"{cls.__name__} enables Keras' LoRA itself: pass "
                "`rank`, not Keras' `lora_rank`."
            )
        return {
            key: kwargs.pop(key)
            for key in lora.LORA_CONFIG_KEYS
            if key in kwargs and key != "rank"
        }

    def _init_lora_arguments(self, rank, arguments):
        """Validates the LoRA arguments and sets the adapter up."""
        name = type(self).__name__
        if rank is None:
            raise TypeError(
                f"{name} needs the LoRA rank: pass `rank`, e.g. "
                f"{name}(..., rank=8)."
            )
        arguments = dict(arguments)
        merged = arguments.pop("lora_merged", False)
        trainable_base = arguments.pop("trainable_base_weights", None)
        named = arguments.pop("named_adapters", None)
        active = arguments.pop("active_adapter", None)
        targets = lora.validate_lora_targets(
            arguments.pop("lora_targets", "kernel"), ("kernel",)
        )
        config = lora.LoRAConfig(rank=rank, lora_targets=targets, **arguments)
        if config.lora_dropout:
            raise ValueError(
                "Received an invalid value for `lora_dropout`, expected 0: "
                f"Keras' LoRA on {self.stock_class.__name__} has no dropout "
                "(LoRA dropout applies to the recurrent adapters). Received: "
                f"lora_dropout={config.lora_dropout}"
            )
        self.check_dora(config.use_dora)
        self.init_lora(config, merged, trainable_base, named, active)

    @classmethod
    def check_dora(cls, use_dora):
        """Raises `ValueError` when `use_dora` asks for DoRA on a layer
        without kernel columns (Embedding)."""
        if use_dora and not cls.dora_allowed:
            raise ValueError(
                "Received an invalid value for `use_dora`, expected False: "
                f"DoRA scales a kernel's columns, and {cls.__name__} has none "
                "(its table's rows are looked up). Received: use_dora=True"
            )

    def build(self, input_shape=None):
        super().build(input_shape)
        if self.quantization_mode:
            raise ValueError(
                f"'{self.name}' is quantized ({self.quantization_mode}); "
                "LoRA adapters of this library need a float kernel."
            )
        config = self.lora_config
        keras_alpha = config.lora_alpha * (
            math.sqrt(config.rank) if config.use_rslora else 1.0
        )
        self.enable_lora(
            config.rank,
            lora_alpha=keras_alpha,
            a_initializer=self.lora_a_initializer,
            b_initializer=self.lora_b_initializer,
        )
        if self.use_dora:
            with keras_internals.weights_addable(self):
                self.lora_kernel_magnitude = variants.add_magnitude(
                    self, "lora_kernel", self.lora_kernel().shape[-1]
                )
        self.finish_lora_build()

    def lora_kernel(self, target="kernel"):
        """The frozen weight the adapter applies to (a variable)."""
        return keras_internals.raw_weight(self)

    def lora_factors(self, target="kernel"):
        """The factors `(A, B)`: Keras' own LoRA variables."""
        return tuple(getattr(self, name) for name in self.factor_names)

    def lora_magnitude(self, target="kernel"):
        """DoRA's magnitude, or `None` without DoRA."""
        return getattr(self, "lora_kernel_magnitude", None)

    def dora_kernel(self, kernel):
        """`kernel` (Keras' own `W + s*A@B`) column-scaled by DoRA's
        `m / norm`, or as it is without DoRA (or while being built)."""
        if self.lora_magnitude() is None:
            return kernel
        return kernel * ops.cast(self.dora_scale("kernel"), kernel.dtype)

    def call(self, inputs, training=None):
        route = routing.current()
        if route is None:  # Keras' own call (none of the three uses training)
            return super().call(inputs)
        self.require_routable()
        a, b, scale = self.route_factors("kernel", route)
        return self.routed_call(inputs, a, b, scale)

    def routed_call(self, inputs, a, b, scale):
        """The layer's output for a mixed batch: each example with its own
        factors `a`, `b` (already times its scale) and DoRA `scale` (see
        `adapter_bank.py`)."""
        raise NotImplementedError

    @staticmethod
    def _per_example_scale(y, scale):
        if scale is None:
            return y
        for _ in range(len(y.shape) - 2):
            scale = ops.expand_dims(scale, 1)
        return y * ops.cast(scale, y.dtype)

    def get_config(self):
        config = super().get_config()
        # Keras' own LoRA settings: this layer enables LoRA itself.
        config.pop("lora_rank", None)
        config.pop("lora_alpha", None)
        config.update(self.lora_config_entries())
        return config


_ARGS_DOC = """
    Args:
{args}
        rank: int, the LoRA rank (required).
        lora_alpha: as for `keras_rnn_lora.LoRAConfig`.
        use_rslora: as for `keras_rnn_lora.LoRAConfig`.
        lora_dropout: must be 0: Keras' own LoRA has no dropout.
        lora_targets: `("kernel",)`, the only target of these layers.
        lora_a_initializer: as for `keras_rnn_lora.LoRAConfig`.
        lora_b_initializer: as for `keras_rnn_lora.LoRAConfig`.
        use_dora: as for `keras_rnn_lora.LoRAConfig` (not on Embedding).
        lora_init: as for `keras_rnn_lora.LoRAConfig`.
        lora_merged: as for the LoRA cells.
        trainable_base_weights: as for the LoRA cells.
        named_adapters: as for the LoRA cells.
        active_adapter: as for the LoRA cells.
        **kwargs: every other argument of `keras.layers.{layer}`.
"""


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class LoRADense(KerasLoRALayer, keras.layers.Dense):
    """`keras.layers.Dense` with Keras' own LoRA on its kernel.

    `y = x @ (W + s * A @ B) + b`, `W` frozen, `A` and `B` Keras' float32
    factors.

    Example:

    >>> layer = keras_rnn_lora.LoRADense(16, rank=4)
    >>> layer(np.zeros((2, 8))).shape
    (2, 16)
    """

    stock_class = keras.layers.Dense
    model_target = "dense"

    def __init__(self, units, rank=None, **kwargs):
        arguments = self._pop_lora_arguments(kwargs)
        super().__init__(units, **kwargs)
        self._init_lora_arguments(rank, arguments)

    @property
    def kernel(self):
        return self.dora_kernel(keras.layers.Dense.kernel.fget(self))

    def routed_call(self, inputs, a, b, scale):
        x = ops.cast(inputs, self.compute_dtype)
        y = ops.matmul(x, ops.cast(self.lora_kernel(), self.compute_dtype))
        spec = _per_example_spec(x, "Dense")
        low = ops.einsum(f"{spec}i,bir->{spec}r", ops.cast(x, "float32"), a)
        y = y + ops.cast(ops.einsum(f"{spec}r,brc->{spec}c", low, b), y.dtype)
        y = self._per_example_scale(y, scale)
        if self.bias is not None:
            y = y + self.bias
        return y if self.activation is None else self.activation(y)


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class LoRAEinsumDense(KerasLoRALayer, keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` with Keras' own LoRA on its kernel.

    `A` has the kernel's shape but its last axis (`rank` instead), `B` is
    `(rank, last axis)`; the update is `s * A @ B`.

    Example:

    >>> layer = keras_rnn_lora.LoRAEinsumDense("ab,bc->ac", 16, rank=4)
    >>> layer(np.zeros((2, 8))).shape
    (2, 16)
    """

    stock_class = keras.layers.EinsumDense
    model_target = "einsum_dense"

    def __init__(self, equation, output_shape, rank=None, **kwargs):
        arguments = self._pop_lora_arguments(kwargs)
        super().__init__(equation, output_shape, **kwargs)
        self._init_lora_arguments(rank, arguments)

    @property
    def kernel(self):
        return self.dora_kernel(keras.layers.EinsumDense.kernel.fget(self))

    def routed_call(self, inputs, a, b, scale):
        x = ops.cast(inputs, self.compute_dtype)
        y = ops.einsum(
            self.equation, x, ops.cast(self.lora_kernel(), self.compute_dtype)
        )
        # Each example's own kernel update, then the equation with the
        # batch axis added to the kernel's side.
        per_example = ops.einsum("b...r,brc->b...c", a, b)
        y = y + ops.cast(
            ops.einsum(_batched_equation(self.equation), x, per_example),
            y.dtype,
        )
        y = self._per_example_scale(y, scale)
        if self.bias is not None:
            y = y + self.bias
        return y if self.activation is None else self.activation(y)


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class LoRAEmbedding(KerasLoRALayer, keras.layers.Embedding):
    """`keras.layers.Embedding` with Keras' own LoRA on its table.

    The table read is `E + s * A @ B`, `A` of shape `(input_dim, rank)`,
    `B` `(rank, output_dim)`.

    Example:

    >>> layer = keras_rnn_lora.LoRAEmbedding(100, 16, rank=4)
    >>> layer(np.zeros((2, 5), "int32")).shape
    (2, 5, 16)
    """

    stock_class = keras.layers.Embedding
    model_target = "embedding"
    factor_names = ("lora_embeddings_a", "lora_embeddings_b")
    dora_allowed = False

    def __init__(self, input_dim, output_dim, rank=None, **kwargs):
        arguments = self._pop_lora_arguments(kwargs)
        super().__init__(input_dim, output_dim, **kwargs)
        self._init_lora_arguments(rank, arguments)

    def routed_call(self, inputs, a, b, scale):
        tokens = ops.cast(inputs, "int32")
        table = self.lora_kernel()
        y = ops.cast(ops.take(table, tokens, axis=0), self.compute_dtype)
        # Row `tokens[b, t]` of example b's own A: rows of the stacked A.
        rows, rank = a.shape[1], a.shape[2]
        offsets = ops.arange(ops.shape(tokens)[0], dtype="int32") * rows
        for _ in range(len(tokens.shape) - 1):
            offsets = ops.expand_dims(offsets, -1)
        low = ops.take(ops.reshape(a, (-1, rank)), tokens + offsets, axis=0)
        spec = "bt" if len(tokens.shape) == 2 else "b"
        term = ops.einsum(f"{spec}r,brc->{spec}c", low, b)
        return y + ops.cast(term, y.dtype)


for _cls, _args in (
    (LoRADense, ["units: Positive integer, the output width."]),
    (
        LoRAEinsumDense,
        [
            "equation: as for `keras.layers.EinsumDense`.",
            "output_shape: as for `keras.layers.EinsumDense`.",
        ],
    ),
    (
        LoRAEmbedding,
        [
            "input_dim: the number of rows of the table.",
            "output_dim: the width of the table.",
        ],
    ),
):
    _cls.__doc__ += _ARGS_DOC.format(
        args="\n".join(f"        {line}" for line in _args),
        layer=_cls.stock_class.__name__,
    )

KERAS_LORA_LAYERS = (LoRADense, LoRAEinsumDense, LoRAEmbedding)
#: Model-wide `lora_targets` name -> the LoRA twin of a Keras layer class.
LORA_LAYER_FOR_TARGET = {cls.model_target: cls for cls in KERAS_LORA_LAYERS}


def _per_example_spec(x, layer):
    """The einsum letters of `x`'s leading axes: batch, and time if any."""
    if len(x.shape) not in (2, 3):
        raise ValueError(
            f"A mixed batch through {layer} needs inputs of rank 2 or 3 "
            f"(batch[, time], features). Received: shape={x.shape}"
        )
    return "b" if len(x.shape) == 2 else "bt"


def _batched_equation(equation):
    """`"ab,bc->ac"` as `"ab,abc->ac"`: the kernel gets the input's first
    (batch) axis, so each example has its own kernel."""
    inputs, output = equation.split("->")
    x_spec, kernel_spec = inputs.split(",")
    batch = x_spec[:1]
    if not batch.isalpha() or batch in kernel_spec or output[:1] != batch:
        raise ValueError(
            "A mixed batch through EinsumDense needs an equation whose "
            "input and output start with the batch axis, absent from the "
            f"kernel. Received: equation={equation!r}"
        )
    return f"{x_spec},{batch}{kernel_spec}->{output}"
