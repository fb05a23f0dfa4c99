"""What a layer or cell must provide to carry an adapter."""

import abc


class LoRAHost(abc.ABC):
    """The contract between an adapter's machinery (`trainability.py`,
    `merging.py`) and the layer or cell that carries it: the LoRA cells
    (`cell_base.LoRACellBase`) and Keras' own LoRA layers
    (`keras_lora.KerasLoRALayer`). `lora_targets`, the adapted kernels'
    names, is set by `MergeableLoRA.init_lora`."""

    @abc.abstractmethod
    def lora_kernel(self, target):
        """The frozen kernel variable `W` of `target`."""

    @abc.abstractmethod
    def lora_factors(self, target):
        """The live factor variables `(A, B)` of `target`."""

    @abc.abstractmethod
    def lora_magnitude(self, target):
        """DoRA's magnitude variable of `target`, or `None` without DoRA."""

    @abc.abstractmethod
    def base_weights(self):
        """The weights a stock layer of this kind has, in its order."""

    @property
    @abc.abstractmethod
    def lora_weights(self):
        """The live factor variables of every target."""

    @property
    @abc.abstractmethod
    def lora_merged(self):
        """Whether the adapter is folded into the kernels."""
