"""Merge state of a LoRA adapter: merge, unmerge, the exact pre-merge
kernels, which weights train, and loading a stored layer.

What a layer computes never depends on Python state: it always applies its
live factor variables, `W + s * A @ B`. Merging writes `W + s * A @ B` into
the kernel variable and sets the live `B` to zero, keeping the adapter
(the factors and the kernels before the merge) beside the layer for
`unmerge_lora`. So every function Keras or a user compiled before a merge,
an unmerge or an adapter load computes the new function: `model.predict`,
`evaluate`, `fit`, a `tf.function`, a `jax.jit`.

`MergeableLoRA` is mixed into every layer or cell that carries an adapter
(the recurrent cells, and the Dense/EinsumDense/Embedding layers); what a
host must provide is the abstract base `host.LoRAHost`. The stored form is
`lora_store.py`'s; loading restores the stored function whatever state the
receiving layer is in: a merged file loads into an unmerged twin (and the
reverse) without applying the delta twice or dropping it.
"""

import numpy as np

from keras_rnn_lora import folding
from keras_rnn_lora import lora
from keras_rnn_lora import lora_store
from keras_rnn_lora import variants
from keras_rnn_lora.adapter_bank import AdapterBank
from keras_rnn_lora.trainability import LoRATrainability
from keras_rnn_lora.trainability import check_trainable_base_weights


