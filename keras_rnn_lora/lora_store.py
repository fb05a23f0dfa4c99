"""How an adapter's layer is stored in `.keras` and `.weights.h5` files.

The store of a layer carrying an adapter holds the stock weights by
position (`"0"`, `"1"`, ...: exactly what the stock layer stores, so the
stock layer's store of an `RNN(cell)` loads here and `to_base_model` goes
back), the adapter's factors by name, `"lora_merged"` and, while merged,
`"premerge_<kernel>"`. `read_store` reads and checks one before anything is
assigned (`merging.MergeableLoRA.load_own_variables` assigns).
"""

import keras
import numpy as np

from keras_rnn_lora import lora

MERGED_KEY = "lora_merged"


def _array(value):
    """A NumPy copy of a stored value: an HDF5 dataset, an array, or (when
    one layer's store is copied into another) a variable."""
    if isinstance(value, keras.Variable):
        return lora.to_numpy(value)
    return np.array(value)


def premerge_key(layer, target):
    return f"premerge_{layer.lora_kernel(target).name}"


class Stored:
    """A layer's stored weights, read and checked before any is assigned."""

    def __init__(self, base, factors, merged, premerge, bank):
        self.bank = bank  # banked adapters' variable name -> array
        self.base = base  # the stock weights, in order
        self.factors = factors  # factor name -> array, None in a stock store
        self.merged = merged  # whether the stored kernels are merged
        self.premerge = premerge  # target -> pre-merge kernel when merged


def read_store(layer, store):
    """Reads `store` for `layer`: every key known, every shape right, or a
    `ValueError` naming the layer."""
    keys = set(store.keys())
    base_weights = layer.base_weights()
    factor_weights = layer.lora_weights
    names = {w.name for w in factor_weights}
    premerge_keys = {premerge_key(layer, t): t for t in layer.lora_targets}
    bank_weights = {w.name: w for w in layer.bank_weights()}
    positions = {str(i) for i in range(len(base_weights))}
    unknown = keys - positions - names - {MERGED_KEY} - set(premerge_keys)
    unknown -= set(bank_weights)
    if not keys and positions:
        raise ValueError(
            f"'{layer.name}' ({type(layer).__name__}) found no stored "
            "weights. Keras files key layers by class name, so a file saved "
            "from a stock model holds this layer under its stock class's "
            "name, which the LoRA layer cannot read (layers loaded before "
            "this one may already hold the file's weights). Load the file "
            "into the stock model, then `keras_rnn_lora.enable_lora` it."
        )
    if unknown or not positions <= keys:
        raise ValueError(
            f"'{layer.name}' ({type(layer).__name__}) cannot load the "
            f"stored weights {sorted(keys)}: it expects the stock weights "
            f"'0'..'{len(base_weights) - 1}', optionally the factors "
            f"{sorted(names)}, '{MERGED_KEY}' and the pre-merge kernels. "
            "Was the file saved from another architecture?"
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
    if names & keys:
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
    merged = MERGED_KEY in keys and bool(_array(store[MERGED_KEY]))
    if (
        merged
        and premerge
        and (factors is None or set(premerge) != set(layer.lora_targets))
    ):
        raise ValueError(
            f"'{layer.name}': the stored weights say they are merged but "
            "lack the factors or some pre-merge kernels needed to restore "
            "them."
        )
    if premerge and not merged:
        raise ValueError(
            f"'{layer.name}': the stored weights hold pre-merge kernels but "
            "say they are not merged."
        )
    if set(bank_weights) - keys:
        raise ValueError(
            f"'{layer.name}': the stored weights lack the named adapters' "
            f"{sorted(set(bank_weights) - keys)}; was the file saved before "
            "they were added?"
        )
    bank = {key: read(key, weight) for key, weight in bank_weights.items()}
    return Stored(base, factors, merged, premerge, bank)
