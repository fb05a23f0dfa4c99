"""What the three LoRA cells share: `LoRACellBase` and the factored step's
building blocks.

A LoRA cell subclasses its public Keras cell and `LoRACellBase`, freezes the
targeted kernel(s) and adds a trainable low-rank pair `(A, B)` whose scaled
product is the update:

    h_{t-1} @ W_hh   becomes   h_{t-1} @ W_hh + s * (h_{t-1} @ A) @ B

The step stays factored, so it costs O(units * rank) extra per step and the
backward pass never forms a full-size gradient for the frozen kernel. Merge
state lives in `merging.py`, saving in `lora_store.py`, LoRA dropout in
`lora_dropout.py`.
"""

import inspect

import keras
import numpy as np
from keras import initializers
from keras import ops

from keras_rnn_lora import lora
from keras_rnn_lora import routing
from keras_rnn_lora import variants
from keras_rnn_lora.lora_dropout import LoRADropoutMixin
from keras_rnn_lora.merging import MergeableLoRA


def stock_cell_arguments(cell):
    """The constructor arguments that rebuild the stock Keras `cell`.

    Read from the attributes that Keras' cells keep under their argument
    names, not from `cell.get_config()`: Keras' serializer imports
    TensorFlow on every backend (+1.4 s and +460 MB on a cold start on
    torch, `benchmarks/cold_start.py`), too much for constructing a layer.
    A cell with an argument not kept as an attribute (a subclass's own)
    falls back to `get_config()`.
    """
    parameters = inspect.signature(type(cell).__init__).parameters
    names = [
        name
        for name, parameter in parameters.items()
        if name != "self"
        and parameter.kind
        not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]
    if all(hasattr(cell, name) for name in names):
        arguments = {name: getattr(cell, name) for name in names}
        arguments.update(
            name=cell.name, trainable=cell.trainable, dtype=cell.dtype_policy
        )
    else:
        arguments = cell.get_config()
    if hasattr(cell, "implementation"):  # not in Keras' cell config
        arguments["implementation"] = cell.implementation
    return arguments