class MergeableLoRA(LoRATrainability, variants.AdaptedKernels, AdapterBank):
    """Merge, unmerge and save the adapter of the host layer (see module)."""

    lora_noun = "layer"  # what messages call the host

    def init_lora(
        self,
        config,
        lora_merged,
        trainable_base_weights=None,
        named_adapters=None,
        active_adapter=None,
    ):
        """Stores the adapter's `LoRAConfig`, the attributes read from it,
        the merge state, which base weights train (see
        `set_trainable_base_weights`) and the named adapters (see
        `adapter_bank.py`). Called by the host's `__init__`."""
        self.init_bank(named_adapters, active_adapter)
        self.lora_config = config
        self.rank = config.rank
        self.use_rslora = config.use_rslora
        self.lora_dropout = config.lora_dropout
        self.lora_targets = config.lora_targets
        self.use_dora = config.use_dora
        self.lora_init = config.lora_init
        for name in lora.INITIALIZER_FIELDS:
            setattr(self, name, lora.new_initializer(getattr(config, name)))
        self.scaling = config.scaling
        self._lora_merged = bool(lora_merged)
        self.trainable_base_weights = check_trainable_base_weights(
            trainable_base_weights
        )
        # While merged: the kernels before the merge (target -> array) and
        # the adapter's factors (name -> array), so that `unmerge_lora`
        # restores both bit for bit. `None` while merged means they are not
        # known here (the layer was built merged and its weights set
        # directly, e.g. with `set_weights`).
        self._premerge_kernels = {}
        self._premerge_factors = {}
        if self._lora_merged:
            self._premerge_kernels = self._premerge_factors = None
        # The factors' own trainability, frozen while merged: what
        # `unmerge_lora` gives back (a factor the user froze stays frozen).
        self._factors_trainable = None

    @property
    def lora_merged(self):
        """Whether `s * A @ B` is currently folded into the frozen kernels."""
        return self._lora_merged

    @property
    def lora_weights(self):
        """The adapter's live variables, `[A, B]` per target in
        `lora_targets` order, and DoRA's magnitude after them when
        `use_dora`. While merged `B` reads zero: the adapter is in the
        kernel (its values: `factor_values()`)."""
        try:  # during `build()` too, once the factors exist
            return [w for t in self.lora_targets for w in self._variables(t)]
        except AttributeError:  # not built yet
            return []

    def _variables(self, target):
        magnitude = self.lora_magnitude(target)
        factors = list(self.lora_factors(target))
        return factors if magnitude is None else [*factors, magnitude]

    def require_built(self, method):
        if not self.built:
            raise ValueError(
                f"`{method}()` was called on the unbuilt {self.lora_noun} "
                f"'{self.name}': it has no weights yet. Build it first, "
                "e.g. by calling it (or the RNN layer that holds it) on a "
                "batch, or with `.build(input_shape)`."
            )

    def require_known_adapter(self, method):
        """Raises `ValueError` naming `method` when this layer is merged and
        the adapter it merged is not known here (see `init_lora`)."""
        if self._lora_merged:
            self._require_premerge(method)

    def _require_premerge(self, method):
        if self._premerge_kernels is None:
            raise ValueError(
                f"`{method}()` needs the adapter that {self.lora_noun} "
                f"'{self.name}' merged, which is not known here: the layer "
                "was built merged (from a config) and its weights set "
                "directly (`set_weights` carries only the merged kernel). "
                "Load its weights from a `.keras` or `.weights.h5` file "
                "saved from the merged model instead: those record the "
                "pre-merge kernels and the factors."
            )

    def _where(self, target):
        return f"'{self.name}', kernel '{self.lora_kernel(target).name}'"

    # -- the kernels ----------------------------------------------------------

    def base_kernel(self, target):
        """The frozen kernel `W` the adapter of `target` applies to, as a
        NumPy array: the pre-merge kernel while merged."""
        self.require_built("base_kernel")
        if self._lora_merged:
            self._require_premerge("base_kernel")
            return self._premerge_kernels[target].copy()
        return lora.to_numpy(self.lora_kernel(target))

    def factor_values(self):
        """The adapter's factors as NumPy arrays (factor name -> array),
        merged or not."""
        self.require_built("factor_values")
        if self._lora_merged:
            self._require_premerge("factor_values")
            return {k: v.copy() for k, v in self._premerge_factors.items()}
        return {w.name: lora.to_numpy(w) for w in self.lora_weights}

    def delta(self, target):
        """The update `s * A @ B` of `target` from the live factors (zero
        while merged), float32, differentiable with respect to them."""
        a, b = self.lora_factors(target)
        return lora.lora_delta(a, b, self.scaling)

    def finish_lora_build(self):
        """Called at the end of the host's `build()`: a layer built merged
        starts with its live `B` at zero (the delta is in the kernel), an
        unmerged one is initialized from its kernels
        (`initialize_from_base`), and the trainability of every weight
        follows the settings."""
        if self._lora_merged:
            for target in self.lora_targets:
                b = self.lora_factors(target)[1]
                b.assign(np.zeros(b.shape, "float32"))
        elif not variants.is_initialization_deferred():
            self.initialize_from_base()
        self.build_bank()
        self._apply_trainability()

    def merged_kernels(self, factors=None, dtype=None):
        """`{target: W + s*A@B}` as NumPy arrays in the kernels' dtype (or
        `dtype`), from the base kernels and the adapter's factors (or
        `factors`, a mapping from factor name to value). Raises `ValueError`
        if any would hold NaN or Inf, or lose the update to a half-precision
        dtype; changes nothing."""
        self.require_built("merged_kernels")
        factors = factors or self.factor_values()
        merged = {}
        for target in self.lora_targets:
            merged[target] = self._merged_kernel(
                target, self.base_kernel(target), factors, dtype
            )
        return merged

    def _merged_kernel(self, target, kernel, factors, dtype=None):
        a, b = (factors[w.name] for w in self.lora_factors(target))
        magnitude = self.lora_magnitude(target)
        return folding.merged_kernel(
            kernel,
            a,
            b,
            self.scaling,
            dtype or self.lora_kernel(target).dtype,
            self._where(target),
            None if magnitude is None else factors[magnitude.name],
        )

    # -- merging --------------------------------------------------------------

    def merge_lora(self, reset=False):
        """Folds `s * A @ B` into each targeted kernel. Idempotent.

        The adapter is kept (its factors frozen while merged) with the
        pre-merge kernels, so `unmerge_lora()` restores them exactly. A
        merge whose result would hold NaN or Inf, or that a bfloat16 or
        float16 kernel would round more than 1% of away, is refused with a
        `ValueError` and the layer is left exactly as it was.

        With `reset=True` the merge is made permanent instead: the merged
        kernel becomes the new frozen base and a fresh adapter starts on it
        (initialized as the layer's `lora_init` says, from the merged
        kernel), so outputs are unchanged and the layer is ready to learn
        the next batch of new data.
        """
        self.require_built("merge_lora")
        if not self._lora_merged:
            merged = self.merged_kernels()
            self._set_merged(
                merged,
                {t: self.base_kernel(t) for t in merged},
                self.factor_values(),
            )
        if reset:
            self._premerge_kernels, self._premerge_factors = {}, {}
            for target in self.lora_targets:
                a, b = self.lora_factors(target)
                a.assign(self.lora_a_initializer(a.shape, dtype=a.dtype))
                b.assign(self.lora_b_initializer(b.shape, dtype=b.dtype))
            self._lora_merged = False
            self.initialize_from_base()
            self._thaw_factors()
        return self

    def _set_merged(self, merged, premerge_kernels, factors):
        """Enters the merged state: the kernels hold `merged`, the live `B`
        factors read zero (`A` keeps the adapter's value), and the adapter
        is kept for `unmerge_lora` (`None`: not known)."""
        for target, value in merged.items():
            self.lora_kernel(target).assign(value)
        for target in self.lora_targets:
            a, b = self.lora_factors(target)
            if factors is not None:
                a.assign(factors[a.name])
            b.assign(np.zeros(b.shape, "float32"))
            magnitude = self.lora_magnitude(target)
            if magnitude is not None:  # DoRA's scale reads 1 on the merge
                merged_kernel = lora.to_numpy(self.lora_kernel(target))
                norms = variants.column_norms_numpy(merged_kernel)
                magnitude.assign(norms.astype("float32"))
        self._premerge_kernels = premerge_kernels
        self._premerge_factors = factors
        self._lora_merged = True
        self._freeze_factors()

    def _set_unmerged(self, kernels, factors):
        for target, value in kernels.items():
            self.lora_kernel(target).assign(value)
        for weight in self.lora_weights:
            weight.assign(factors[weight.name])
        self._premerge_kernels, self._premerge_factors = {}, {}
        if self._lora_merged:
            self._lora_merged = False
            self._thaw_factors()

    def unmerge_lora(self):
        """Restores the exact kernels `merge_lora()` changed and the
        adapter's factors. Idempotent."""
        self.require_built("unmerge_lora")
        if not self._lora_merged:
            return self
        self._require_premerge("unmerge_lora")
        self._set_unmerged(self._premerge_kernels, self._premerge_factors)
        return self

    def check_lora_factors(self, values):
        """Checks `values` (factor name -> array) as `set_lora_factors`
        would take them, changing nothing: names, shapes, finite values and,
        while merged, a finite merged kernel. Returns them as float32."""
        self.require_built("set_lora_factors")
        arrays = folding.checked_factors(
            f"'{self.name}'",
            {w.name: w.shape for w in self.lora_weights},
            values,
        )
        if self._lora_merged:
            self.merged_kernels(arrays)
        return arrays

    def set_lora_factors(self, values):
        """Assigns the factors from `values` (factor name -> array) and keeps
        the merge state: a merged layer is re-merged with the new factors.
        Everything is checked (names, shapes, finite values, a finite merged
        kernel) before anything is assigned."""
        arrays = self.check_lora_factors(values)
        if self._lora_merged:
            self._set_merged(
                self.merged_kernels(arrays),
                self._premerge_kernels,
                arrays,
            )
        else:
            for weight in self.lora_weights:
                weight.assign(arrays[weight.name])
        return self

    # -- saving ---------------------------------------------------------------

    def _stock_weights(self):
        lora_ids = {id(w) for w in (*self.lora_weights, *self.bank_weights())}
        return [w for w in self.weights if id(w) not in lora_ids]

    def base_weights(self):
        # A cell or a Dense has no sub-layers: its weights are its own.
        return self._stock_weights()

    def save_own_variables(self, store):
        for i, weight in enumerate(self.base_weights()):
            store[f"{i}"] = weight
        known = not self._lora_merged or self._premerge_kernels is not None
        factors = (
            self.factor_values()
            if known
            else {w.name: lora.to_numpy(w) for w in self.lora_weights}
        )
        for name, value in factors.items():
            store[name] = value
        store[lora_store.MERGED_KEY] = np.array(int(self._lora_merged))
        if self._lora_merged and known:
            for target, kernel in self._premerge_kernels.items():
                store[lora_store.premerge_key(self, target)] = kernel
        for weight in self.bank_weights():
            store[weight.name] = weight

    def load_own_variables(self, store):
        """Loads this layer's store, or a stock layer's (the adapter then
        keeps its factors), and restores the stored function in this
        layer's own merge state."""
        stored = lora_store.read_store(self, store)
        active = self.stored_active_adapter(stored.bank)  # checked first
        base = self.base_weights()
        position = {id(w): i for i, w in enumerate(base)}
        stored_kernels = {
            target: stored.base[position[id(self.lora_kernel(target))]]
            for target in self.lora_targets
        }
        if stored.merged and not stored.premerge:
            # Only the merged function is known: this layer takes it on,
            # merged, whatever state it was in.
            for weight, value in zip(base, stored.base, strict=True):
                weight.assign(value)
            self.load_bank(stored.bank, active)
            self._set_merged(stored_kernels, None, None)
            return
        kernels = stored.premerge if stored.merged else stored_kernels
        factors = stored.factors
        if factors is None:  # a stock layer's store: the adapter stays
            factors = self._own_factors_or_live()
        merged = self.merged_kernels_from(kernels, factors)
        # Every value is known and checked: assign.
        for weight, value in zip(base, stored.base, strict=True):
            weight.assign(value)
        self.load_bank(stored.bank, active)
        if self._lora_merged:
            self._set_merged(merged, dict(kernels), dict(factors))
        else:
            self._set_unmerged(kernels, factors)
            if stored.factors is None:
                # A stock store: the parts of the adapter that come from the
                # kernel (PiSSA/OLoRA factors, DoRA's magnitude) come from
                # the kernel just loaded.
                self.initialize_from_base()

    def _own_factors_or_live(self):
        if self._lora_merged and self._premerge_factors is None:
            return {w.name: lora.to_numpy(w) for w in self.lora_weights}
        return self.factor_values()

    def merged_kernels_from(self, kernels, factors):
        """`{target: W + s*A@B}` from the given kernels and factors when this
        layer is merged (checked finite), else `{}`."""
        if not self._lora_merged:
            return {}
        return {
            target: self._merged_kernel(target, kernel, factors)
            for target, kernel in kernels.items()
        }

    def lora_config_entries(self):
        """The constructor arguments this mixin adds, for `get_config`."""
        return {
            **self.lora_config.to_dict(),
            lora_store.MERGED_KEY: self._lora_merged,
            "trainable_base_weights": (
                None
                if self.trainable_base_weights is None
                else list(self.trainable_base_weights)
            ),
            **self.bank_config_entries(),
        }
