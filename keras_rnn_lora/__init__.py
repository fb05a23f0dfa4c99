"""LoRA for recurrent networks in Keras 3 (TensorFlow, JAX, PyTorch).

The library is Keras and NumPy only: importing it imports no TensorFlow,
and nothing of the IWSLT translation application, its first user, which is
the subpackage `keras_rnn_lora.translation` (importing that registers the
translator's classes, so a saved translator loads).
"""

from keras_rnn_lora.adapter_io import load_lora_model
from keras_rnn_lora.adapter_io import load_lora_weights
from keras_rnn_lora.adapter_io import save_lora_weights
from keras_rnn_lora.cells import LoRAGRUCell
from keras_rnn_lora.cells import LoRALSTMCell
from keras_rnn_lora.cells import LoRASimpleRNNCell
from keras_rnn_lora.convert import enable_lora
from keras_rnn_lora.convert import to_base_model
from keras_rnn_lora.distributed import is_chief
from keras_rnn_lora.distributed import multi_worker_strategy
from keras_rnn_lora.distributed import worker_count
from keras_rnn_lora.keras_lora import LoRADense
from keras_rnn_lora.keras_lora import LoRAEinsumDense
from keras_rnn_lora.keras_lora import LoRAEmbedding
from keras_rnn_lora.layers import LoRAGRU
from keras_rnn_lora.layers import LoRALSTM
from keras_rnn_lora.layers import LoRASimpleRNN
from keras_rnn_lora.lora import LoRAConfig
from keras_rnn_lora.lora import lora_scaling
from keras_rnn_lora.lora_plus import LoRAPlusOptimizer
from keras_rnn_lora.named_adapters import active_adapter
from keras_rnn_lora.named_adapters import add_adapter
from keras_rnn_lora.named_adapters import call_with_adapters
from keras_rnn_lora.named_adapters import delete_adapter
from keras_rnn_lora.named_adapters import disable_adapters
from keras_rnn_lora.named_adapters import list_adapters
from keras_rnn_lora.named_adapters import routed_call
from keras_rnn_lora.named_adapters import set_adapter
from keras_rnn_lora.stacked_adapters import add_stacked_adapter
from keras_rnn_lora.training import count_parameters
from keras_rnn_lora.training import lora_summary
from keras_rnn_lora.training import mark_only_lora_as_trainable
from keras_rnn_lora.training import merge_lora
from keras_rnn_lora.training import recompile
from keras_rnn_lora.training import unmerge_lora

__version__ = "0.2.0"

__all__ = [
    "LoRAConfig",
    "LoRADense",
    "LoRAEinsumDense",
    "LoRAEmbedding",
    "LoRAGRU",
    "LoRAGRUCell",
    "LoRALSTM",
    "LoRALSTMCell",
    "LoRAPlusOptimizer",
    "LoRASimpleRNN",
    "LoRASimpleRNNCell",
    "active_adapter",
    "add_adapter",
    "add_stacked_adapter",
    "call_with_adapters",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "enable_lora",
    "is_chief",
    "list_adapters",
    "load_lora_model",
    "load_lora_weights",
    "lora_scaling",
    "lora_summary",
    "mark_only_lora_as_trainable",
    "multi_worker_strategy",
    "merge_lora",
    "recompile",
    "routed_call",
    "save_lora_weights",
    "set_adapter",
    "to_base_model",
    "unmerge_lora",
    "worker_count",
    "__version__",
]
