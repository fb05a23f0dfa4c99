"""LoRA recurrent cells: `LoRASimpleRNNCell`, `LoRAGRUCell`, `LoRALSTMCell`.

Each cell subclasses its public Keras cell, freezes the targeted kernel(s) and
adds a trainable low-rank pair `(A, B)` whose scaled product is the update:

    h_{t-1} @ W_hh   becomes   h_{t-1} @ W_hh + s * (h_{t-1} @ A) @ B

The step stays factored, so it costs O(units * rank) extra per step and the
backward pass never forms a full-size gradient for the frozen kernel.
"""

import keras
import numpy as np
from keras import initializers
from keras import ops
from keras import tree

from keras_rnn_lora import lora

_REFERENCES = """
    Reference:
        - [Hu et al., 2021. LoRA: Low-Rank Adaptation of Large Language
          Models](https://arxiv.org/abs/2106.09685)
        - "Parameter-Efficient Learning of RNN using LoRA" (the two-stage
          pre-train / LoRA-update protocol this library reproduces)
"""

_LORA_ARGS_DOC = """
        rank: int, the rank `r` of the update, `1 <= rank <= units`.
        lora_alpha: float > 0, the LoRA alpha. Defaults to `rank` (scale 1).
        use_rslora: bool, default `False`: scale by `lora_alpha / rank`;
            `True`: by `lora_alpha / sqrt(rank)` (rank-stabilised LoRA).
        lora_dropout: float in `[0, 1)`, default 0. Dropout on the input of
            the LoRA branch, in training only. As with Keras' own RNN
            dropout, one mask is drawn per sequence and reused at every step.
        lora_targets: which kernels get a LoRA update, from
            `("kernel", "recurrent")`. Defaults to `("recurrent",)`: the
            hidden-state matrix only.
        lora_a_initializer: initializer for the `A` factors. Default
            `"he_uniform"`.
        lora_b_initializer: initializer for the `B` factors. Default
            `"zeros"`, so a fresh adapter leaves the outputs unchanged.
        lora_merged: bool, default `False`. Whether the cell starts merged
            (set by `get_config` so the merged state survives saving).
"""


_MERGED_KEY = "lora_merged"


class _EffectiveKernelRegularizer(keras.regularizers.Regularizer):
    """A targeted kernel's regularizer, applied to `W + s*A@B`.

    Attached to the adapter's `B` (which Keras does collect losses from);
    the value it is called with is ignored. Nothing while the kernel itself
    is trainable (Keras then regularizes it directly) or the cell is
    merged (the factors are frozen then, as the kernel is).
    """

    def __init__(self, cell, target, regularizer):
        self.cell = cell
        self.target = target
        self.regularizer = regularizer

    def __call__(self, _):
        kernel = getattr(self.cell, lora.KERNEL_ATTRIBUTES[self.target])
        if kernel.trainable:
            return ops.zeros((), "float32")
        return self.regularizer(self.cell.effective_kernel(self.target))

    def get_config(self):
        return keras.regularizers.serialize(self.regularizer)


class _StoredCell:
    """A cell's stored weights, read and checked before any is assigned."""

    def __init__(self, base, factors, merged, premerge):
        self.base = base  # the stock weights, in order
        self.factors = factors  # factor name -> array, None in a stock store
        self.merged = merged  # whether the stored kernels are merged
        self.premerge = premerge  # target -> pre-merge kernel when merged


