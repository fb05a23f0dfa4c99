"""Reference fused RNN kernels: what cuDNN computes, from the kernels given.

Each function has the signature of Keras' backend entry point
(`backend.gru`, `backend.lstm`, `backend.bidirectional_gru`,
`backend.bidirectional_lstm`) and computes the whole sequence from the
`kernel`, `recurrent_kernel` and `bias` it is handed: no cell is involved,
so a layer that hands over the wrong kernel gives wrong outputs here, as it
would on a GPU. Written with `keras.ops`, so it is differentiable on every
backend. `patch_fused_kernels` installs them (and makes the layers believe
an accelerator is present) for a test; the calls are counted.
"""

import collections

import keras
from keras import ops

from keras_rnn_lora import keras_internals
from keras_rnn_lora import layers as layers_lib


def _time_major(inputs, go_backwards, mask):
    steps = ops.unstack(ops.convert_to_tensor(inputs), axis=1)
    masks = [None] * len(steps)
    if mask is not None:
        masks = ops.unstack(ops.convert_to_tensor(mask), axis=1)
    if go_backwards:
        steps, masks = steps[::-1], masks[::-1]
    return steps, masks


def _carry(mask, new, old):
    """Masked steps keep the previous value, as Keras' RNN loop does."""
    if mask is None:
        return new
    return ops.where(ops.expand_dims(mask, -1), new, old)


def _finish(outputs, last, states, return_sequences):
    """As Keras' RNN loop returns them: with `go_backwards`, the outputs
    are in the order they were computed (reversed time)."""
    if not return_sequences:
        return last, ops.expand_dims(last, 1), states
    return last, ops.stack(outputs, axis=1), states


def gru(
    inputs,
    initial_state,
    mask,
    kernel,
    recurrent_kernel,
    bias,
    activation,
    recurrent_activation,
    return_sequences=False,
    go_backwards=False,
    unroll=False,
    reset_after=True,
):
    CALLS["gru"] += 1
    units = recurrent_kernel.shape[0]
    if bias is None:
        input_bias = recurrent_bias = ops.zeros((3 * units,))
    elif reset_after:
        input_bias, recurrent_bias = bias[0], bias[1]
    else:
        input_bias, recurrent_bias = bias, ops.zeros((3 * units,))
    h = ops.convert_to_tensor(initial_state)
    output = ops.zeros_like(h)
    outputs = []
    steps, masks = _time_major(inputs, go_backwards, mask)
    for x, m in zip(steps, masks, strict=True):
        x_z, x_r, x_h = ops.split(ops.matmul(x, kernel) + input_bias, 3, -1)
        w_zr, w_h = (
            recurrent_kernel[:, : 2 * units],
            recurrent_kernel[:, 2 * units :],
        )
        b_zr, b_h = recurrent_bias[: 2 * units], recurrent_bias[2 * units :]
        h_z, h_r = ops.split(ops.matmul(h, w_zr) + b_zr, 2, -1)
        z = recurrent_activation(x_z + h_z)
        r = recurrent_activation(x_r + h_r)
        if reset_after:
            candidate = activation(x_h + r * (ops.matmul(h, w_h) + b_h))
        else:
            candidate = activation(x_h + ops.matmul(r * h, w_h))
        new_h = z * h + (1 - z) * candidate
        h = _carry(m, new_h, h)
        output = _carry(m, new_h, output)
        outputs.append(output)
    return _finish(outputs, output, [h], return_sequences)


