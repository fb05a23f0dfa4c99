"""Tests for LoRAConfig and the shared LoRA math (keras_rnn_lora/lora.py)."""

import json

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_rnn_lora
from keras_rnn_lora import LoRAConfig
from keras_rnn_lora import folding
from keras_rnn_lora import lora


def test_config_defaults_validation_and_scaling():
    config = LoRAConfig(rank=4)
    assert config.lora_alpha == 4.0 and config.scaling == 1.0
    assert config.lora_targets == ("recurrent",)
    rs = LoRAConfig(
        rank=4, lora_alpha=8, use_rslora=True, lora_targets="kernel"
    )
    assert rs.scaling == pytest.approx(4.0) and rs.lora_targets == ("kernel",)
    assert rs.replace(rank=16).scaling == pytest.approx(2.0)
    with pytest.raises(AttributeError):
        config.rank = 2  # frozen


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "`rank`.*positive integer"),
        ({"rank": 2, "lora_alpha": float("nan")}, "`lora_alpha`"),
        ({"rank": 2, "lora_dropout": 1.0}, "`lora_dropout`"),
        ({"rank": 2, "lora_targets": ("input",)}, "`lora_targets`"),
        ({"rank": 2, "use_rslora": 1}, "`use_rslora`"),
        ({"rank": 2, "lora_a_initializer": "nope"}, "`lora_a_initializer`"),
    ],
)
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_config_is_what_cells_layers_and_enable_lora_take():
    config = LoRAConfig(
        rank=2, lora_alpha=6.0, lora_targets=("kernel", "recurrent")
    )
    cell = keras_rnn_lora.LoRAGRUCell(4, **config.to_dict())
    assert cell.lora_config == config
    assert (
        keras_rnn_lora.LoRAGRU(4, **config.to_dict()).cell.lora_config == config
    )
    inputs = keras.Input((3, 2))
    model = keras.Model(inputs, keras.layers.GRU(4)(inputs))
    converted = keras_rnn_lora.enable_lora(model, config=config)
    assert converted.layers[1].cell.lora_config == config
    with pytest.raises(ValueError, match="either as `config=LoRAConfig"):
        keras_rnn_lora.enable_lora(model, rank=2, config=config)
    with pytest.raises(TypeError, match="`config`"):
        keras_rnn_lora.enable_lora(model, config={"rank": 2})
    with pytest.raises(ValueError, match="pass `rank`"):
        keras_rnn_lora.enable_lora(model)


def test_config_initializers_compare_by_meaning_and_serialize():
    spellings = [
        "he_uniform",
        "HeUniform",
        {"class_name": "HeUniform", "config": {"seed": None}},
        keras.initializers.HeUniform(),
    ]
    configs = [LoRAConfig(2, lora_a_initializer=s) for s in spellings]
    assert all(c == configs[0] for c in configs)
    assert len({hash(c) for c in configs}) == 1
    assert configs[0] != LoRAConfig(2, lora_a_initializer="glorot_uniform")
    seeded = keras.initializers.HeUniform(seed=3)
    assert configs[0] != LoRAConfig(2, lora_a_initializer=seeded)

    def zeros(shape, dtype=None):  # a plain function: equal to itself only
        return keras.ops.zeros(shape, dtype)

    assert LoRAConfig(2, lora_b_initializer=zeros) == LoRAConfig(
        2, lora_b_initializer=zeros
    )
    assert LoRAConfig(2, lora_b_initializer=zeros) != LoRAConfig(2)
    values = LoRAConfig(2, lora_b_initializer=np.zeros((2, 4), "float32"))
    assert values == values and hash(values) == hash(values)
    spec = {"class_name": "HeUniform", "config": {"seed": None}}
    kept = LoRAConfig(2, lora_a_initializer=spec)
    spec["class_name"] = "Zeros"  # the caller's dict, changed afterwards
    assert kept == configs[0]
    for config in configs:  # keyword arguments that survive JSON
        rebuilt = LoRAConfig(**json.loads(json.dumps(config.to_dict())))
        assert rebuilt == config


def test_one_initializer_object_gives_every_factor_its_own_values():
    """An unseeded Keras initializer draws its seed once: shared as it is
    by both targets, A of the input and of the recurrent kernel would
    start equal."""
    cell = keras_rnn_lora.LoRASimpleRNNCell(
        4,
        rank=4,
        lora_targets=("kernel", "recurrent"),
        lora_a_initializer=keras.initializers.RandomNormal(),
    )
    cell.build((None, 4))
    kernel_a, _, recurrent_a, _ = (to_numpy(w) for w in cell.lora_weights)
    assert not np.allclose(kernel_a, recurrent_a)
    seeded = keras.initializers.RandomNormal(seed=5)
    first, second = (
        lora.new_initializer(seeded)((3, 3)) for _ in range(2)
    )  # a seed given is a seed kept
    np.testing.assert_array_equal(to_numpy(first), to_numpy(second))


def test_merged_kernel_refuses_non_finite_results():
    base = np.ones((2, 3), "float32")
    a, b = np.ones((2, 1), "float32"), np.ones((1, 3), "float32")
    np.testing.assert_allclose(
        folding.merged_kernel(base, a, b, 0.5, "float32", "x"), base + 0.5
    )
    with pytest.raises(ValueError, match="merged kernel of x.*6 non-finite"):
        folding.merged_kernel(base, a * 1e30, b * 1e30, 1.0, "float32", "x")
    with pytest.raises(ValueError, match="non-finite"):
        folding.merged_kernel(base, a, b * 300, 300.0, "float16", "x")


def test_cell_defaults_are_the_config_defaults():
    """The cells spell their LoRA arguments out (Keras style); their
    defaults must stay those of LoRAConfig."""
    import dataclasses
    import inspect

    signature = inspect.signature(keras_rnn_lora.LoRAGRUCell.__init__)
    for field in dataclasses.fields(LoRAConfig):
        if field.name != "rank":
            assert signature.parameters[field.name].default == field.default
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        inputs = keras.Input((3, 2))
        model = keras.Model(inputs, keras.layers.GRU(4)(inputs))
        keras_rnn_lora.enable_lora(model, rank=2, lora_aplha=3)
