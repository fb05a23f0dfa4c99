"""LoRA recurrent cells: `LoRASimpleRNNCell`, `LoRAGRUCell`, `LoRALSTMCell`.

Each subclasses its public Keras cell and `cell_base.LoRACellBase`: the
targeted kernel(s) frozen, a trainable low-rank pair `(A, B)` added, and
the step written in the factored form `h@W + s*(h@A)@B`.
"""

import keras
from keras import ops
from keras import tree

from keras_rnn_lora import keras_internals
from keras_rnn_lora.cell_base import LoRACellBase
from keras_rnn_lora.cell_base import fill_docstring


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
@fill_docstring
class LoRASimpleRNNCell(LoRACellBase, keras.layers.SimpleRNNCell):
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
        inputs: A 2D tensor, with shape `(batch, features)`.
        states: A 2D tensor with shape `(batch, units)`, the previous state.
        training: Python boolean, whether dropout (and LoRA dropout) apply.

    Example:

    >>> cell = keras_rnn_lora.LoRASimpleRNNCell(32, rank=4)
    >>> rnn = keras.layers.RNN(cell, return_sequences=True)
    >>> rnn(np.zeros((2, 5, 8))).shape
    (2, 5, 32)

    {references}
    """

    stock_class = keras.layers.SimpleRNNCell
    gates = 1

    def recurrent_step(self, x_projected, states, training=False):
        """The step after the input projection (see `input_projection`)."""
        prev_output = states[0] if isinstance(states, (list, tuple)) else states
        [h] = self._dropped_inputs(
            prev_output,
            self.get_recurrent_dropout_mask,
            self.recurrent_dropout,
            training,
        )
        output = x_projected + self._project("recurrent", h, training=training)
        if self.activation is not None:
            output = self.activation(output)
        new_state = [output] if isinstance(states, (list, tuple)) else output
        return output, new_state


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
@fill_docstring
class LoRAGRUCell(LoRACellBase, keras.layers.GRUCell):
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

    stock_class = keras.layers.GRUCell
    gates = 3

    def _input_bias(self):
        if not self.use_bias:
            return None
        return self.bias[0] if self.reset_after else self.bias

    def recurrent_step(self, x_projected, states, training=False):
        """The step after the input projection (see `input_projection`)."""
        h_tm1 = states[0] if tree.is_nested(states) else states
        x_z, x_r, x_h = ops.split(x_projected, 3, axis=-1)
        hs = self._dropped_inputs(
            h_tm1,
            self.get_recurrent_dropout_mask,
            self.recurrent_dropout,
            training,
        )
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
@fill_docstring
class LoRALSTMCell(LoRACellBase, keras.layers.LSTMCell):
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

    stock_class = keras.layers.LSTMCell
    gates = 4

    def recurrent_step(self, x_projected, states, training=False):
        """The step after the input projection (see `input_projection`)."""
        h_tm1, c_tm1 = states[0], states[1]
        hs = self._dropped_inputs(
            h_tm1,
            self.get_recurrent_dropout_mask,
            self.recurrent_dropout,
            training,
        )
        h_gates = self._gate_projections("recurrent", hs, training)
        x_gates = ops.split(x_projected, 4, axis=-1)
        z = [x + h for x, h in zip(x_gates, h_gates, strict=True)]
        c, o = keras_internals.lstm_carry_and_output(self, z, c_tm1)
        h = o * self.activation(c)
        return h, [h, c]


LORA_CELLS = (LoRASimpleRNNCell, LoRAGRUCell, LoRALSTMCell)
