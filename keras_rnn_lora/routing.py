"""Mixed batches: which adapter each example of a call runs with.

`call_with_adapters` (named_adapters.py) sets a route for the span of one
model call: the model's adapter names and, per example, an index into them
(-1: no adapter, the base model). Every layer carrying adapters reads it
while it computes, so the ids are part of whatever function traces the
call (a `tf.function`, a `jax.jit`, an export's serving function).
`RoutedFactors`, part of every layer's adapter bank (`adapter_bank.py`),
gathers each example's factors.
"""

import contextlib
import contextvars
import zlib

import numpy as np
from keras import ops

from keras_rnn_lora import variants

_ROUTE = contextvars.ContextVar("keras_rnn_lora_route", default=None)


class Route:
    """The adapters of one call: `names` (a tuple) and `ids` (an int32
    tensor, one index into `names` per example, -1 for none)."""

    def __init__(self, names, ids):
        self.names = tuple(names)
        self.ids = ops.convert_to_tensor(ids, "int32")
        # (id of a layer, target) -> its per-example factors (`prepared`).
        self.factors = {}


@contextlib.contextmanager
def routed(names, ids):
    """Within the block, layers carrying adapters run example `b` with
    adapter `names[ids[b]]` (none where `ids[b]` is -1)."""
    token = _ROUTE.set(Route(names, ids))
    try:
        yield
    finally:
        _ROUTE.reset(token)


def current():
    """The route of the call being computed, or `None`."""
    return _ROUTE.get()


@contextlib.contextmanager
def prepared(hosts):
    """Within the block, the layers of `hosts` (adapter hosts) read each
    example's factors for the current route gathered once, on entry.

    A step loop (decoding) calls the model once per step; entered before
    the loop, the loop's body reads these instead of gathering every
    adapter's factors at every step. The factors depend on the weights and
    the route alone, and neither may change within the block. On exit they
    are dropped (an enclosing block's are put back), and so is what the
    cells cache for one call, so that whatever runs next in the route reads
    the weights afresh. Without a route, nothing.
    """
    route = current()
    hosts = list(hosts)
    previous = {}
    try:
        if route is not None:
            for host in hosts:
                for target in host.lora_targets:
                    key = (id(host), target)
                    if key in route.factors:
                        previous[key] = route.factors[key]
                    route.factors[key] = host.factors_for_route(
                        target, route.names, route.ids
                    )
        yield
    finally:
        if route is not None:
            for host in hosts:
                for target in host.lora_targets:
                    route.factors.pop((id(host), target), None)
            route.factors.update(previous)
            reset_call_caches(hosts)


def reset_call_caches(hosts):
    """Drops what the cells among `hosts` cache for one call (their
    gathered factors, DoRA's scales, their dropout masks). Keras resets
    it after a cell's loop, but not when the call failed inside it."""
    for host in hosts:
        reset = getattr(host, "reset_dropout_mask", None)
        if reset is not None:
            reset()


