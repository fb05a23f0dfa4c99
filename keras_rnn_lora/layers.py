"""Whole-sequence LoRA layers: `LoRASimpleRNN`, `LoRAGRU`, `LoRALSTM`.

Subclasses of `keras.layers.SimpleRNN`, `GRU` and `LSTM` whose cell is the
matching LoRA cell, so they keep the GPU fast path a custom cell normally
loses. Which path runs:

- GRU and LSTM on a GPU (TensorFlow and PyTorch; JAX where Keras' JAX
  backend has a cuDNN kernel): the backend's fused kernel, fed the
  effective kernel `W + s*A@B`;
- GRU and LSTM on torch's CPU, in inference and in training up to
  `TORCH_CPU_FUSED_MAX_UNITS` units: Keras' own torch loop, fed the same
  effective kernel (cheaper there than stepping the factored cell);
- otherwise, and SimpleRNN everywhere: the factored LoRA step
  `h@W + s*(h@A)@B` in Keras' RNN loop.

The effective kernel is formed once per call (not per step) and gradients
reach `A` and `B` through it. The fused kernels cannot apply LoRA dropout,
so training with `lora_dropout > 0` uses the factored loop too. On a CPU
the factored loop does what the stock layer's loop does: where Keras
projects the input sequence in one matmul before stepping (GRU on JAX and
torch, LSTM on torch), the LoRA layer does too, under the same conditions;
elsewhere both project per time step.
"""

import contextlib

import keras

from keras_rnn_lora import cell_base
from keras_rnn_lora import cell_views
from keras_rnn_lora import cells
from keras_rnn_lora import keras_internals
from keras_rnn_lora import lora
from keras_rnn_lora import routing

#: On torch without a GPU, the widest GRU/LSTM whose training step is faster
#: on Keras' own torch loop fed `W + s*A@B` than on the factored loop
#: (`benchmarks/torch_small_layers.py`, batch 32 x 20 steps, rank 8: the
#: effective-kernel step / the factored step 0.55 at 16 units, 0.83-0.85 at
#: 256, 1.12-1.15 at 512). Inference takes that path at every width.
TORCH_CPU_FUSED_MAX_UNITS = 256

# Arguments of the stock layer that belong to `keras.layers.RNN` itself.
_RNN_ARGS = (
    "return_sequences",
    "return_state",
    "go_backwards",
    "stateful",
    "unroll",
    "zero_output_for_mask",
)


def accelerator_present():
    """Whether the backend sees a GPU, where Keras has fused RNN kernels."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    if backend == "jax":
        import jax

        return jax.default_backend() == "gpu"
    return False


class _FusedOff:
    """What `use_cudnn` reads as outside a LoRA layer (see
    `LoRARecurrentLayer.use_cudnn`): falsy, and neither `True` nor `"auto"`,
    so fused kernels reading the raw kernels stay off."""

    def __bool__(self):
        return False

    def __repr__(self):
        return "FUSED_OFF_OUTSIDE"


FUSED_OFF_OUTSIDE = _FusedOff()


def _stock_and_cell(layer, units, rank, kwargs):
    """The stock layer `layer` stands for, and its LoRA cell.

    A throwaway stock layer validates every stock argument with Keras' own
    messages and gives the cell's full set of arguments."""
    name = type(layer).__name__
    lora_kwargs = {
        key: kwargs.pop(key)
        for key in lora.LORA_CONFIG_KEYS
        if key in kwargs and key != "rank"
    }
    try:
        stock = layer.stock_class(units, **kwargs)
    except ValueError as error:  # name this class, not the stock one
        raise ValueError(
            str(error).replace(
                f"passed to {layer.stock_class.__name__}:", f"passed to {name}:"
            )
        ) from None
    if rank is None:
        raise TypeError(
            f"{name} needs the LoRA rank: pass `rank`, e.g. "
            f"{name}({units}, rank=8)."
        )
    cell = layer.cell_class(
        rank=rank, **lora_kwargs, **cell_base.stock_cell_arguments(stock.cell)
    )
    return stock, cell