class LoRACellBase(LoRADropoutMixin, MergeableLoRA):
    """The LoRA machinery shared by the three cells.

    A cell class sets `stock_class` (its Keras parent, e.g.
    `keras.layers.GRUCell`) and `gates` (how many `units`-wide blocks its
    kernels hold), and implements `recurrent_step` in terms of the
    LoRA-aware projections below.
    """

    stock_class = None
    # A mixed batch multiplies by the factors at every step: the masked
    # form (see `routing.RoutedFactors`).
    routed_form = "masked"
    gates = 1
    lora_noun = "cell"

    def __init__(
        self,
        units,
        rank=None,
        lora_alpha=None,
        use_rslora=False,
        lora_dropout=0.0,
        lora_targets=("recurrent",),
        lora_a_initializer="he_uniform",
        lora_b_initializer="zeros",
        use_dora=False,
        lora_init="default",
        lora_merged=False,
        trainable_base_weights=None,
        named_adapters=None,
        active_adapter=None,
        **kwargs,
    ):
        # The stock cell first: it refuses unknown arguments by name.
        super().__init__(units, **kwargs)
        if rank is None:
            raise TypeError(
                f"{type(self).__name__} needs the LoRA rank: pass `rank`, "
                f"e.g. {type(self).__name__}({units}, rank=8)."
            )
        config = lora.LoRAConfig(
            rank=lora.validate_rank(rank, self.units),
            lora_alpha=lora_alpha,
            use_rslora=use_rslora,
            lora_dropout=lora_dropout,
            lora_targets=lora.validate_lora_targets(
                lora_targets, lora.CELL_TARGETS
            ),
            lora_a_initializer=lora_a_initializer,
            lora_b_initializer=lora_b_initializer,
            use_dora=use_dora,
            lora_init=lora_init,
        )
        self.init_lora(
            config,
            lora_merged,
            trainable_base_weights,
            named_adapters,
            active_adapter,
        )
        self.lora_alpha = config.lora_alpha

    # -- weights --------------------------------------------------------------

    def build(self, input_shape):
        super().build(input_shape)
        input_dim = input_shape[-1]
        output_dim = self.gates * self.units
        for target in self.lora_targets:
            kernel = self.lora_kernel(target)
            kernel.trainable = False
            fan_in = input_dim if target == "kernel" else self.units
            prefix = f"lora_{kernel.name}"
            a, b = lora.add_lora_factors(
                self, prefix, fan_in, output_dim, self.lora_config
            )
            setattr(self, f"{prefix}_a", a)
            setattr(self, f"{prefix}_b", b)
            if self.use_dora:
                magnitude = variants.add_magnitude(self, prefix, output_dim)
                setattr(self, f"{prefix}_magnitude", magnitude)
            if kernel.regularizer is not None:
                b.regularizer = EffectiveKernelRegularizer(
                    self, target, kernel.regularizer
                )
        self.finish_lora_build()

    def lora_kernel(self, target):
        """The frozen kernel variable of `target` ("kernel" or
        "recurrent")."""
        return getattr(self, lora.KERNEL_ATTRIBUTES[target])

    def lora_factors(self, target):
        """The factors `(A, B)` of `target`."""
        prefix = f"lora_{lora.KERNEL_ATTRIBUTES[target]}"
        return getattr(self, f"{prefix}_a"), getattr(self, f"{prefix}_b")

    def lora_magnitude(self, target):
        """DoRA's magnitude of `target`, or `None` without DoRA."""
        if not self.use_dora:
            return None
        return getattr(self, f"lora_{lora.KERNEL_ATTRIBUTES[target]}_magnitude")

    # -- per call: DoRA's column scales ---------------------------------------
    # Keras' RNN layer asks its cell for dropout masks once before its loop
    # and resets them after; DoRA's scales and a mixed batch's per-example
    # factors (which depend on the weights and the route alone) are computed
    # at the same moment, once per call, not per step.

    def get_dropout_mask(self, step_input):
        if self.use_dora and not getattr(self, "_dora_scales", None):
            self._dora_scales = {
                t: self.dora_scale(t) for t in self.lora_targets
            }
        route = routing.current()
        if (
            route is not None
            and getattr(self, "_routed_route", None) is not route
        ):
            # Keyed on the call's route: a call that failed inside Keras'
            # loop leaves the cache set, and the next call reads it only if
            # it runs in the same route. Every public entry point opens a
            # route per call, so only code holding one `routing.routed`
            # block across a failed call and a change of weights could.
            self._routed = {
                t: self.route_factors(t, route) for t in self.lora_targets
            }
            self._routed_route = route
        return super().get_dropout_mask(step_input)

    def reset_dropout_mask(self):
        super().reset_dropout_mask()
        self._dora_scales = None
        self._routed = None
        self._routed_route = None

    def _call_dora_scale(self, target):
        scales = getattr(self, "_dora_scales", None)
        return scales[target] if scales else self.dora_scale(target)

    def _call_routed(self, target, route):
        cached = getattr(self, "_routed", None)
        if cached and getattr(self, "_routed_route", None) is route:
            return cached[target]
        return self.route_factors(target, route)

    # -- the factored step ----------------------------------------------------

    def _project(self, target, x, gates=None, training=False):
        """`x @ W[:, gates]` plus the LoRA term when `target` carries one.

        `gates` is a `slice` over gate blocks (`slice(0, 2)`: the first two
        gates) or `None` for all of them.
        """
        kernel = self.lora_kernel(target)
        columns = None
        if gates is not None:
            start, stop, _ = gates.indices(self.gates)
            columns = slice(start * self.units, stop * self.units)
            kernel = kernel[:, columns]
        y = ops.matmul(x, kernel)
        if target not in self.lora_targets:
            return y
        route = routing.current()
        if route is not None:
            return self._project_routed(target, x, y, columns, route)
        a, b = self.lora_factors(target)
        if training and self.lora_dropout > 0:
            x = x * self.lora_dropout_mask(target, x)
        if columns is not None:
            b = b[:, columns]
        if x.dtype == a.dtype:
            y = y + ops.matmul(ops.matmul(x, a) * self.scaling, b)
        else:
            # Mixed precision or a bfloat16 base: the LoRA branch stays
            # float32.
            low = ops.matmul(ops.cast(x, a.dtype), a) * self.scaling
            y = y + ops.cast(ops.matmul(low, b), y.dtype)
        if not self.use_dora:
            return y
        scale = self._call_dora_scale(target)
        if columns is not None:
            scale = scale[columns]
        return y * ops.cast(scale, y.dtype)

    def _project_routed(self, target, x, y, columns, route):
        """`y` plus each example's own adapter term (a mixed batch, see
        `adapter_bank.py`): `(x_b @ A_b) @ (s B_b)`, DoRA-scaled per example,
        computed as `((x @ A) * mask) @ B` over every adapter's factors side
        by side (`routing.RoutedFactors.masked_factors`); `x` is one step
        `(batch, features)` or a sequence `(batch, time, features)`."""
        self.require_routable()
        a, b, mask, scale = self._call_routed(target, route)
        if columns is not None:
            b = b[:, columns]
            scale = None if scale is None else scale[:, columns]
        sequence = len(x.shape) == 3
        low = ops.matmul(ops.cast(x, "float32"), a)
        low = low * (ops.expand_dims(mask, 1) if sequence else mask)
        y = y + ops.cast(ops.matmul(low, b), y.dtype)
        if scale is None:
            return y
        if sequence:
            scale = ops.expand_dims(scale, 1)
        return y * ops.cast(scale, y.dtype)

    def _gate_projections(self, target, xs, training, gates=None):
        """Projects per-gate inputs `xs` and returns one tensor per gate.

        Keras' `implementation=1` (used with recurrent dropout) gives every
        gate its own dropped-out input; otherwise all gates share one input
        and a single matmul serves them all.
        """
        if all(x is xs[0] for x in xs):
            merged = self._project(target, xs[0], gates, training)
            return ops.split(merged, len(xs), axis=-1)
        offset = 0 if gates is None else gates.indices(self.gates)[0]
        return [
            self._project(
                target, x, slice(offset + i, offset + i + 1), training
            )
            for i, x in enumerate(xs)
        ]

    def call(self, inputs, states, training=False):
        x_projected = self.input_projection(inputs, training)
        return self.recurrent_step(x_projected, states, training)

    def input_projection(self, inputs, training=False):
        """`inputs @ W + b` with the LoRA term of an adapted input kernel:
        every gate's input block, concatenated (`(..., gates * units)`).

        Works on one step `(batch, features)` or a whole sequence
        `(batch, time, features)`; the whole-sequence form is one large
        matmul instead of one per step, which the LoRA layers use where
        Keras' stock layer does the same (GRU on JAX and torch, LSTM on
        torch). Input dropout draws its mask from the step shape, so the
        layers precompute only without it.
        """
        xs = self._dropped_inputs(
            inputs, self.get_dropout_mask, self.dropout, training
        )
        x_gates = self._gate_projections("kernel", xs, training)
        projected = (
            x_gates[0]
            if len(x_gates) == 1
            else ops.concatenate(x_gates, axis=-1)
        )
        bias = self._input_bias()
        return projected if bias is None else ops.add(projected, bias)

    def _input_bias(self):
        return self.bias if self.use_bias else None

    def _dropped_inputs(self, x, mask_fn, rate, training):
        """`x` once per gate, each times its dropout mask when training."""
        if not (training and 0.0 < rate < 1.0):
            return [x] * self.gates
        mask = mask_fn(x)
        if isinstance(mask, (list, tuple)):
            return [x * m for m in mask]
        return [x * mask] * self.gates

    # -- configuration --------------------------------------------------------

    def get_config(self):
        config = self.lora_config_entries()
        for name in lora.INITIALIZER_FIELDS:
            config[name] = initializers.serialize(getattr(self, name))
        if hasattr(self, "implementation"):  # Keras' cells drop it
            config["implementation"] = self.implementation
        base_config = super().get_config()
        return {**base_config, **config}

    @classmethod
    def from_cell(cls, cell, rank, **lora_kwargs):
        """A LoRA cell with `cell`'s configuration and, if it is built, a copy
        of its weights. Until `B` moves its outputs equal `cell`'s.

        Args:
            cell: a built or unbuilt stock Keras cell of this class's
                `stock_class` (`keras.layers.GRUCell` for `LoRAGRUCell`).
            rank: the LoRA rank.
            **lora_kwargs: any other LoRA argument of the cell.
        """
        if isinstance(cell, LoRACellBase):
            raise ValueError(
                f"`from_cell` expects a stock Keras cell, but '{cell.name}' "
                f"is already a {type(cell).__name__}. Use it as it is."
            )
        if not isinstance(cell, cls.stock_class):
            raise ValueError(
                f"Received an invalid value for `cell`, expected a "
                f"keras.layers.{cls.stock_class.__name__}. "
                f"Received: cell={type(cell).__name__}"
            )
        arguments = stock_cell_arguments(cell)
        lora_cell = cls(rank=rank, **arguments, **lora_kwargs)
        if cell.built:
            lora_cell.build((None, cell.kernel.shape[0]))
            for name in ("kernel", "recurrent_kernel", "bias"):
                source = getattr(cell, name, None)
                if source is not None:
                    # Copy through numpy: on JAX `assign(variable)` can share
                    # one buffer, which `fit` then donates away.
                    getattr(lora_cell, name).assign(
                        np.array(ops.convert_to_numpy(source))
                    )
        return lora_cell


class EffectiveKernelRegularizer(keras.regularizers.Regularizer):
    """A targeted kernel's regularizer, applied to `W + s*A@B`.

    Keras collects regularization losses of trainable weights only, and a
    LoRA target is frozen: this rides on the adapter's `B` (the value it is
    called with is ignored), equals the stock loss while `B = 0` and reaches
    the factors. Nothing while the kernel itself is trainable (Keras then
    regularizes it directly); merged, the factors are frozen too.
    """

    def __init__(self, layer, target, regularizer):
        self.layer = layer
        self.target = target
        self.regularizer = regularizer

    def __call__(self, _):
        if self.layer.lora_kernel(self.target).trainable:
            return ops.zeros((), "float32")
        return self.regularizer(self.layer.effective_kernel(self.target))

    def get_config(self):
        return keras.regularizers.serialize(self.regularizer)
