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
    ],
)
def test_the_lora_library_imports_no_tensorflow(statement):
    """The LoRA library is Keras and NumPy; the translation application's
    Keras-only modules too. (On the TensorFlow backend Keras itself imports
    TensorFlow, so the check runs on the other backends.)"""
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
