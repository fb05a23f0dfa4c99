"""Tests for stacked adapters (keras_rnn_lora/stacked_adapters.py)."""

import os

import keras
import numpy as np
import pytest
from conftest import randomize_lora
from conftest import to_numpy
from example_models import functional_model
from example_models import x_batch

import keras_rnn_lora
from keras_rnn_lora.walk import lora_adapters

TARGETS = ("kernel", "recurrent", "dense")
# The two adapters' own scales differ from 1 and from each other.
DEFAULT = {"rank": 2, "lora_alpha": 5.0}  # s = 2.5
NEWS = {"rank": 3, "lora_alpha": 6.0, "use_rslora": True}  # s = 6/sqrt(3)


def two_adapters():
    """A model with "default" (active) and "news", both non-zero."""
    model = keras_rnn_lora.enable_lora(
        functional_model(), lora_targets=TARGETS, **DEFAULT
    )
    for i, adapter in enumerate(lora_adapters(model).values()):
        randomize_lora(adapter, seed=i, scale=0.3)
    keras_rnn_lora.add_adapter(model, "news", **NEWS)
    rng = np.random.default_rng(10)
    for adapter in lora_adapters(model).values():
        adapter.set_adapter_values(
            "news",
            {
                factor: rng.normal(size=shape).astype("float32") * 0.3
                for factor, shape in adapter.adapter_shapes("news").items()
            },
        )
    return model


def merged_one_after_the_other(model, x):
    """The outputs of `model`'s base with "default" merged in, then "news"
    merged on top: a stock model, LoRA'd again with "news"'s settings and
    factors, merged."""
    first = keras_rnn_lora.to_base_model(model, adapter="default")
    second = keras_rnn_lora.enable_lora(first, lora_targets=TARGETS, **NEWS)
    adapters = lora_adapters(model)
    assert set(lora_adapters(second)) == set(adapters)
    for path, adapter in lora_adapters(second).items():
        adapter.set_lora_factors(adapters[path].adapter_values("news"))
    keras_rnn_lora.merge_lora(second)
    return to_numpy(second(x))


def outputs_with(model, name, x):
    return to_numpy(keras_rnn_lora.to_base_model(model, adapter=name)(x))


def test_a_stacked_adapter_computes_both_increments_merged():
    model = two_adapters()
    x = x_batch(3, batch=4)
    expected = merged_one_after_the_other(model, x)
    # Each adapter alone computes something else: both count.
    for name in ("default", "news", "base"):
        assert not np.allclose(outputs_with(model, name, x), expected, 1e-3)
    keras_rnn_lora.add_stacked_adapter(model, "both", ["default", "news"])
    assert keras_rnn_lora.list_adapters(model) == ["default", "news", "both"]
    config = lora_adapters(model)["gru/cell"].adapter_config("both")
    assert (config.rank, config.scaling) == (5, 1.0)
    stacked = keras_rnn_lora.call_with_adapters(model, x, ["both"] * 4)
    np.testing.assert_allclose(to_numpy(stacked), expected, atol=1e-5)
    np.testing.assert_allclose(
        outputs_with(model, "both", x), expected, atol=1e-5
    )
    # The order of stacking does not matter.
    keras_rnn_lora.add_stacked_adapter(model, "both2", ("news", "default"))
    np.testing.assert_allclose(
        outputs_with(model, "both2", x), expected, atol=1e-5
    )


def test_a_mixed_batch_picks_the_stacked_adapter(tmp_path):
    model = two_adapters()
    x = x_batch(4, batch=4)
    keras_rnn_lora.add_stacked_adapter(model, "both", ["default", "news"])
    chosen = ["news", "both", None, "default"]
    expected = {
        "both": merged_one_after_the_other(model, x),
        "news": outputs_with(model, "news", x),
        None: outputs_with(model, "base", x),
        "default": outputs_with(model, "default", x),
    }
    mixed = to_numpy(keras_rnn_lora.call_with_adapters(model, x, chosen))
    for row, name in enumerate(chosen):
        np.testing.assert_allclose(
            mixed[row], expected[name][row], atol=1e-5, err_msg=str(name)
        )
    # A copy: changing an adapter it was stacked from leaves it as it was.
    for adapter in lora_adapters(model).values():
        randomize_lora(adapter, seed=99, scale=0.3)
    again = keras_rnn_lora.call_with_adapters(model, x, chosen)
    np.testing.assert_allclose(to_numpy(again)[1], mixed[1], atol=1e-6)
    # It is saved like any named adapter (its rank above some layers'
    # widths included).
    path = os.path.join(tmp_path, "stacked.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        to_numpy(keras_rnn_lora.call_with_adapters(loaded, x, chosen)),
        to_numpy(again),
        atol=1e-6,
    )


def add_partial(model):
    """Adapter "partial": on the recurrent kernels only, where the model's
    adapters cover input and recurrent kernels."""
    for adapter in lora_adapters(model).values():
        config = adapter.lora_config
        if len(config.lora_targets) > 1:
            config = config.replace(lora_targets=("recurrent",))
        adapter.add_banked_adapter("partial", config)


@pytest.mark.parametrize(
    "name,adapters,match",
    [
        ("news", ["default"], "already has an adapter 'news'"),
        ("a b", ["default"], "`name`"),
        ("s", ["default", "wide"], "`adapters`: \\['wide'\\] use DoRA"),
        ("s", ["default", "partial"], "`adapters`: they adapt different"),
        ("s", ["default", "nope"], "`adapters`"),
        ("s", ["news", "news"], "`adapters`"),
        ("s", [], "`adapters`"),
        ("s", ["default", "base"], "`adapters`"),
    ],
)
def test_errors_name_what_is_wrong(name, adapters, match):
    model = two_adapters()
    keras_rnn_lora.add_adapter(model, "wide", use_dora=True)
    add_partial(model)
    before = keras_rnn_lora.list_adapters(model)
    with pytest.raises(ValueError, match=match):
        keras_rnn_lora.add_stacked_adapter(model, name, adapters)
    assert keras_rnn_lora.list_adapters(model) == before
