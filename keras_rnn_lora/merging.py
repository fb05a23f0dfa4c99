"""Merge state of a LoRA adapter: merge, unmerge, the exact pre-merge
kernels, and how all of it is saved and loaded.

`MergeableLoRA` is mixed into every layer or cell that carries an adapter
(the recurrent cells, and the Dense/EinsumDense/Embedding layers). The host
provides:

- `lora_targets`: the names of the adapted kernels;
- `lora_kernel(target)`: the frozen kernel variable `W` of a target;
- `lora_factors(target)`: its factors `(A, B)`;
- `scaling`, `lora_a_initializer`, `lora_b_initializer`;
- `_lora_merged`: a bool it reads in its forward pass (merged: plain `W`).

Stores (`.keras` and `.weights.h5` files) of such a layer hold the stock
weights by position (`"0"`, `"1"`, ...: exactly what the stock layer
stores, so a stock file loads here and `to_base_model` goes back), the
factors by name, `"lora_merged"` and, while merged, `"premerge_<kernel>"`.
Loading restores the stored function whatever state the receiving layer is
in: a merged file loads into an unmerged twin (and the reverse) without
applying the delta twice or dropping it.
"""

import keras
import numpy as np

from keras_rnn_lora import lora

MERGED_KEY = "lora_merged"