class LoRARecurrentLayer:
    """What `LoRASimpleRNN`, `LoRAGRU` and `LoRALSTM` share: the stock layer
    run over its LoRA cell, with the fused path fed `W + s*A@B`.

    A layer class sets `stock_class` (its Keras parent, e.g.
    `keras.layers.GRU`) and `cell_class` (its LoRA cell).
    """

    stock_class = None
    cell_class = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.stock_class is None or cls.cell_class is None:
            raise TypeError(
                f"{cls.__name__} must set `stock_class` and `cell_class`."
            )

    def __init__(self, units, rank=None, **kwargs):
        stock, cell = _stock_and_cell(self, units, rank, kwargs)
        keras.layers.RNN.__init__(
            self,
            cell,
            **{arg: getattr(stock, arg) for arg in _RNN_ARGS},
            activity_regularizer=stock.activity_regularizer,
            name=stock.name,
            dtype=stock.dtype_policy,
            trainable=stock.trainable,
        )
        self.input_spec = stock.input_spec
        if hasattr(stock, "use_cudnn"):
            self._use_cudnn = stock.use_cudnn
            # cuDNN ops are not XLA ops: as Keras does for the stock layers.
            self.supports_jit = stock.supports_jit or not accelerator_present()

    @property
    def use_cudnn(self):
        """The layer's `use_cudnn` setting as code outside the layer reads
        it: always off (`FUSED_OFF_OUTSIDE`, falsy).

        Keras' `Bidirectional` hands `cell.kernel` and
        `cell.recurrent_kernel` straight to its fused bidirectional kernel
        (cuDNN on a GPU) when `use_cudnn` allows it, which would skip the
        adapter (and a function traced while merged would skip it after
        an unmerge); reading it as off sends it to its two-layer path,
        where each direction runs this layer's own fused path with
        `W + s*A@B`. `get_config()` and this layer's own dispatch use the
        setting itself (`use_cudnn_setting`).
        """
        if isinstance(self.cell, cell_views.EffectiveKernels):
            return self._use_cudnn
        return FUSED_OFF_OUTSIDE

    @use_cudnn.setter
    def use_cudnn(self, value):
        # Keras' Bidirectional copies `use_cudnn` from the layer it wraps
        # onto its halves: the marker must not overwrite their setting.
        if value is not FUSED_OFF_OUTSIDE:
            self._use_cudnn = value

    @property
    def use_cudnn_setting(self):
        """The `use_cudnn` this layer was given (`"auto"`, `True`,
        `False`)."""
        return getattr(self, "_use_cudnn", False)

    @property
    def lora_weights(self):
        """The cell's live factor variables (see the cell's)."""
        return self.cell.lora_weights

    @property
    def lora_merged(self):
        """Whether the cell's adapter is merged into its kernels."""
        return self.cell.lora_merged

    def merge_lora(self, reset=False):
        """Merges the cell's adapter (see `LoRAGRUCell.merge_lora`)."""
        self.cell.merge_lora(reset=reset)
        return self

    def unmerge_lora(self):
        """Unmerges the cell's adapter, restoring the exact weights."""
        self.cell.unmerge_lora()
        return self

    def _fusable(self, training, mask):
        """Whether the stock layer's fused dispatch runs, fed `W + s*A@B`:
        on a GPU; and on torch's CPU where Keras' own torch loop (the input
        projected at once, plain torch per step) beats stepping the
        factored cell through `keras.ops`: in inference, and in training up
        to `TORCH_CPU_FUSED_MAX_UNITS` units, where the full-size kernel
        gradient it forms is still cheaper than the factored loop's per-step
        overhead. Never with LoRA dropout in training (the fused kernels
        cannot apply it)."""
        if self.use_cudnn_setting not in ("auto", True):
            return False
        if routing.current() is not None:  # each example its own adapter
            return False
        if training and self.cell.lora_dropout > 0:
            return False
        if accelerator_present():
            return True
        return (
            keras.backend.backend() == "torch"
            and (not training or self.cell.units <= TORCH_CPU_FUSED_MAX_UNITS)
            # The cells draw their own input dropout masks (one per gate
            # with `implementation=1`), which Keras' fused dispatch would
            # replace with one of its own.
            and not (training and self.cell.dropout > 0)
            and keras_internals.stock_precomputes(
                self.stock_class, True, self.cell, self.unroll, mask
            )
        )

    def _precompute_inputs(self, training, mask):
        """Whether the factored loop projects the whole input sequence in
        one matmul before stepping: where the stock layer's own loop does
        (`keras_internals.stock_precomputes`), so a LoRA layer and its stock
        layer do equal work on every backend; and not when input dropout or
        LoRA dropout on the input kernel draws per-step masks."""
        cell = self.cell
        per_step_masks = training and (
            cell.dropout > 0
            or (cell.lora_dropout > 0 and "kernel" in cell.lora_targets)
        )
        return not per_step_masks and keras_internals.stock_precomputes(
            self.stock_class,
            self.use_cudnn_setting,
            cell,
            self.unroll,
            mask,
        )

    def _factored_loop(self, sequences, initial_state, mask, training):
        # Keras' own loop (masks, go_backwards, unroll) stepping the
        # factored LoRA cell.
        projected = self._precompute_inputs(training, mask)
        if projected:
            sequences = self.cell.input_projection(sequences, training)
        with self._cell_view(
            cell_views.CellStep(self.cell, training, projected)
        ):
            return keras.layers.RNN.inner_loop(
                self, sequences, initial_state, mask, training=training
            )

    @contextlib.contextmanager
    def _cell_view(self, view):
        """`self.cell` reads as `view` for one call. Set without Keras'
        attribute tracking: the view is never a weight-owning child."""
        real_cell = self.cell
        keras_internals.set_untracked(self, "cell", view)
        try:
            yield
        finally:
            keras_internals.set_untracked(self, "cell", real_cell)

    def inner_loop(self, sequences, initial_state, mask, training=False):
        last, outputs, states = self._inner_loop(
            sequences, initial_state, mask, training
        )
        return last, keras_internals.contiguous_sequence(outputs), states

    def _inner_loop(self, sequences, initial_state, mask, training):
        if not self._fusable(training, mask):
            return self._factored_loop(sequences, initial_state, mask, training)
        # The stock layer's own dispatch (cuDNN where it can, else its step
        # loop) with the cell's kernels read as W + s*A@B.
        with self._cell_view(cell_views.EffectiveKernels(self.cell)):
            return self.stock_class.inner_loop(
                self, sequences, initial_state, mask, training=training
            )

    def get_config(self):
        config = self.stock_class.get_config(self)
        cell_config = self.cell.get_config()
        config.update({key: cell_config[key] for key in lora.LORA_CONFIG_KEYS})
        if hasattr(self, "_use_cudnn"):
            config["use_cudnn"] = self._use_cudnn
        if "implementation" in cell_config:
            config["implementation"] = cell_config["implementation"]
        return config


