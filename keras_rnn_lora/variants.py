"""The math of the LoRA variants: DoRA's column norms and magnitude, and
the PiSSA and OLoRA initializations.

DoRA (Liu et al. 2024) adapts a kernel `W` (Keras layout: `(inputs, ...,
columns)`, one column per output unit) as

    m * (W + s*A@B) / column_norm(W + s*A@B)

with a trainable magnitude `m` per column. The norm depends only on the
weights, so a layer computes it once per call and the step stays factored:
`(h@W + s*(h@A)@B) * (m / norm)`, column by column. The norm is taken
one block of rows at a time (`column_norms_by_blocks`): the full-size
`W + s*A@B` is never formed.

PiSSA (Meng et al. 2024) starts `A`, `B` from the kernel's top-`rank`
singular vectors, OLoRA (Büyükakyüz 2024) from its QR decomposition; the
frozen kernel becomes the residual `W - s*A@B`, so the layer computes what
it computed before. Factors follow PEFT's: PiSSA splits the singular values
evenly between the two (divided by the scale), OLoRA takes `Q` and `R`.
"""

import contextlib
import contextvars

import numpy as np
from keras import ops

from keras_rnn_lora.host import LoRAHost

#: Below this a column's norm is taken as this: a column of zeros stays
#: zero instead of dividing by zero.
MIN_NORM = 1e-12


def _numpy(value):
    return np.array(ops.convert_to_numpy(value))


#: Rows of `W` per block in `column_norms_by_blocks`: at most this many
#: values (4 MiB of float32). A full-size temporary costs more than the
#: arithmetic on torch's CPU, which maps fresh memory for every tensor above
#: 32 MiB (a 2048 x 6144 kernel is 48 MiB).
BLOCK_VALUES = 1 << 20


