"""Views of a LoRA cell that a LoRA layer shows Keras' RNN machinery for
one call, in place of the cell itself (`LoRARecurrentLayer`): the cell with
its kernels read as `W + s*A@B` (for the fused kernels), or the cell's step
called directly (for Keras' loop)."""


class EffectiveKernels:
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


class CellStep:
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
