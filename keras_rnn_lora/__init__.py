"""LoRA for recurrent networks in Keras 3 (TensorFlow, JAX, PyTorch)."""

# Registers the translator's losses and metrics, so that a compiled
# translator saved as `.keras` loads after `import keras_rnn_lora` alone
# (keras only: no TensorFlow is imported here).
from keras_rnn_lora import seq2seq as _seq2seq  # noqa: F401, E402
from keras_rnn_lora.adapter_io import load_lora_weights
from keras_rnn_lora.adapter_io import save_lora_weights
from keras_rnn_lora.adapters import enable_lora
from keras_rnn_lora.adapters import lora_summary
from keras_rnn_lora.adapters import mark_only_lora_as_trainable
from keras_rnn_lora.adapters import merge_lora
from keras_rnn_lora.adapters import to_base_model
from keras_rnn_lora.adapters import unmerge_lora
from keras_rnn_lora.cells import LoRAGRUCell
from keras_rnn_lora.cells import LoRALSTMCell
from keras_rnn_lora.cells import LoRASimpleRNNCell
from keras_rnn_lora.layers import LoRAGRU
from keras_rnn_lora.layers import LoRALSTM
from keras_rnn_lora.layers import LoRASimpleRNN
from keras_rnn_lora.lora import lora_scaling

__version__ = "0.1.0"

__all__ = [
    "LoRAGRU",
    "LoRAGRUCell",
    "LoRALSTM",
    "LoRALSTMCell",
    "LoRASimpleRNN",
    "LoRASimpleRNNCell",
    "enable_lora",
    "load_lora_weights",
    "lora_scaling",
    "lora_summary",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "save_lora_weights",
    "to_base_model",
    "unmerge_lora",
    "__version__",
]
