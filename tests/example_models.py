"""Small models with every kind of recurrent layer, shared by the tests of
the model-level functions and of adapter files."""

import keras
import numpy as np
from conftest import to_numpy

from keras_rnn_lora import LoRAGRUCell
from keras_rnn_lora import LoRALSTMCell
from keras_rnn_lora import LoRASimpleRNNCell

STEPS, FEATURES = 5, 4


def x_batch(seed=0, batch=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, STEPS, FEATURES)).astype("float32")


def randomize_weights(model, seed=0):
    """Non-zero everywhere, biases included: zero weights hide copy bugs."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign(rng.normal(size=w.shape).astype("float32") * 0.4)


def functional_model():
    """Every recurrent layer kind, a Bidirectional and stacked cells."""
    inputs = keras.Input((STEPS, FEATURES))
    a = keras.layers.GRU(6, return_sequences=True, name="gru")(inputs)
    b = keras.layers.LSTM(5, return_sequences=True, name="lstm")(a)
    c = keras.layers.Bidirectional(
        keras.layers.SimpleRNN(4, return_sequences=True), name="bi"
    )(b)
    d = keras.layers.RNN(
        keras.layers.StackedRNNCells(
            [keras.layers.GRUCell(4), keras.layers.LSTMCell(3)]
        ),
        name="stacked",
    )(c)
    outputs = keras.layers.Dense(2, name="head")(d)
    model = keras.Model(inputs, outputs, name="base")
    randomize_weights(model)
    return model


def sequential_model():
    model = keras.Sequential(
        [
            keras.Input((STEPS, FEATURES)),
            keras.layers.RNN(keras.layers.GRUCell(6), name="rnn"),
            keras.layers.Dense(2, name="head"),
        ],
        name="seq",
    )
    randomize_weights(model)
    return model


def nested_model():
    inner = keras.Sequential(
        [keras.Input((STEPS, FEATURES)), keras.layers.LSTM(5, name="lstm")],
        name="inner",
    )
    inputs = keras.Input((STEPS, FEATURES))
    outputs = keras.layers.Dense(2, name="head")(inner(inputs))
    model = keras.Model(inputs, outputs, name="outer")
    randomize_weights(model)
    return model


MODELS = {
    "functional": functional_model,
    "sequential": sequential_model,
    "nested": nested_model,
}

EXPECTED_CELLS = {
    "functional": {
        "gru/cell": LoRAGRUCell,
        "lstm/cell": LoRALSTMCell,
        "bi/forward/cell": LoRASimpleRNNCell,
        "bi/backward/cell": LoRASimpleRNNCell,
    },
    "sequential": {"rnn/cell": LoRAGRUCell},
    "nested": {"inner/lstm/cell": LoRALSTMCell},
}


def assert_same_outputs(model_a, model_b, x, atol=1e-5):
    np.testing.assert_allclose(
        to_numpy(model_a(x)), to_numpy(model_b(x)), atol=atol, rtol=0
    )