def lstm(
    inputs,
    initial_state_h,
    initial_state_c,
    mask,
    kernel,
    recurrent_kernel,
    bias,
    activation,
    recurrent_activation,
    return_sequences=False,
    go_backwards=False,
    unroll=False,
):
    CALLS["lstm"] += 1
    h = ops.convert_to_tensor(initial_state_h)
    c = ops.convert_to_tensor(initial_state_c)
    output = ops.zeros_like(h)
    outputs = []
    steps, masks = _time_major(inputs, go_backwards, mask)
    for x, m in zip(steps, masks, strict=True):
        z = ops.matmul(x, kernel) + ops.matmul(h, recurrent_kernel)
        if bias is not None:
            z = z + bias
        z_i, z_f, z_c, z_o = ops.split(z, 4, -1)
        new_c = recurrent_activation(z_f) * c + recurrent_activation(
            z_i
        ) * activation(z_c)
        new_h = recurrent_activation(z_o) * activation(new_c)
        h, c = _carry(m, new_h, h), _carry(m, new_c, c)
        output = _carry(m, new_h, output)
        outputs.append(output)
    return _finish(outputs, output, [h, c], return_sequences)


def _bidirectional(
    one_way, name, inputs, fwd_states, bwd_states, kernels, **kw
):
    CALLS[name] += 1
    fwd_kernels, bwd_kernels = kernels
    forward = one_way(inputs, *fwd_states, None, *fwd_kernels, **kw)
    backward = one_way(
        inputs, *bwd_states, None, *bwd_kernels, go_backwards=True, **kw
    )
    CALLS[one_way.__name__] -= 2  # counted as one bidirectional call
    last, sequence, states = backward
    if kw["return_sequences"]:
        # Keras' fused helpers return both directions in original order.
        sequence = ops.flip(sequence, axis=1)
    return forward, (last, sequence, states)


def bidirectional_gru(
    inputs,
    fwd_initial_state,
    bwd_initial_state,
    mask,
    fwd_kernel,
    fwd_recurrent_kernel,
    fwd_bias,
    bwd_kernel,
    bwd_recurrent_kernel,
    bwd_bias,
    activation,
    recurrent_activation,
    return_sequences=False,
    unroll=False,
    reset_after=True,
):
    return _bidirectional(
        gru,
        "bidirectional_gru",
        inputs,
        [fwd_initial_state],
        [bwd_initial_state],
        (
            (fwd_kernel, fwd_recurrent_kernel, fwd_bias),
            (bwd_kernel, bwd_recurrent_kernel, bwd_bias),
        ),
        activation=activation,
        recurrent_activation=recurrent_activation,
        return_sequences=return_sequences,
        reset_after=reset_after,
    )


def bidirectional_lstm(
    inputs,
    fwd_initial_state_h,
    fwd_initial_state_c,
    bwd_initial_state_h,
    bwd_initial_state_c,
    mask,
    fwd_kernel,
    fwd_recurrent_kernel,
    fwd_bias,
    bwd_kernel,
    bwd_recurrent_kernel,
    bwd_bias,
    activation,
    recurrent_activation,
    return_sequences=False,
    unroll=False,
):
    return _bidirectional(
        lstm,
        "bidirectional_lstm",
        inputs,
        [fwd_initial_state_h, fwd_initial_state_c],
        [bwd_initial_state_h, bwd_initial_state_c],
        (
            (fwd_kernel, fwd_recurrent_kernel, fwd_bias),
            (bwd_kernel, bwd_recurrent_kernel, bwd_bias),
        ),
        activation=activation,
        recurrent_activation=recurrent_activation,
        return_sequences=return_sequences,
    )


CALLS = collections.Counter()
KERNELS = {
    "gru": gru,
    "lstm": lstm,
    "bidirectional_gru": bidirectional_gru,
    "bidirectional_lstm": bidirectional_lstm,
}


def patch_fused_kernels(monkeypatch):
    """Installs the reference kernels as Keras' fused entry points and makes
    the LoRA layers see an accelerator; returns the call counter."""
    CALLS.clear()
    for name, function in KERNELS.items():
        monkeypatch.setattr(
            keras_internals.fused_kernel_module(), name, function
        )
    monkeypatch.setattr(layers_lib, "accelerator_present", lambda: True)
    assert keras.backend.backend() in ("tensorflow", "jax", "torch")
    return CALLS