def _read_store(cell, store):
    """Reads `store` for `cell` (see `_LoRACellMixin.save_own_variables`):
    every key known, every shape right, or a `ValueError` naming the cell."""
    keys = set(store.keys())
    base_weights = cell._base_weights()
    factor_weights = cell.lora_weights
    names = {w.name for w in factor_weights}
    premerge_keys = {
        f"premerge_{lora.KERNEL_ATTRIBUTES[t]}": t for t in cell.lora_targets
    }
    numeric = sorted(int(k) for k in keys if k.isdigit())
    n_base = len(base_weights)
    # 0.1.0 stored every weight by position: the stock ones, then factors.
    legacy = (
        not names & keys
        and bool(factor_weights)
        and numeric == list(range(n_base + len(factor_weights)))
    )
    unknown = keys - {str(i) for i in numeric} - names - {_MERGED_KEY}
    unknown -= set(premerge_keys)
    if unknown or not (legacy or numeric == list(range(n_base))):
        raise ValueError(
            f"Cell '{cell.name}' ({type(cell).__name__}) cannot load the "
            f"stored weights {sorted(keys)}: it expects the stock weights "
            f"'0'..'{n_base - 1}', optionally the factors {sorted(names)}, "
            f"'{_MERGED_KEY}' and the pre-merge kernels. Was the file saved "
            "from another architecture?"
        )

    def read(key, weight):
        value = np.asarray(store[key])
        if tuple(value.shape) != tuple(weight.shape):
            raise ValueError(
                f"Cell '{cell.name}': stored weight '{key}' has shape "
                f"{tuple(value.shape)}, but '{weight.name}' has "
                f"{tuple(weight.shape)}."
            )
        return value

    base = [read(f"{i}", w) for i, w in enumerate(base_weights)]
    factors = None
    if legacy:
        factors = {
            w.name: read(f"{n_base + i}", w)
            for i, w in enumerate(factor_weights)
        }
    elif names & keys:
        if names - keys:
            raise ValueError(
                f"Cell '{cell.name}': the stored weights lack the factors "
                f"{sorted(names - keys)}."
            )
        factors = {w.name: read(w.name, w) for w in factor_weights}
    premerge = {
        target: read(key, cell._kernel(target))
        for key, target in premerge_keys.items()
        if key in keys
    }
    if _MERGED_KEY in keys:
        merged = bool(np.asarray(store[_MERGED_KEY]))
    else:  # 0.1.0 wrote pre-merge kernels exactly when merged
        merged = bool(premerge)
    if merged and (factors is None or set(premerge) != set(cell.lora_targets)):
        raise ValueError(
            f"Cell '{cell.name}': the stored weights say they are merged but "
            "lack the factors or the pre-merge kernels needed to restore "
            "them."
        )
    return _StoredCell(base, factors, merged, premerge)


def _lora_docstring(cls):
    """Fills the `{lora_args}` and `{references}` slots of a docstring."""
    cls.__doc__ = cls.__doc__.replace(
        "{lora_args}", _LORA_ARGS_DOC.strip()
    ).replace("{references}", _REFERENCES.strip())
    return cls