def column_norms_by_blocks(kernel, a, b, scaling):
    """The L2 norm of each column of `W + s*A@B` (over every axis but the
    last; float32, differentiable), formed and squared one block of rows
    at a time (`BLOCK_VALUES`), so no full-size temporary exists in the
    forward pass or the backward one. Forming each block keeps the norm
    exact where the adapter nearly cancels a column (an expansion of
    `|W_j + s*A B_j|^2` into separate terms would not). `kernel` has Keras'
    LoRA layout (columns on the last axis), `a` the kernel's shape with the
    rank last, `b` is `(rank, columns)`."""
    columns = kernel.shape[-1]
    rank = a.shape[-1]
    w = ops.reshape(kernel, (-1, columns))
    a = ops.reshape(ops.cast(a, "float32"), (-1, rank))
    b = ops.cast(b, "float32") * scaling
    step = max(1, BLOCK_VALUES // columns)
    squares = 0.0
    for start in range(0, w.shape[0], step):
        block = ops.cast(w[start : start + step], "float32") + ops.matmul(
            a[start : start + step], b
        )
        squares = squares + ops.sum(ops.square(block), axis=0)
    # The floor before the root keeps the gradient finite at a zero column.
    return ops.sqrt(ops.maximum(squares, MIN_NORM * MIN_NORM))


def dora_scale(magnitude, kernel, a, b, scaling):
    """`m / column_norm(W + s*A@B)`: what DoRA multiplies each column of the
    adapted kernel's output by (`column_norms_by_blocks`)."""
    norms = column_norms_by_blocks(kernel, a, b, scaling)
    return ops.cast(magnitude, "float32") / norms


def column_norms_numpy(kernel):
    """The L2 norm of each column of `kernel` (over every axis but the
    last), float64 NumPy."""
    kernel = np.asarray(kernel, "float64")
    return np.sqrt(
        np.sum(np.square(kernel), axis=tuple(range(kernel.ndim - 1)))
    )


def dora_merged(adapted_kernel, magnitude):
    """`m * V / column_norm(V)` for `V = W + s*A@B`, float64 NumPy."""
    adapted = np.asarray(adapted_kernel, "float64")
    norms = np.maximum(column_norms_numpy(adapted), MIN_NORM)
    return adapted * (np.asarray(magnitude, "float64") / norms)


def principal_factors(kernel, rank, scaling, method):
    """Factors `(A, B)` of `kernel` (float32 NumPy, Keras' LoRA shapes: `A`
    is the kernel's shape with `rank` as its last axis, `B` is
    `(rank, columns)`) such that `scaling * A @ B` is the kernel's leading
    rank-`rank` part: its top singular vectors (`"pissa"`) or the first
    `rank` columns of `Q` and rows of `R` of its QR decomposition
    (`"olora"`)."""
    kernel = np.asarray(kernel, "float64")
    leading = kernel.shape[:-1]
    matrix = kernel.reshape(-1, kernel.shape[-1])
    if method == "pissa":
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        root = np.sqrt(s[:rank] / scaling)
        a = u[:, :rank] * root
        b = root[:, None] * vt[:rank]
    elif method == "olora":
        # The first `rank` columns of Q depend on the first `rank` columns
        # of the kernel alone, and R's first rows are Q's columns times it:
        # no full decomposition.
        a, _ = np.linalg.qr(matrix[:, :rank])
        b = a.T @ matrix
    else:
        raise ValueError(f"No principal factors for lora_init={method!r}.")
    missing = rank - a.shape[1]  # a kernel with fewer rows than `rank`
    if missing > 0:
        a = np.pad(a, ((0, 0), (0, missing)))
        b = np.pad(b, ((0, missing), (0, 0)))
    a = a.reshape(*leading, rank)
    return a.astype("float32"), b.astype("float32")


_DEFERRED = contextvars.ContextVar("keras_rnn_lora_deferred", default=False)


@contextlib.contextmanager
def initialization_deferred():
    """Within the block, layers built skip `initialize_from_base`: their
    kernels are about to be replaced (`enable_lora` copies the trained ones
    in, then initializes), so a PiSSA SVD of the random kernel would be
    wasted."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def is_initialization_deferred():
    return _DEFERRED.get()


def add_magnitude(layer, prefix, output_dim):
    """Creates DoRA's float32 magnitude `<prefix>_magnitude` (one value per
    column, set from the kernel by `initialize_from_base`)."""
    return layer.add_weight(
        name=f"{prefix}_magnitude",
        shape=(output_dim,),
        initializer="ones",
        dtype="float32",
        autocast=False,
    )


class AdaptedKernels(LoRAHost):
    """What an adapted kernel is, from the host's live variables: `W +
    s*A@B`, DoRA's column scale, and the adapter set up from the kernel
    (the part of `merging.MergeableLoRA` the variants change)."""

    def adapted_kernel(self, target):
        """`W + s*A@B` from the live variables, in the kernel's dtype,
        differentiable with respect to the factors (before DoRA's column
        scaling, see `effective_kernel`)."""
        kernel = self.lora_kernel(target)
        return kernel + ops.cast(self.delta(target), kernel.dtype)

    def dora_scale(self, target):
        """DoRA's column scale `m / column_norm(W + s*A@B)` of `target`
        (float32, live variables, differentiable)."""
        a, b = self.lora_factors(target)
        return dora_scale(
            self.lora_magnitude(target),
            self.lora_kernel(target),
            a,
            b,
            self.scaling,
        )

    def effective_kernel(self, target):
        """The kernel `target` acts as: `W + s*A@B` from the live variables,
        column-scaled by DoRA's `m / norm` with `use_dora` (merged, `B` is
        zero and `W` holds the merge). Differentiable with respect to the
        adapter (what fused kernels are fed)."""
        if target not in self.lora_targets:
            return self.lora_kernel(target)
        kernel = self.adapted_kernel(target)
        if not self.use_dora:
            return kernel
        return kernel * ops.cast(self._call_dora_scale(target), kernel.dtype)

    def _call_dora_scale(self, target):
        # A host that computes the scale once per call (the cells) returns
        # it from there.
        return self.dora_scale(target)

    def initialize_from_base(self):
        """Sets the adapter up from the frozen kernels as they are now: with
        `lora_init="pissa"`/`"olora"`, `A` and `B` from each kernel's
        leading rank-`rank` part and the kernel replaced by the residual
        `W - s*A@B`; with `use_dora`, the magnitude from the column norms
        of `W + s*A@B`. The layer computes what it computed before. Called
        when a layer is built and when `enable_lora` has copied the trained
        weights in; with the default initialization and no DoRA it changes
        nothing."""
        if not self.lora_weights:
            self.require_built("initialize_from_base")
        for target in self.lora_targets:
            kernel = self.lora_kernel(target)
            a, b = self.lora_factors(target)
            if self.lora_init != "default":
                weights = _numpy(kernel).astype("float64")
                a_value, b_value = principal_factors(
                    weights, self.rank, self.scaling, self.lora_init
                )
                residual = weights - self.scaling * (
                    a_value.astype("float64").reshape(-1, self.rank)
                    @ b_value.astype("float64")
                ).reshape(weights.shape)
                kernel.assign(residual.astype("float32"))
                a.assign(a_value)
                b.assign(b_value)
            magnitude = self.lora_magnitude(target)
            if magnitude is not None:
                adapted = _numpy(self.adapted_kernel(target))
                norms = column_norms_numpy(adapted)
                magnitude.assign(norms.astype("float32"))
