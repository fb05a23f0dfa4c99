"""LoRA for recurrent networks in Keras 3 (TensorFlow, JAX, PyTorch)."""

from keras_rnn_lora.cells import LoRAGRUCell
from keras_rnn_lora.cells import LoRALSTMCell
from keras_rnn_lora.cells import LoRASimpleRNNCell
from keras_rnn_lora.lora import lora_scaling

__version__ = "0.1.0"

__all__ = [
    "LoRAGRUCell",
    "LoRALSTMCell",
    "LoRASimpleRNNCell",
    "lora_scaling",
    "__version__",
]