class MergeableLoRA:
    """Merge, unmerge and save the adapter of the host layer (see module)."""

    _lora_noun = "layer"  # what messages call the host

    def _init_lora(self, config, lora_merged):
        """Stores the adapter's `LoRAConfig`, the attributes read from it
        and the merge state."""
        self.lora_config = config
        self.rank = config.rank
        self.use_rslora = config.use_rslora
        self.lora_dropout = config.lora_dropout
        self.lora_targets = config.lora_targets
        for name in lora.INITIALIZER_FIELDS:
            setattr(self, name, lora.new_initializer(getattr(config, name)))
        self.scaling = config.scaling
        self._lora_merged = bool(lora_merged)
        # Target -> NumPy copy of the kernel before `merge_lora`, so that
        # `unmerge_lora` restores it bit for bit.
        self._premerge_kernels = {}

    @property
    def lora_merged(self):
        """Whether `s * A @ B` is currently folded into the frozen kernels."""
        return self._lora_merged

    @property
    def lora_weights(self):
        """The LoRA factors, `[A, B]` per target in `lora_targets` order."""
        if not self.built:
            return []
        return [w for t in self.lora_targets for w in self.lora_factors(t)]

    def _require_built(self, method):
        if not self.built:
            raise ValueError(
                f"`{method}()` was called on the unbuilt {self._lora_noun} "
                f"'{self.name}': it has no weights yet. Build it first, "
                "e.g. by calling it (or the RNN layer that holds it) on a "
                "batch, or with `.build(input_shape)`."
            )

    def _set_factors_trainable(self, trainable):
        for weight in self.lora_weights:
            weight.trainable = trainable

    def _where(self, target):
        return f"'{self.name}', kernel '{self.lora_kernel(target).name}'"

    # -- the kernels -------------------------------------------------------

    def base_kernel(self, target):
        """The frozen kernel `W` the adapter of `target` applies to, as a
        NumPy array: the pre-merge kernel while merged."""
        self._require_built("base_kernel")
        if self._lora_merged:
            return self._premerge_kernels[target].copy()
        return lora.to_numpy(self.lora_kernel(target))

    def delta(self, target):
        """The update `s * A @ B` of `target`, float32, differentiable with
        respect to the factors."""
        a, b = self.lora_factors(target)
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
                for w in self.lora_factors(target)
            )
            merged[target] = lora.merged_kernel(
                self.base_kernel(target),
                a,
                b,
                self.scaling,
                self.lora_kernel(target).dtype,
                self._where(target),
            )
        return merged

    # -- merging -----------------------------------------------------------

    def merge_lora(self, reset=False):
        """Folds `s * A @ B` into each targeted kernel; the layer then runs
        its plain stock computation (no LoRA overhead). Idempotent.

        The factors are kept (frozen while merged) and the pre-merge kernels
        saved, so `unmerge_lora()` restores them exactly. A merge whose
        result would hold NaN or Inf is refused with a `ValueError` and the
        layer is left exactly as it was.

        With `reset=True` the merge is made permanent instead: the merged
        kernel becomes the new frozen base and a fresh adapter starts on it
        (`A` re-initialized, `B = 0`), so outputs are unchanged and the
        layer is ready to learn the next batch of new data.
        """
        self._require_built("merge_lora")
        if not self._lora_merged:
            merged = self.merged_kernels()
            self._premerge_kernels = {
                target: self.base_kernel(target) for target in merged
            }
            for target, value in merged.items():
                self.lora_kernel(target).assign(value)
            self._lora_merged = True
            self._set_factors_trainable(False)
        if reset:
            self._premerge_kernels = {}
            self._lora_merged = False
            self._set_factors_trainable(True)
            for target in self.lora_targets:
                a, b = self.lora_factors(target)
                a.assign(self.lora_a_initializer(a.shape, dtype=a.dtype))
                b.assign(self.lora_b_initializer(b.shape, dtype=b.dtype))
        return self

    def unmerge_lora(self):
        """Restores the exact kernels `merge_lora()` changed and the LoRA
        computation. Idempotent."""
        self._require_built("unmerge_lora")
        if not self._lora_merged:
            return self
        for target in self.lora_targets:
            self.lora_kernel(target).assign(self._premerge_kernels[target])
        self._premerge_kernels = {}
        self._lora_merged = False
        self._set_factors_trainable(True)
        return self

    def set_lora_factors(self, values):
        """Assigns the factors from `values` (factor name -> array) and keeps
        the merge state: a merged layer is re-merged with the new factors.
        Everything is checked (names, shapes, finite values, a finite merged
        kernel) before anything is assigned."""
        self._require_built("set_lora_factors")
        weights = {w.name: w for w in self.lora_weights}
        if set(values) != set(weights):
            raise ValueError(
                f"'{self.name}' has the factors {sorted(weights)}; "
                f"received values for {sorted(values)}."
            )
        arrays = {}
        for name, value in values.items():
            array = np.asarray(value)
            if tuple(array.shape) != tuple(weights[name].shape):
                raise ValueError(
                    f"'{self.name}': factor '{name}' has shape "
                    f"{tuple(weights[name].shape)}; received "
                    f"{tuple(array.shape)}."
                )
            lora.check_finite(array, f"factor '{name}' of '{self.name}'")
            arrays[name] = array.astype("float32")
        merged = self.merged_kernels(arrays) if self._lora_merged else {}
        for name, array in arrays.items():
            weights[name].assign(array)
        for target, value in merged.items():
            self.lora_kernel(target).assign(value)
        return self

    # -- saving --------------------------------------------------------------

    def _base_weights(self):
        lora_ids = {id(w) for w in self.lora_weights}
        return [w for w in self._own_weights() if id(w) not in lora_ids]

    def _own_weights(self):
        # A cell or a Dense has no sub-layers: its weights are its own.
        return self.weights

    def save_own_variables(self, store):
        for i, weight in enumerate(self._base_weights()):
            store[f"{i}"] = weight
        for weight in self.lora_weights:
            store[weight.name] = weight
        store[MERGED_KEY] = np.array(int(self._lora_merged))
        for target, kernel in self._premerge_kernels.items():
            store[_premerge_key(self, target)] = kernel

    def load_own_variables(self, store):
        """Loads this layer's store, or a stock layer's (the factors then
        keep their values), and restores the stored function in this
        layer's own merge state. The 0.1.0 layout (every weight by
        position) loads too."""
        stored = _read_store(self, store)
        base = self._base_weights()
        position = {id(w): i for i, w in enumerate(base)}
        kernels = {
            target: stored.base[position[id(self.lora_kernel(target))]]
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
                a, b = (factors[w.name] for w in self.lora_factors(target))
                merged[target] = lora.merged_kernel(
                    kernel,
                    a,
                    b,
                    self.scaling,
                    self.lora_kernel(target).dtype,
                    self._where(target),
                )
        # Every value is known and checked: assign.
        for weight, value in zip(base, stored.base, strict=True):
            weight.assign(value)
        for weight in self.lora_weights:
            weight.assign(factors[weight.name])
        for target, kernel in kernels.items():
            self.lora_kernel(target).assign(merged.get(target, kernel))
        self._premerge_kernels = (
            {t: np.array(k) for t, k in kernels.items()}
            if self._lora_merged
            else {}
        )


def _array(value):
    """A NumPy copy of a stored value: an HDF5 dataset, an array, or (when
    one layer's store is copied into another) a variable."""
    if isinstance(value, keras.Variable):
        return lora.to_numpy(value)
    return np.array(value)


def _premerge_key(layer, target):
    return f"premerge_{layer.lora_kernel(target).name}"


class _Stored:
    """A layer's stored weights, read and checked before any is assigned."""

    def __init__(self, base, factors, merged, premerge):
        self.base = base  # the stock weights, in order
        self.factors = factors  # factor name -> array, None in a stock store
        self.merged = merged  # whether the stored kernels are merged
        self.premerge = premerge  # target -> pre-merge kernel when merged


def _read_store(layer, store):
    """Reads `store` for `layer`: every key known, every shape right, or a
    `ValueError` naming the layer."""
    keys = set(store.keys())
    base_weights = layer._base_weights()
    factor_weights = layer.lora_weights
    names = {w.name for w in factor_weights}
    premerge_keys = {_premerge_key(layer, t): t for t in layer.lora_targets}
    numeric = sorted(int(k) for k in keys if k.isdigit())
    n_base = len(base_weights)
    # 0.1.0 stored every weight by position: the stock ones, then factors.
    legacy = (
        not names & keys
        and bool(factor_weights)
        and numeric == list(range(n_base + len(factor_weights)))
    )
    unknown = keys - {str(i) for i in numeric} - names - {MERGED_KEY}
    unknown -= set(premerge_keys)
    if unknown or not (legacy or numeric == list(range(n_base))):
        raise ValueError(
            f"'{layer.name}' ({type(layer).__name__}) cannot load the "
            f"stored weights {sorted(keys)}: it expects the stock weights "
            f"'0'..'{n_base - 1}', optionally the factors {sorted(names)}, "
            f"'{MERGED_KEY}' and the pre-merge kernels. Was the file saved "
            "from another architecture?"
        )

    def read(key, weight):
        value = _array(store[key])
        if tuple(value.shape) != tuple(weight.shape):
            raise ValueError(
                f"'{layer.name}': stored weight '{key}' has shape "
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
                f"'{layer.name}': the stored weights lack the factors "
                f"{sorted(names - keys)}."
            )
        factors = {w.name: read(w.name, w) for w in factor_weights}
    premerge = {
        target: read(key, layer.lora_kernel(target))
        for key, target in premerge_keys.items()
        if key in keys
    }
    if MERGED_KEY in keys:
        merged = bool(_array(store[MERGED_KEY]))
    else:  # 0.1.0 wrote pre-merge kernels exactly when merged
        merged = bool(premerge)
    if merged and (factors is None or set(premerge) != set(layer.lora_targets)):
        raise ValueError(
            f"'{layer.name}': the stored weights say they are merged but "
            "lack the factors or the pre-merge kernels needed to restore "
            "them."
        )
    return _Stored(base, factors, merged, premerge)
