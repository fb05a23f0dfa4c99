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
        use_dora: bool, default `False`. DoRA: each adapted kernel acts as
            `m * (W + s*A@B) / column_norm(W + s*A@B)`, with a trainable
            magnitude `m` per column (`lora_<kernel>_magnitude`),
            initialized to the column norms of `W`. The norm is computed once
            per call of the RNN layer, the step stays factored.
        lora_init: `"default"` (the initializers above), `"pissa"` or
            `"olora"`: `A` and `B` from the kernel's top singular vectors or
            its QR decomposition, the frozen kernel becoming the residual
            `W - s*A@B` (outputs unchanged).
        lora_merged: bool, default `False`. Whether the cell starts merged
            (set by `get_config` so the merged state survives saving).
        trainable_base_weights: `None` (default: every unadapted weight
            trains, as in the stock cell) or the names of those that do
            (`()`: only the adapter; set by `mark_only_lora_as_trainable`).
        named_adapters: the adapters the cell holds besides the live one,
            by name, as `LoRAConfig` dicts (set by `get_config`; see
            `keras_rnn_lora.add_adapter`).
        active_adapter: the name of the live adapter, default `"default"`.
"""


def fill_docstring(cls):
    """Fills the `{lora_args}` and `{references}` slots of a cell's
    docstring."""
    cls.__doc__ = cls.__doc__.replace(
        "{lora_args}", _LORA_ARGS_DOC.strip()
    ).replace("{references}", _REFERENCES.strip())
    return cls


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