_ARGS_DOC = """
    Args:
        units: Positive integer, dimensionality of the output space.
        rank: int, the LoRA rank `r` (required), `1 <= rank <= units`.
{lora_args}
        **kwargs: every other argument of `keras.layers.{layer}`,
            unchanged.
"""
_SAME_AS_CELL = (
    "lora_alpha",
    "use_rslora",
    "lora_dropout",
    "lora_targets",
    "lora_a_initializer",
    "lora_b_initializer",
    "use_dora",
    "lora_init",
    "lora_merged",
    "trainable_base_weights",
    "named_adapters",
    "active_adapter",
)


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class LoRASimpleRNN(LoRARecurrentLayer, keras.layers.SimpleRNN):
    """`keras.layers.SimpleRNN` over a `LoRASimpleRNNCell`.

    No backend has a fused SimpleRNN kernel, so this always runs the
    factored step; it exists so that `enable_lora` keeps layer types.

    Example:

    >>> layer = keras_rnn_lora.LoRASimpleRNN(32, rank=4)
    >>> layer(np.zeros((2, 5, 8))).shape
    (2, 32)
    """

    stock_class = keras.layers.SimpleRNN
    cell_class = cells.LoRASimpleRNNCell


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class LoRAGRU(LoRARecurrentLayer, keras.layers.GRU):
    """`keras.layers.GRU` over a `LoRAGRUCell`, with the cuDNN path kept.

    On a GPU the effective kernel `W + s*A@B` goes to the backend's fused
    GRU kernel once per call; elsewhere the factored LoRA step runs. On JAX
    and torch, where Keras' GRU projects the whole input sequence in one
    matmul before stepping (unmasked, `reset_after`), this layer does too.

    Example:

    >>> layer = keras_rnn_lora.LoRAGRU(32, rank=4, return_sequences=True)
    >>> layer(np.zeros((2, 5, 8))).shape
    (2, 5, 32)
    """

    stock_class = keras.layers.GRU
    cell_class = cells.LoRAGRUCell


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class LoRALSTM(LoRARecurrentLayer, keras.layers.LSTM):
    """`keras.layers.LSTM` over a `LoRALSTMCell`, with the cuDNN path kept.

    On a GPU the effective kernel `W + s*A@B` goes to the backend's fused
    LSTM kernel once per call; elsewhere the factored LoRA step runs.

    Example:

    >>> layer = keras_rnn_lora.LoRALSTM(32, rank=4, return_state=True)
    >>> output, h, c = layer(np.zeros((2, 5, 8)))
    """

    stock_class = keras.layers.LSTM
    cell_class = cells.LoRALSTMCell


for _cls in (LoRASimpleRNN, LoRAGRU, LoRALSTM):
    _cell = f"`keras_rnn_lora.{_cls.cell_class.__name__}`"
    _cls.__doc__ += _ARGS_DOC.format(
        lora_args="\n".join(
            f"        {name}: as for {_cell}." for name in _SAME_AS_CELL
        ),
        layer=_cls.stock_class.__name__,
    )

LORA_LAYERS = (LoRASimpleRNN, LoRAGRU, LoRALSTM)
