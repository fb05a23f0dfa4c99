"""0.1.0's import path of the IWSLT 2017 reader and its tensorflow-datasets
builder, kept so code written against it still runs; they live in
`keras_rnn_lora.translation.iwslt2017` and `.iwslt2017_tfds` now."""

from keras_rnn_lora.translation.iwslt2017 import *  # noqa: F403
from keras_rnn_lora.translation.iwslt2017 import IWSLTDataError  # noqa: F401
from keras_rnn_lora.translation.iwslt2017_tfds import *  # noqa: F403
