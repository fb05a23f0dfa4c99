"""LoRA dropout for recurrent cells, shaped like Keras' `DropoutRNNCell`.

Dropout on the input of the LoRA branch, in training only. As with Keras'
own RNN dropout, one mask is drawn per sequence and reused at every step:
Keras' RNN layer asks the cell for its dropout masks before the loop (so
JAX's scan stays stateless) and resets them after; the LoRA masks are drawn
at the same moments.
"""

import keras
from keras import ops


class LoRADropoutMixin:
    """Adds the LoRA dropout masks to a cell with Keras' dropout masks.

    The host provides `lora_dropout`, `lora_targets`, `seed_generator`
    and Keras' `get_dropout_mask` / `get_recurrent_dropout_mask` /
    `reset_*` methods (from `DropoutRNNCell`).
    """

    def lora_dropout_mask(self, target, x):
        """The sequence's mask for the LoRA branch of `target`, drawn on
        first use (shaped like `x`)."""
        attribute = f"_lora_{target}_dropout_mask"
        mask = getattr(self, attribute, None)
        if mask is None:
            mask = keras.random.dropout(
                ops.ones_like(x),
                rate=self.lora_dropout,
                seed=self.seed_generator,
            )
            setattr(self, attribute, mask)
        return mask

    def _wants_lora_dropout(self, target):
        return (
            self.lora_dropout > 0 and target in self.lora_targets and self.built
        )

    def get_dropout_mask(self, step_input):
        if self._wants_lora_dropout("kernel"):
            self.lora_dropout_mask("kernel", step_input)
        return super().get_dropout_mask(step_input)

    def get_recurrent_dropout_mask(self, step_input):
        if self._wants_lora_dropout("recurrent"):
            self.lora_dropout_mask("recurrent", step_input)
        return super().get_recurrent_dropout_mask(step_input)

    def reset_dropout_mask(self):
        super().reset_dropout_mask()
        self._lora_kernel_dropout_mask = None

    def reset_recurrent_dropout_mask(self):
        super().reset_recurrent_dropout_mask()
        self._lora_recurrent_dropout_mask = None
