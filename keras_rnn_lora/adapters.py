"""0.1.0's import path of the model-level functions, kept so code written
against it still runs. They live in `convert`, `training` and `walk` now,
and the public ones are at the top level: `keras_rnn_lora.enable_lora`."""

from keras_rnn_lora.convert import enable_lora  # noqa: F401
from keras_rnn_lora.convert import to_base_model  # noqa: F401
from keras_rnn_lora.training import lora_summary  # noqa: F401
from keras_rnn_lora.training import mark_only_lora_as_trainable  # noqa: F401
from keras_rnn_lora.training import merge_lora  # noqa: F401
from keras_rnn_lora.training import unmerge_lora  # noqa: F401
from keras_rnn_lora.walk import iter_layers  # noqa: F401
from keras_rnn_lora.walk import lora_adapters  # noqa: F401
from keras_rnn_lora.walk import lora_cells  # noqa: F401