class _LoRACellMixin:
    """The LoRA machinery shared by the three cells.

    Subclasses set `_keras_cell` (the stock parent class) and `_gates` (how
    many `units`-wide blocks the kernels hold), and write `call` in terms of
    `_project`, the LoRA-aware matmul.
    """

    _keras_cell = None
    _gates = 1

    def __init__(
        self,
        units,
        rank,
        lora_alpha=None,
        use_rslora=False,
        lora_dropout=0.0,
        lora_targets=("recurrent",),
        lora_a_initializer="he_uniform",
        lora_b_initializer="zeros",
        lora_merged=False,
        **kwargs,
    ):
        super().__init__(units, **kwargs)
        self.rank = lora.validate_rank(rank, self.units)
        self.lora_alpha = lora.validate_lora_alpha(lora_alpha, self.rank)
        self.use_rslora = lora.validate_use_rslora(use_rslora)
        self.lora_dropout = lora.validate_lora_dropout(lora_dropout)
        self.lora_targets = lora.validate_lora_targets(lora_targets)
        self.lora_a_initializer = initializers.get(lora_a_initializer)
        self.lora_b_initializer = initializers.get(lora_b_initializer)
        self.scaling = lora.lora_scaling(
            self.rank, self.lora_alpha, self.use_rslora
        )
        self._lora_merged = bool(lora_merged)
        # Target -> numpy copy of the kernel before `merge_lora`, so that
        # `unmerge_lora` restores it bit for bit.
        self._premerge_kernels = {}

    # -- weights ---------------------------------------------------------

    def build(self, input_shape):
        super().build(input_shape)
        input_dim = input_shape[-1]
        output_dim = self._gates * self.units
        for target in self.lora_targets:
            self._kernel(target).trainable = False
            fan_in = input_dim if target == "kernel" else self.units
            a, b = lora.add_lora_factors(
                self, target, fan_in, output_dim, self.rank
            )
            prefix = f"lora_{lora.KERNEL_ATTRIBUTES[target]}"
            setattr(self, f"{prefix}_a", a)
            setattr(self, f"{prefix}_b", b)
            # Keras collects regularization losses of trainable weights
            # only, and the targeted kernel is frozen: its regularizer rides
            # on `B` and applies to the effective kernel `W + s*A@B` (the
            # stock loss while `B = 0`), so it reaches the factors.
            regularizer = self._kernel(target).regularizer
            if regularizer is not None:
                b.regularizer = _EffectiveKernelRegularizer(
                    self, target, regularizer
                )
        if self._lora_merged:
            self._set_factors_trainable(False)

    def _kernel(self, target):
        return getattr(self, lora.KERNEL_ATTRIBUTES[target])

    def _factors(self, target):
        prefix = f"lora_{lora.KERNEL_ATTRIBUTES[target]}"
        return getattr(self, f"{prefix}_a"), getattr(self, f"{prefix}_b")

    def effective_kernel(self, target):
        """The kernel `target` ("kernel" or "recurrent") acts as: `W + s*A@B`
        while an unmerged adapter targets it, else `W`. Differentiable with
        respect to `A` and `B` (what the fused layers feed to cuDNN)."""
        kernel = self._kernel(target)
        if self._lora_merged or target not in self.lora_targets:
            return kernel
        return ops.add(kernel, ops.cast(self.delta(target), kernel.dtype))

    @property
    def lora_weights(self):
        """The LoRA factors, `[A, B]` per target in `lora_targets` order."""
        if not self.built:
            return []
        return [w for t in self.lora_targets for w in self._factors(t)]

    def _set_factors_trainable(self, trainable):
        for weight in self.lora_weights:
            weight.trainable = trainable

    # -- the factored step -----------------------------------------------

    def _project(self, target, x, gates=None, training=False):
        """`x @ W[:, gates]` plus the LoRA term when `target` carries one.

        `gates` is a `slice` over gate blocks (`slice(0, 2)`: the first two
        gates) or `None` for all of them.
        """
        kernel = self._kernel(target)
        columns = None
        if gates is not None:
            start, stop, _ = gates.indices(self._gates)
            columns = slice(start * self.units, stop * self.units)
            kernel = kernel[:, columns]
        y = ops.matmul(x, kernel)
        if self._lora_merged or target not in self.lora_targets:
            return y
        a, b = self._factors(target)
        if training and self.lora_dropout > 0:
            x = x * self._lora_dropout_mask(target, x)
        if columns is not None:
            b = b[:, columns]
        if x.dtype == a.dtype:
            return y + ops.matmul(ops.matmul(x, a) * self.scaling, b)
        # Mixed precision or a bfloat16 base: the LoRA branch stays float32.
        low = ops.matmul(ops.cast(x, a.dtype), a) * self.scaling
        return y + ops.cast(ops.matmul(low, b), y.dtype)

    def _gate_projections(self, target, xs, training, gates=None):
        """Projects per-gate inputs `xs` and returns one tensor per gate.

        Keras' `implementation=1` (used with recurrent dropout) gives every
        gate its own dropped-out input; otherwise all gates share one input
        and a single matmul serves them all.
        """
        if all(x is xs[0] for x in xs):
            merged = self._project(target, xs[0], gates, training)
            return ops.split(merged, len(xs), axis=-1)
        offset = 0 if gates is None else gates.indices(self._gates)[0]
        return [
            self._project(
                target, x, slice(offset + i, offset + i + 1), training
            )
            for i, x in enumerate(xs)
        ]

    def _dropped_inputs(self, x, mask_fn, rate, training):
        """`x` once per gate, each times its dropout mask when training."""
        if not (training and 0.0 < rate < 1.0):
            return [x] * self._gates
        mask = mask_fn(x)
        if isinstance(mask, (list, tuple)):
            return [x * m for m in mask]
        return [x * mask] * self._gates

    # -- LoRA dropout masks, drawn once per sequence like Keras' own ------

    def _lora_dropout_mask(self, target, x):
        attribute = f"_lora_{target}_dropout_mask"
        mask = getattr(self, attribute, None)
        if mask is None:
            mask = keras.random.dropout(
                ops.ones_like(x),
                rate=self.lora_dropout,
                seed=self.seed_generator,
            )
            setattr(self, attribute, mask)
        return mask

    def _wants_lora_dropout(self, target):
        return (
            self.lora_dropout > 0
            and target in self.lora_targets
            and not self._lora_merged
            and self.built
        )

    def get_dropout_mask(self, step_input):
        if self._wants_lora_dropout("kernel"):
            self._lora_dropout_mask("kernel", step_input)
        return super().get_dropout_mask(step_input)

    def get_recurrent_dropout_mask(self, step_input):
        if self._wants_lora_dropout("recurrent"):
            self._lora_dropout_mask("recurrent", step_input)
        return super().get_recurrent_dropout_mask(step_input)

    def reset_dropout_mask(self):
        super().reset_dropout_mask()
        self._lora_kernel_dropout_mask = None

    def reset_recurrent_dropout_mask(self):
        super().reset_recurrent_dropout_mask()
        self._lora_recurrent_dropout_mask = None

    # -- merging ---------------------------------------------------------

    @property
    def lora_merged(self):
        """Whether `s * A @ B` is currently folded into the frozen kernels."""
        return self._lora_merged

    def _require_built(self, method):
        if not self.built:
            raise ValueError(
                f"`{method}()` was called on the unbuilt cell "
                f"'{self.name}': it has no weights yet. Build it first, "
                "e.g. by calling the RNN layer that holds it on a batch, or "
                "`cell.build((None, input_dim))`."
            )

    def base_kernel(self, target):
        """The frozen kernel `W` the adapter of `target` applies to, as a
        NumPy array: the pre-merge kernel while merged."""
        self._require_built("base_kernel")
        if self._lora_merged:
            return self._premerge_kernels[target].copy()
        return lora.to_numpy(self._kernel(target))

    def delta(self, target):
        """The update `s * A @ B` of `target`, float32, differentiable with
        respect to the factors (what `effective_kernel` adds to `W`)."""
        a, b = self._factors(target)
        return lora.lora_delta(a, b, self.scaling)

    def merged_kernels(self, factors=None):
        """`{target: W + s*A@B}` as NumPy arrays in the kernels' dtype, from
        the base kernels and the current factors (or `factors`, a mapping
        from factor name to value). Raises `ValueError` if any would hold
        NaN or Inf; changes nothing."""
        self._require_built("merged_kernels")
        factors = factors or {}
        merged = {}
        for target in self.lora_targets:
            a, b = (
                factors[w.name] if w.name in factors else lora.to_numpy(w)
                for w in self._factors(target)
            )
            kernel = self._kernel(target)
            merged[target] = lora.merged_kernel(
                self.base_kernel(target),
                a,
                b,
                self.scaling,
                kernel.dtype,
                f"cell '{self.name}', kernel '{kernel.name}'",
            )
        return merged

    def merge_lora(self, reset=False):
        """Folds `s * A @ B` into each targeted kernel; the cell then runs
        the plain parent step (no LoRA overhead). Idempotent.

        The factors are kept (frozen while merged) and the pre-merge kernels
        saved, so `unmerge_lora()` restores them exactly. A merge whose
        result would hold NaN or Inf is refused with a `ValueError` and the
        cell is left exactly as it was.

        With `reset=True` the merge is made permanent instead: the merged
        kernel becomes the new frozen base and a fresh adapter starts on it
        (`A` re-initialized, `B = 0`), so outputs are unchanged and the cell
        is ready to learn the next batch of new data.
        """
        self._require_built("merge_lora")
        if not self._lora_merged:
            merged = self.merged_kernels()
            self._premerge_kernels = {
                target: self.base_kernel(target) for target in merged
            }
            for target, value in merged.items():
                self._kernel(target).assign(value)
            self._lora_merged = True
            self._set_factors_trainable(False)
        if reset:
            self._premerge_kernels = {}
            self._lora_merged = False
            self._set_factors_trainable(True)
            for target in self.lora_targets:
                a, b = self._factors(target)
                a.assign(self.lora_a_initializer(a.shape, dtype=a.dtype))
                b.assign(self.lora_b_initializer(b.shape, dtype=b.dtype))
        return self

    def unmerge_lora(self):
        """Restores the kernels `merge_lora()` changed and the LoRA step.
        Idempotent."""
        self._require_built("unmerge_lora")
        if not self._lora_merged:
            return self
        for target in self.lora_targets:
            self._kernel(target).assign(self._premerge_kernels[target])
        self._premerge_kernels = {}
        self._lora_merged = False
        self._set_factors_trainable(True)
        return self

    def set_lora_factors(self, values):
        """Assigns the factors from `values` (factor name -> array) and keeps
        the merge state: a merged cell is re-merged with the new factors.
        Everything is checked (names, shapes, finite values, a finite merged
        kernel) before anything is assigned."""
        self._require_built("set_lora_factors")
        weights = {w.name: w for w in self.lora_weights}
        if set(values) != set(weights):
            raise ValueError(
                f"Cell '{self.name}' has the factors {sorted(weights)}; "
                f"received values for {sorted(values)}."
            )
        arrays = {}
        for name, value in values.items():
            array = np.asarray(value)
            if tuple(array.shape) != tuple(weights[name].shape):
                raise ValueError(
                    f"Cell '{self.name}': factor '{name}' has shape "
                    f"{tuple(weights[name].shape)}; received "
                    f"{tuple(array.shape)}."
                )
            lora.check_finite(array, f"factor '{name}' of cell '{self.name}'")
            arrays[name] = array.astype("float32")
        merged = self.merged_kernels(arrays) if self._lora_merged else {}
        for name, array in arrays.items():
            weights[name].assign(array)
        for target, value in merged.items():
            self._kernel(target).assign(value)
        return self

    # -- saving ----------------------------------------------------------
    #
    # The store of a LoRA cell (`.keras` and `.weights.h5` files) holds:
    #   "0", "1", ...  the stock cell's weights, in its order (so a stock
    #                  cell's file loads here, and the reverse with
    #                  `to_base_model`);
    #   "lora_<kernel>_a", "lora_<kernel>_b"   the factors, by name;
    #   "lora_merged"  1 if the stored kernels are merged, else 0;
    #   "premerge_<kernel>"  the exact pre-merge kernels of a merged cell.
    # Loading restores the stored function whatever state the receiving
    # cell is in: a merged file loads into an unmerged cell (and the
    # reverse) without applying the delta twice or not at all.

    def _base_weights(self):
        lora_ids = {id(w) for w in self.lora_weights}
        return [w for w in self.weights if id(w) not in lora_ids]

    def save_own_variables(self, store):
        for i, weight in enumerate(self._base_weights()):
            store[f"{i}"] = weight
        for weight in self.lora_weights:
            store[weight.name] = weight
        store[_MERGED_KEY] = np.array(int(self._lora_merged))
        for target, kernel in self._premerge_kernels.items():
            store[f"premerge_{lora.KERNEL_ATTRIBUTES[target]}"] = kernel

    def load_own_variables(self, store):
        """Loads a LoRA cell's store, or a stock cell's (the factors then
        keep their values), and restores the stored function in this cell's
        own merge state. The 0.1.0 layout (every weight by position) loads
        too."""
        stored = _read_store(self, store)
        base = self._base_weights()
        position = {id(w): i for i, w in enumerate(base)}
        kernels = {
            target: stored.base[position[id(self._kernel(target))]]
            for target in self.lora_targets
        }
        factors = stored.factors or {
            w.name: lora.to_numpy(w) for w in self.lora_weights
        }
        if stored.merged:  # the stored kernels hold W + s*A@B
            kernels = stored.premerge
        merged = {}
        if self._lora_merged:
            for target, kernel in kernels.items():
                a, b = (factors[w.name] for w in self._factors(target))
                merged[target] = lora.merged_kernel(
                    kernel,
                    a,
                    b,
                    self.scaling,
                    self._kernel(target).dtype,
                    f"cell '{self.name}', kernel '{self._kernel(target).name}'",
                )
        # Every value is known and checked: assign.
        for weight, value in zip(base, stored.base, strict=True):
            weight.assign(value)
        for weight in self.lora_weights:
            weight.assign(factors[weight.name])
        for target, kernel in kernels.items():
            self._kernel(target).assign(merged.get(target, kernel))
        self._premerge_kernels = (
            {t: np.array(k) for t, k in kernels.items()}
            if self._lora_merged
            else {}
        )

    def get_config(self):
        config = {
            "rank": self.rank,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "lora_dropout": self.lora_dropout,
            "lora_targets": list(self.lora_targets),
            "lora_a_initializer": initializers.serialize(
                self.lora_a_initializer
            ),
            "lora_b_initializer": initializers.serialize(
                self.lora_b_initializer
            ),
            "lora_merged": self._lora_merged,
        }
        if hasattr(self, "implementation"):  # Keras' cells drop it
            config["implementation"] = self.implementation
        base_config = super().get_config()
        return {**base_config, **config}

    @classmethod
    def from_cell(cls, cell, rank, **lora_kwargs):
        """A LoRA cell with `cell`'s configuration and, if it is built, a copy
        of its weights. Until `B` moves its outputs equal `cell`'s.

        Args:
            cell: a stock `keras.layers.{cls._keras_cell.__name__}`.
            rank: the LoRA rank.
            **lora_kwargs: any other LoRA argument of the cell.
        """
        if isinstance(cell, _LoRACellMixin):
            raise ValueError(
                f"`from_cell` expects a stock Keras cell, but '{cell.name}' "
                f"is already a {type(cell).__name__}. Use it as it is."
            )
        if not isinstance(cell, cls._keras_cell):
            raise ValueError(
                f"Received an invalid value for `cell`, expected a "
                f"keras.layers.{cls._keras_cell.__name__}. "
                f"Received: cell={type(cell).__name__}"
            )
        config = cell.get_config()
        if hasattr(cell, "implementation"):  # not in Keras' cell config
            config["implementation"] = cell.implementation
        lora_cell = cls(rank=rank, **config, **lora_kwargs)
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


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
@_lora_docstring
class LoRASimpleRNNCell(_LoRACellMixin, keras.layers.SimpleRNNCell):
    """A `keras.layers.SimpleRNNCell` whose frozen kernels learn through LoRA.

    The Elman step with a low-rank update on the recurrent kernel (and, with
    `lora_targets=("kernel", "recurrent")`, on the input kernel too):

        h_t = activation(x_t @ W + b + h_{t-1} @ W_hh
                         + s * (h_{t-1} @ A) @ B)

    with `A` of shape `(units, rank)`, `B` of shape `(rank, units)` and
    `s = lora_alpha / rank` (`lora_alpha / sqrt(rank)` with rsLoRA).

    Args:
        units: Positive integer, dimensionality of the output space.
        {lora_args}
        **kwargs: every other argument of `keras.layers.SimpleRNNCell`
            (`activation`, `use_bias`, initializers, `dropout`,
            `recurrent_dropout`, `seed`, ...), unchanged.

    Call arguments:
        sequence: A 2D tensor, with shape `(batch, features)`.
        states: A 2D tensor with shape `(batch, units)`, the previous state.
        training: Python boolean, whether dropout (and LoRA dropout) apply.

    Example:

    >>> cell = keras_rnn_lora.LoRASimpleRNNCell(32, rank=4)
    >>> rnn = keras.layers.RNN(cell, return_sequences=True)
    >>> rnn(np.zeros((2, 5, 8))).shape
    (2, 5, 32)

    {references}
    """

    _keras_cell = keras.layers.SimpleRNNCell
    _gates = 1

    def call(self, sequence, states, training=False):
        if self._lora_merged:
            return super().call(sequence, states, training=training)
        prev_output = states[0] if isinstance(states, (list, tuple)) else states
        [x] = self._dropped_inputs(
            sequence, self.get_dropout_mask, self.dropout, training
        )
        [h] = self._dropped_inputs(
            prev_output,
            self.get_recurrent_dropout_mask,
            self.recurrent_dropout,
            training,
        )
        output = self._project("kernel", x, training=training)
        if self.bias is not None:
            output = ops.add(output, self.bias)
        output = output + self._project("recurrent", h, training=training)
        if self.activation is not None:
            output = self.activation(output)
        new_state = [output] if isinstance(states, (list, tuple)) else output
        return output, new_state


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
@_lora_docstring
class LoRAGRUCell(_LoRACellMixin, keras.layers.GRUCell):
    """A `keras.layers.GRUCell` whose frozen kernels learn through LoRA.

    The GRU step (gate layout `[z, r, h]`, as Keras) with a low-rank update
    on the recurrent kernel:

        [z, r, h]_rec = h_{t-1} @ W_hh + s * (h_{t-1} @ A) @ B

    With `reset_after=False` the candidate block sees `r * h_{t-1}`, so its
    LoRA term is `s * ((r * h_{t-1}) @ A) @ B[:, 2u:]`. `A` has shape
    `(units, rank)`, `B` `(rank, 3 * units)`, `s = lora_alpha / rank`
    (`lora_alpha / sqrt(rank)` with rsLoRA).

    Args:
        units: Positive integer, dimensionality of the output space.
        {lora_args}
        **kwargs: every other argument of `keras.layers.GRUCell`
            (`activation`, `reset_after`, initializers, `dropout`,
            `recurrent_dropout`, `seed`, ...), unchanged.

    Call arguments:
        inputs: A 2D tensor, with shape `(batch, features)`.
        states: A 2D tensor with shape `(batch, units)`, the previous state.
        training: Python boolean, whether dropout (and LoRA dropout) apply.

    Example:

    >>> cell = keras_rnn_lora.LoRAGRUCell(32, rank=4)
    >>> rnn = keras.layers.RNN(cell, return_state=True)
    >>> output, state = rnn(np.zeros((2, 5, 8)))
    >>> output.shape, state.shape
    ((2, 32), (2, 32))

    {references}
    """

    _keras_cell = keras.layers.GRUCell
    _gates = 3

    def call(self, inputs, states, training=False):
        if self._lora_merged:
            return super().call(inputs, states, training=training)
        h_tm1 = states[0] if tree.is_nested(states) else states
        xs = self._dropped_inputs(
            inputs, self.get_dropout_mask, self.dropout, training
        )
        hs = self._dropped_inputs(
            h_tm1,
            self.get_recurrent_dropout_mask,
            self.recurrent_dropout,
            training,
        )
        x_z, x_r, x_h = self._gate_projections("kernel", xs, training)
        if self.use_bias:
            input_bias = self.bias if not self.reset_after else self.bias[0]
            b_z, b_r, b_h = ops.split(input_bias, 3, axis=-1)
            x_z, x_r, x_h = x_z + b_z, x_r + b_r, x_h + b_h

        if self.reset_after:
            rec_z, rec_r, rec_h = self._gate_projections(
                "recurrent", hs, training
            )
            if self.use_bias:
                rb_z, rb_r, rb_h = ops.split(self.bias[1], 3, axis=-1)
                rec_z, rec_r, rec_h = rec_z + rb_z, rec_r + rb_r, rec_h + rb_h
            z = self.recurrent_activation(x_z + rec_z)
            r = self.recurrent_activation(x_r + rec_r)
            hh = self.activation(x_h + r * rec_h)
        else:
            rec_z, rec_r = self._gate_projections(
                "recurrent", hs[:2], training, gates=slice(0, 2)
            )
            z = self.recurrent_activation(x_z + rec_z)
            r = self.recurrent_activation(x_r + rec_r)
            rec_h = self._project("recurrent", r * hs[2], slice(2, 3), training)
            hh = self.activation(x_h + rec_h)

        h = z * h_tm1 + (1 - z) * hh
        new_state = [h] if tree.is_nested(states) else h
        return h, new_state


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
@_lora_docstring
class LoRALSTMCell(_LoRACellMixin, keras.layers.LSTMCell):
    """A `keras.layers.LSTMCell` whose frozen kernels learn through LoRA.

    The LSTM step (gate layout `[i, f, c, o]`, as Keras) with a low-rank
    update on the recurrent kernel:

        [i, f, c, o]_rec = h_{t-1} @ W_hh + s * (h_{t-1} @ A) @ B

    `A` has shape `(units, rank)`, `B` `(rank, 4 * units)`,
    `s = lora_alpha / rank` (`lora_alpha / sqrt(rank)` with rsLoRA).

    Args:
        units: Positive integer, dimensionality of the output space.
        {lora_args}
        **kwargs: every other argument of `keras.layers.LSTMCell`
            (`activation`, `unit_forget_bias`, initializers, `dropout`,
            `recurrent_dropout`, `seed`, ...), unchanged.

    Call arguments:
        inputs: A 2D tensor, with shape `(batch, features)`.
        states: A list of 2 tensors `[h, c]`, each `(batch, units)`.
        training: Python boolean, whether dropout (and LoRA dropout) apply.

    Example:

    >>> cell = keras_rnn_lora.LoRALSTMCell(32, rank=4)
    >>> rnn = keras.layers.RNN(cell)
    >>> rnn(np.zeros((2, 5, 8))).shape
    (2, 32)

    {references}
    """

    _keras_cell = keras.layers.LSTMCell
    _gates = 4

    def call(self, inputs, states, training=False):
        if self._lora_merged:
            return super().call(inputs, states, training=training)
        h_tm1, c_tm1 = states[0], states[1]
        xs = self._dropped_inputs(
            inputs, self.get_dropout_mask, self.dropout, training
        )
        hs = self._dropped_inputs(
            h_tm1,
            self.get_recurrent_dropout_mask,
            self.recurrent_dropout,
            training,
        )
        x_gates = self._gate_projections("kernel", xs, training)
        h_gates = self._gate_projections("recurrent", hs, training)
        z = [x + h for x, h in zip(x_gates, h_gates, strict=True)]
        if self.use_bias:
            z = [
                g + b
                for g, b in zip(
                    z, ops.split(self.bias, 4, axis=-1), strict=True
                )
            ]
        c, o = self._compute_carry_and_output_fused(z, c_tm1)
        h = o * self.activation(c)
        return h, [h, c]


LORA_CELLS = (LoRASimpleRNNCell, LoRAGRUCell, LoRALSTMCell)