def name_key(name):
    """An int32 key of an adapter name (CRC-32, 31 bits)."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def magnitude_name(a):
    """DoRA's magnitude name beside factor `A` (`lora_kernel_a` ->
    `lora_kernel_magnitude`)."""
    return f"{a.name[:-2]}_magnitude"


class RoutedFactors:
    """Each example's factors in a mixed batch; part of
    `adapter_bank.AdapterBank`.

    Two forms. `routed_factors` gathers each example's own `A`, `B`: a
    layer called once per model call (`Dense`, ...) multiplies by them with
    batched matmuls. `masked_factors` keeps every adapter's factors side by
    side and masks each example's columns: a recurrent cell multiplies at
    every step, where two plain matmuls and a multiply cost a fraction of
    two batched ones (a few operations a step, see docs/performance.md),
    for `sum of ranks` columns instead of one rank's.
    """

    #: The form `factors_for_route` gives: "gathered" or "masked".
    routed_form = "gathered"

    def route_factors(self, target, route):
        """`factors_for_route` for `route`: those `prepared` gathered for
        it, or gathered now."""
        found = route.factors.get((id(self), target))
        if found is not None:
            return found
        return self.factors_for_route(target, route.names, route.ids)

    def factors_for_route(self, target, names, ids):
        """`routed_factors` or `masked_factors`, as `routed_form` says."""
        if self.routed_form == "masked":
            return self.masked_factors(target, names, ids)
        return self.routed_factors(target, names, ids)

    def masked_factors(self, target, names, ids):
        """Every adapter of `names` side by side, and each example's
        columns: `A` `(..., R)` and `B * s` `(R, cols)` with `R` the sum of
        the ranks, a float32 mask `(batch, R)` that is 1 on the columns of
        the example's adapter (none where `ids` is -1), and DoRA's scale as
        `routed_factors` gives it. `((x @ A) * mask) @ B` is each example's
        `(x @ A_b) @ (s B_b)`."""
        stacks = [self._routed_adapter(target, name) for name in names]
        a_live, b_live = self.lora_factors(target)
        if not stacks:
            stacks = [
                (
                    ops.zeros((*a_live.shape[:-1], 1), "float32"),
                    ops.zeros((1, b_live.shape[-1]), "float32"),
                    None,
                )
            ]
        ranks = [int(a.shape[-1]) for a, _, _ in stacks]
        blocks = np.zeros((len(names) + 1, sum(ranks)), "float32")
        start = 0
        for row, rank in enumerate(ranks[: len(names)], start=1):
            blocks[row, start : start + rank] = 1.0  # row 0: no adapter
            start += rank
        index = ops.convert_to_tensor(ids, "int32") + 1
        mask = ops.take(ops.convert_to_tensor(blocks), index, axis=0)
        a_all = ops.concatenate([a for a, _, _ in stacks], axis=-1)
        b_all = ops.concatenate([b for _, b, _ in stacks], axis=0)
        return a_all, b_all, mask, self._scale_rows(stacks, b_live, index)

    def _scale_rows(self, stacks, b_live, index):
        """DoRA's column scale per example, or `None` without DoRA."""
        if all(scale is None for _, _, scale in stacks):
            return None
        ones = ops.ones((int(b_live.shape[-1]),), "float32")
        scales = [ones] + [ones if s is None else s for _, _, s in stacks]
        return ops.take(ops.stack(scales), index, axis=0)

    def routed_factors(self, target, names, ids):
        """Each example's `(A, B * s)` of `target` (`ids` indexes `names`,
        -1 for none), stacked: `A` `(batch, ..., r)`, `B` `(batch, r, cols)`,
        ranks zero-padded to the largest; and DoRA's column scale per
        example `(batch, cols)` (1 for an adapter without DoRA), or `None`
        when no adapter of `names` uses DoRA."""
        a_live, b_live = self.lora_factors(target)
        stacks, dora = [], False
        for name in names:
            stacks.append(self._routed_adapter(target, name))
            dora = dora or stacks[-1][2] is not None
        rank = max([1] + [int(a.shape[-1]) for a, _, _ in stacks])
        columns = int(b_live.shape[-1])
        kernel_shape = tuple(a_live.shape[:-1])
        a_stack = [ops.zeros((*kernel_shape, rank), "float32")]
        b_stack = [ops.zeros((rank, columns), "float32")]
        scales = [ops.ones((columns,), "float32")]
        for a, b, scale in stacks:
            pad = rank - int(a.shape[-1])
            if pad:
                a = ops.pad(a, [(0, 0)] * (len(a.shape) - 1) + [(0, pad)])
                b = ops.pad(b, [(0, pad), (0, 0)])
            a_stack.append(a)
            b_stack.append(b)
            scales.append(
                ops.ones((columns,), "float32") if scale is None else scale
            )
        index = ops.convert_to_tensor(ids, "int32") + 1  # row 0: no adapter
        a_rows = ops.take(ops.stack(a_stack), index, axis=0)
        b_rows = ops.take(ops.stack(b_stack), index, axis=0)
        scale_rows = (
            ops.take(ops.stack(scales), index, axis=0) if dora else None
        )
        return a_rows, b_rows, scale_rows

    def _routed_adapter(self, target, name):
        """`(A, B * s, DoRA scale or None)` of one adapter of this layer,
        zeros when it does not hold `name` or not on `target`."""
        a_live, b_live = self.lora_factors(target)
        magnitude = self.lora_magnitude(target)
        if not self._bank:  # one adapter, always the active one
            scale = self.dora_scale(target) if self.use_dora else None
            return ops.cast(a_live, "float32"), b_live * self.scaling, scale
        if name not in self._bank:
            config = None
        else:
            config = self.adapter_config(name)
        if config is None or target not in config.lora_targets:
            zeros_a = ops.zeros((*a_live.shape[:-1], 1), "float32")
            return zeros_a, ops.zeros((1, b_live.shape[-1]), "float32"), None
        variables = self._bank[name]
        a = ops.cast(variables[a_live.name], "float32")
        b = variables[b_live.name]
        m = variables.get(magnitude_name(a_live))
        if self._activatable_config(config):
            # The live variables where the active key names this adapter.
            live = ops.equal(self._active_key.value, name_key(name))
            a = ops.where(live, ops.cast(a_live, "float32"), a)
            b = ops.where(live, b_live.value, b.value)
            if m is not None:
                m = ops.where(live, magnitude.value, m.value)
        b = b * config.scaling
        scale = None
        if config.use_dora:
            kernel = self.lora_kernel(target)
            scale = variants.dora_scale(m, kernel, a, b, 1.0)
        return a, b, scale
