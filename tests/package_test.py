"""Tests of the package as a whole: what importing it pulls in."""

import json
import os
import subprocess
import sys

import keras
import pytest


def imported_modules(statement):
    script = (
        f"import json, sys\n{statement}\n"
        "print('MODULES' + json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, KERAS_BACKEND=keras.backend.backend()),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout.split("MODULES", 1)[1]))


@pytest.mark.parametrize(
    "statement",
    [
        "import keras_rnn_lora",
        "from keras_rnn_lora import translation",
        "from keras_rnn_lora.translation import decoding, evaluation, model",
        # Using it: LoRA cells and layers built, called and merged.
        "import keras, numpy as np, keras_rnn_lora as k\n"
        "x = np.zeros((2, 3, 5), 'float32')\n"
        "for cell in (k.LoRASimpleRNNCell, k.LoRAGRUCell, k.LoRALSTMCell):\n"
        "    keras.layers.RNN(cell(4, rank=2, lora_targets='kernel'))(x)\n"
        "init = keras.initializers.GlorotUniform()\n"
        "for layer_class in (k.LoRAGRU, k.LoRALSTM, k.LoRASimpleRNN):\n"
        "    layer = layer_class(4, rank=2, lora_b_initializer=init)\n"
        "    layer(x)\n"
        "    layer.merge_lora(reset=True)\n",
    ],
)
def test_the_lora_library_imports_no_tensorflow(statement):
    """The LoRA library is Keras and NumPy, to import and to use (saving
    goes through Keras' serializer, which imports TensorFlow where it is
    installed); the translation application's Keras-only modules too. (On
    the TensorFlow backend Keras itself imports TensorFlow, so the check
    runs on the other backends.)"""
    if keras.backend.backend() == "tensorflow":
        pytest.skip("Keras' TensorFlow backend imports TensorFlow itself")
    modules = imported_modules(statement)
    assert "tensorflow" not in modules
    assert "tensorflow_text" not in modules
    assert "keras_rnn_lora.translation.preprocessing" not in modules


def test_lazy_translation_names_load_their_module():
    from keras_rnn_lora import translation

    assert translation.build_translator.__module__.endswith(".model")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        translation.nope  # noqa: B018
