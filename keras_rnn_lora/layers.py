"""Whole-sequence LoRA layers: `LoRASimpleRNN`, `LoRAGRU`, `LoRALSTM`.

Subclasses of `keras.layers.SimpleRNN`, `GRU` and `LSTM` whose cell is the
matching LoRA cell, so they keep the GPU fast path a custom cell normally
loses. Which path runs:

- GRU and LSTM on a GPU (TensorFlow and PyTorch; JAX where Keras' JAX
  backend has a cuDNN kernel): the backend's fused kernel, fed the
  effective kernel `W + s*A@B`;
- GRU and LSTM on a CPU, and SimpleRNN everywhere: the factored LoRA step
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

from keras_rnn_lora import cells
from keras_rnn_lora import lora

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


def _contiguous(outputs):
    """`outputs` in contiguous memory on torch; unchanged elsewhere.

    Keras' torch `rnn()` returns the sequence as a transposed view of a
    time-major stack. A `Dense` after it then runs a batched matmul with its
    kernel broadcast over the batch, and a loss a log-softmax over strided
    memory; one copy here makes them plain 2D matmuls (`torch.profiler`:
    the paper's Elman model, 2 x 512, vocabulary 8,000, step 180 -> 107 ms).
    """
    if keras.backend.backend() == "torch" and hasattr(outputs, "contiguous"):
        return outputs.contiguous()
    return outputs


class _FusedOff:
    """What `use_cudnn` reads as outside a LoRA layer (see
    `_LoRALayerMixin.use_cudnn`): falsy, and neither `True` nor `"auto"`,
    so fused kernels reading the raw kernels stay off."""

    def __bool__(self):
        return False

    def __repr__(self):
        return "FUSED_OFF_OUTSIDE"


FUSED_OFF_OUTSIDE = _FusedOff()


class _EffectiveKernels:
    """A stand-in for a LoRA cell whose kernels read `W + s*A@B`.

    Everything else (the step itself, dropout masks, activations) is the
    real cell's, so if the backend has no fused kernel after all, Keras'
    fallback loop still runs the real, factored cell.
    """

    def __init__(self, cell):
        self._cell = cell
        self.kernel = cell.effective_kernel("kernel")
        self.recurrent_kernel = cell.effective_kernel("recurrent")

    def __getattr__(self, name):
        return getattr(self._cell, name)

    def __call__(self, *args, **kwargs):
        return self._cell(*args, **kwargs)


class _CellStep:
    """The cell as `keras.layers.RNN.inner_loop` calls it, one time step:
    `recurrent_step` over an input sequence projected beforehand, or the
    cell's whole `call`. Either is called directly, not through
    `Layer.__call__`, whose per-step bookkeeping (already done once by the
    layer's own call: dtype policy, autocast scope, training flag) is pure
    overhead per time step on torch's eager loop (the paper's Elman step:
    ours / the paper's loop 1.33 -> 1.15, timed A B)."""

    def __init__(self, cell, training, projected):
        self._cell = cell
        self._training = training
        self._step = cell.recurrent_step if projected else cell.call

    def __getattr__(self, name):
        return getattr(self._cell, name)

    def __call__(self, inputs, states):
        return self._step(inputs, states, training=self._training)


class _LoRALayerMixin:
    """Builds the stock layer, then runs it over the matching LoRA cell."""

    _keras_layer = None
    _lora_cell = None

    def __init__(self, units, rank=None, **kwargs):
        lora_kwargs = {
            key: kwargs.pop(key)
            for key in lora.LORA_CONFIG_KEYS
            if key in kwargs and key != "rank"
        }
        # A throwaway stock layer validates every stock argument with Keras'
        # own messages and gives the cell's full set of arguments.
        try:
            stock = self._keras_layer(units, **kwargs)
        except ValueError as error:  # name this class, not the stock one
            stock_name = self._keras_layer.__name__
            raise ValueError(
                str(error).replace(
                    f"passed to {stock_name}:",
                    f"passed to {type(self).__name__}:",
                )
            ) from None
        if rank is None:
            raise TypeError(
                f"{type(self).__name__} needs the LoRA rank: pass `rank`, "
                f"e.g. {type(self).__name__}({units}, rank=8)."
            )
        cell = self._lora_cell(
            rank=rank, **lora_kwargs, **cells.stock_cell_arguments(stock.cell)
        )
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
        if isinstance(self.cell, _EffectiveKernels):
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
        return self.cell.lora_weights

    @property
    def lora_merged(self):
        return self.cell.lora_merged

    def merge_lora(self, reset=False):
        self.cell.merge_lora(reset=reset)
        return self

    def unmerge_lora(self):
        self.cell.unmerge_lora()
        return self

    def _fusable(self, training):
        return (
            accelerator_present()
            and getattr(self, "_use_cudnn", False) in ("auto", True)
            and not (training and self.cell.lora_dropout > 0)
        )

    # The backends whose stock layer projects the input sequence in one
    # matmul before stepping, on any device (Keras 3.15: GRU on JAX and
    # torch, LSTM on torch; none on TensorFlow, none for SimpleRNN).
    _stock_precomputes_on = ()

    def _precompute_inputs(self, training, mask):
        """Whether the factored loop projects the whole input sequence in
        one matmul before stepping: where the stock layer's own loop does
        (`_stock_precomputes_on`; GRU with `reset_after`; no mask, no
        unroll, no recurrent dropout), so a LoRA layer and its stock layer
        do equal work on every backend; and not when input dropout or LoRA
        dropout on the input kernel draws per-step masks."""
        cell = self.cell
        return (
            keras.backend.backend() in self._stock_precomputes_on
            and getattr(self, "_use_cudnn", "auto") in ("auto", True)
            and getattr(cell, "reset_after", True)
            and mask is None
            and not self.unroll
            and not cell.recurrent_dropout
            and not (
                training
                and (
                    cell.dropout > 0
                    or (cell.lora_dropout > 0 and "kernel" in cell.lora_targets)
                )
            )
        )

    def _factored_loop(self, sequences, initial_state, mask, training):
        # Keras' own loop (masks, go_backwards, unroll) stepping the
        # factored LoRA cell.
        projected = self._precompute_inputs(training, mask)
        if projected:
            sequences = self.cell.input_projection(sequences, training)
        with self._cell_view(_CellStep(self.cell, training, projected)):
            return keras.layers.RNN.inner_loop(
                self, sequences, initial_state, mask, training=training
            )

    @contextlib.contextmanager
    def _cell_view(self, view):
        """`self.cell` reads as `view` for one call. Set without Keras'
        attribute tracking: the view is never a weight-owning child."""
        real_cell = self.cell
        object.__setattr__(self, "cell", view)
        try:
            yield
        finally:
            object.__setattr__(self, "cell", real_cell)

    def inner_loop(self, sequences, initial_state, mask, training=False):
        last, outputs, states = self._inner_loop(
            sequences, initial_state, mask, training
        )
        return last, _contiguous(outputs), states

    def _inner_loop(self, sequences, initial_state, mask, training):
        if not self._fusable(training):
            return self._factored_loop(sequences, initial_state, mask, training)
        # The stock layer's own dispatch (cuDNN where it can, else its step
        # loop) with the cell's kernels read as W + s*A@B.
        with self._cell_view(_EffectiveKernels(self.cell)):
            return self._keras_layer.inner_loop(
                self, sequences, initial_state, mask, training=training
            )

    def get_config(self):
        config = self._keras_layer.get_config(self)
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
        rank, lora_alpha, use_rslora, lora_dropout, lora_targets,
        lora_a_initializer, lora_b_initializer, lora_merged: as for
            `keras_rnn_lora.{cell}` (rank required).
        **kwargs: every other argument of `keras.layers.{layer}`,
            unchanged.
"""


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class LoRASimpleRNN(_LoRALayerMixin, keras.layers.SimpleRNN):
    """`keras.layers.SimpleRNN` over a `LoRASimpleRNNCell`.

    No backend has a fused SimpleRNN kernel, so this always runs the
    factored step; it exists so that `enable_lora` keeps layer types.

    Example:

    >>> layer = keras_rnn_lora.LoRASimpleRNN(32, rank=4)
    >>> layer(np.zeros((2, 5, 8))).shape
    (2, 32)
    """

    _keras_layer = keras.layers.SimpleRNN
    _lora_cell = cells.LoRASimpleRNNCell


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class LoRAGRU(_LoRALayerMixin, keras.layers.GRU):
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

    _keras_layer = keras.layers.GRU
    _lora_cell = cells.LoRAGRUCell
    _stock_precomputes_on = ("jax", "torch")


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class LoRALSTM(_LoRALayerMixin, keras.layers.LSTM):
    """`keras.layers.LSTM` over a `LoRALSTMCell`, with the cuDNN path kept.

    On a GPU the effective kernel `W + s*A@B` goes to the backend's fused
    LSTM kernel once per call; elsewhere the factored LoRA step runs.

    Example:

    >>> layer = keras_rnn_lora.LoRALSTM(32, rank=4, return_state=True)
    >>> output, h, c = layer(np.zeros((2, 5, 8)))
    """

    _keras_layer = keras.layers.LSTM
    _lora_cell = cells.LoRALSTMCell
    _stock_precomputes_on = ("torch",)


for _cls, _cell, _layer in (
    (LoRASimpleRNN, "LoRASimpleRNNCell", "SimpleRNN"),
    (LoRAGRU, "LoRAGRUCell", "GRU"),
    (LoRALSTM, "LoRALSTMCell", "LSTM"),
):
    _cls.__doc__ += _ARGS_DOC.format(cell=_cell, layer=_layer)

LORA_LAYERS = (LoRASimpleRNN, LoRAGRU, LoRALSTM)
