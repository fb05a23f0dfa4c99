"""Which weights of an adapter's layer train: the adapted kernels never,
the factors unless merged, the other (base) weights as
`trainable_base_weights` says, and all of it where Keras saves it."""

import keras

from keras_rnn_lora.host import LoRAHost


class LoRATrainability(LoRAHost):
    """The trainability part of `merging.MergeableLoRA`."""

    @property
    def trainable(self):
        return keras.layers.Layer.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        # Keras' setter thaws every weight the layer created trainable,
        # adapted kernels included: they stay frozen here.
        keras.layers.Layer.trainable.fset(self, value)
        if self.built and hasattr(self, "lora_config"):
            self._apply_trainability()

    def set_trainable_base_weights(self, names):
        """Which of the layer's base weights (those that are not factors
        and not adapted kernels) train: `None` (the default) all of them,
        as in the stock layer; a sequence of weight names (e.g.
        `("bias",)`, or `()`: only the factors train). Adapted kernels are
        always frozen, and the factors are frozen while merged. Recorded in
        the config, so it survives saving."""
        self.trainable_base_weights = check_trainable_base_weights(names)
        if self.built:
            self._apply_trainability()

    def _apply_trainability(self):
        """Sets the base weights' flags from `trainable_base_weights`; the
        factors are frozen while merged."""
        targets = {id(self.lora_kernel(t)) for t in self.lora_targets}
        names = self.trainable_base_weights
        for weight in self.base_weights():
            weight.trainable = id(weight) not in targets and (
                names is None or weight.name in names
            )
        if self.lora_merged:
            self._freeze_factors()

    def _freeze_factors(self):
        if self._factors_trainable is None:
            self._factors_trainable = [w.trainable for w in self.lora_weights]
        for weight in self.lora_weights:
            weight.trainable = False

    def _thaw_factors(self):
        flags = self._factors_trainable or [True] * len(self.lora_weights)
        for weight, flag in zip(self.lora_weights, flags, strict=True):
            weight.trainable = flag
        self._factors_trainable = None


def check_trainable_base_weights(names):
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(
            "Received an invalid value for `trainable_base_weights`, "
            "expected None or a sequence of weight names such as "
            f"('bias',). Received: trainable_base_weights={names!r}"
        )
    return tuple(names)
