"""LoRA+: the B factors learn at a higher learning rate than the A factors.

Keras optimizers have no parameter groups, and scaling B's gradient does
not make B learn faster under Adam (Adam is invariant to a constant
gradient scale). `LoRAPlusOptimizer` therefore holds two optimizers of one
class and configuration: the one it wraps updates every weight but the B
factors; its twin, whose learning rate is `loraplus_lr_ratio` times as large
(the number times the ratio, or the schedule wrapped in
`ScaledLearningRate`), updates the B factors. Each keeps its own state
(moments, step count, EMA, accumulated gradients), so the update of each
weight is exactly the wrapped optimizer's at that weight's learning rate.

A B factor is a trainable weight named like `lora_<target>_b`: the
recurrent cells' `lora_recurrent_kernel_b` and `lora_kernel_b`, and Keras'
own LoRA factors (`lora_kernel_b` of `Dense`/`EinsumDense`,
`lora_embeddings_b` of `Embedding`).
"""

import copy
import math
import re
import warnings

import keras
from keras import ops

from keras_rnn_lora import checks
from keras_rnn_lora import keras_internals

#: The names of the LoRA B factors (`add_lora_factors`, and Keras' own
#: `enable_lora` on Dense, EinsumDense and Embedding).
LORA_B_NAME = re.compile(r"lora_\w+_b")


def is_lora_b_factor(variable):
    """Whether `variable` is a LoRA B factor (named like `lora_kernel_b`)."""
    name = str(getattr(variable, "name", ""))
    return LORA_B_NAME.fullmatch(name) is not None


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class ScaledLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule times a constant: `factor * schedule(step)`.

    Args:
        schedule: a `keras.optimizers.schedules.LearningRateSchedule`.
        factor: float, the constant factor.
    """

    def __init__(self, schedule, factor):
        self.schedule = schedule
        self.factor = float(factor)

    def __call__(self, step):
        return ops.multiply(self.schedule(step), self.factor)

    def get_config(self):
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "factor": self.factor,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = keras.saving.deserialize_keras_object(
            config["schedule"]
        )
        return cls(**config)


def scaled_learning_rate(learning_rate, ratio):
    """`learning_rate` (a number, a variable, a schedule or a callable)
    times `ratio`, in a form a Keras optimizer takes."""
    if isinstance(
        learning_rate, keras.optimizers.schedules.LearningRateSchedule
    ):
        return ScaledLearningRate(learning_rate, ratio)
    if isinstance(learning_rate, keras.Variable):
        return float(ops.convert_to_numpy(learning_rate)) * ratio
    if callable(learning_rate):
        return lambda: ops.multiply(learning_rate(), ratio)
    return learning_rate * ratio


def _check_optimizer(optimizer):
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise checks.invalid(
            "optimizer",
            "a `keras.optimizers.Optimizer` instance such as "
            "`keras.optimizers.Adam(1e-3)`",
            optimizer,
        )
    wrappers = (
        keras.optimizers.LossScaleOptimizer,
        keras.optimizers.MultiOptimizer,
        LoRAPlusOptimizer,
    )
    if isinstance(optimizer, wrappers):
        raise ValueError(
            "Received an invalid value for `optimizer`, expected an "
            "optimizer that wraps no other (not a LossScaleOptimizer, "
            "MultiOptimizer or LoRAPlusOptimizer): wrap the "
            "LoRAPlusOptimizer instead (`model.compile` adds the "
            "LossScaleOptimizer itself under a float16 policy). Received: "
            f"optimizer={type(optimizer).__name__}"
        )
    if optimizer.built:
        raise ValueError(
            "Received an invalid value for `optimizer`, expected an "
            "optimizer that is not built yet: LoRAPlusOptimizer builds it "
            "over the weights that are not LoRA B factors. Pass a new one. "
            f"Received: optimizer={optimizer.name} (built)"
        )
    if optimizer.global_clipnorm and optimizer.gradient_accumulation_steps:
        raise ValueError(
            "Received an invalid value for `optimizer`: LoRAPlusOptimizer "
            "cannot clip accumulated gradients by their global norm (each "
            "of its two optimizers accumulates its own). Use `clipnorm` or "
            "`clipvalue`, or no gradient accumulation. Received: "
            f"global_clipnorm={optimizer.global_clipnorm}, "
            "gradient_accumulation_steps="
            f"{optimizer.gradient_accumulation_steps}"
        )


def _check_ratio(ratio):
    if not checks.is_real(ratio) or not math.isfinite(ratio) or ratio <= 0:
        raise checks.invalid("loraplus_lr_ratio", "a finite number > 0", ratio)
    return float(ratio)


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class LoRAPlusOptimizer(keras.optimizers.Optimizer):
    """An optimizer wrapper that trains the LoRA B factors at a higher
    learning rate (LoRA+).

    Every LoRA B factor (a trainable weight named like
    `lora_recurrent_kernel_b`, `lora_kernel_b` or `lora_embeddings_b`) is
    updated by `optimizer` at `loraplus_lr_ratio` times its learning rate;
    every other weight (the A factors, and whatever else trains) at the
    learning rate itself:

        lr(B) = loraplus_lr_ratio * lr        lr(everything else) = lr

    A twin of `optimizer` (same class and configuration, the learning rate
    times the ratio; a schedule is scaled step by step) updates the B
    factors, so any Keras optimizer works, with its own state per weight.
    `learning_rate` reads and sets the wrapped optimizer's; setting it (as
    `ReduceLROnPlateau` and `LearningRateScheduler` do) sets the twin's to
    the ratio times it. `global_clipnorm` clips over all the gradients, as
    the optimizer alone would. Keras decays weights by `learning_rate *
    weight_decay`, so the B factors decay the ratio times as fast, as in
    PEFT's LoRA+ parameter groups; `exclude_from_weight_decay` applies to
    both groups. The wrapper saves and loads with the model (`model.save`,
    `keras.saving.load_model`), state included.

    Args:
        optimizer: a `keras.optimizers.Optimizer` (not built yet, and not a
            wrapper such as `LossScaleOptimizer`): its class, configuration
            and learning rate (a float or a
            `keras.optimizers.schedules.LearningRateSchedule`) serve both
            groups of weights.
        loraplus_lr_ratio: float > 0, default 16.0: how many times the
            learning rate the B factors train at (the paper's lambda =
            lr_B / lr_A; about 16 works well for Adam).
        name: string, the optimizer's name. Defaults to an automatic one.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((5, 8)),
    ...     keras.layers.RNN(keras_rnn_lora.LoRAGRUCell(32, rank=4)),
    ...     keras.layers.Dense(1),
    ... ])
    >>> model = keras_rnn_lora.mark_only_lora_as_trainable(model)
    >>> optimizer = keras_rnn_lora.LoRAPlusOptimizer(
    ...     keras.optimizers.Adam(1e-4), loraplus_lr_ratio=16.0
    ... )
    >>> model.compile(optimizer=optimizer, loss="mse")
    >>> history = model.fit(np.zeros((4, 5, 8)), np.zeros((4, 1)), verbose=0)

    Reference:
        - [Hayou, Ghosh and Yu, 2024. LoRA+: Efficient Low Rank Adaptation
          of Large Models](https://arxiv.org/abs/2402.12354)
    """

    def __init__(self, optimizer, loraplus_lr_ratio=16.0, name=None):
        _check_optimizer(optimizer)
        ratio = _check_ratio(loraplus_lr_ratio)
        super().__init__(learning_rate=0.0, name=name)
        self.optimizer = optimizer
        self.loraplus_lr_ratio = ratio
        config = optimizer.get_config()
        config["name"] = f"{optimizer.name}_lora_b"
        config["learning_rate"] = scaled_learning_rate(
            keras_internals.learning_rate_argument(optimizer), ratio
        )
        #: The twin of `optimizer` that updates the B factors.
        self.b_optimizer = type(optimizer).from_config(config)

    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        b_factors = [v for v in var_list if is_lora_b_factor(v)]
        if not b_factors:
            warnings.warn(
                f"LoRAPlusOptimizer '{self.name}' found no LoRA B factor (a "
                "trainable weight named like `lora_recurrent_kernel_b`) "
                f"among the {len(var_list)} weights it was built for: "
                f"`loraplus_lr_ratio={self.loraplus_lr_ratio}` applies to "
                "nothing, and it trains like the optimizer it wraps. Enable "
                "LoRA on the model before compiling it.",
                stacklevel=2,
            )
        self.optimizer.build([v for v in var_list if not is_lora_b_factor(v)])
        self.b_optimizer.build(b_factors)
        # Untracked: the optimizer's tracker would adopt the model's
        # variables in a list as optimizer variables.
        keras_internals.set_untracked(self, "built_variables", var_list)
        super().build(var_list)

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `trainable_variables`, "
                    "the optimizer must already be built: call "
                    "`optimizer.build(trainable_variables)` first."
                )
            trainable_variables = self.built_variables
        trainable_variables = list(trainable_variables)
        if len(grads) != len(trainable_variables):
            raise ValueError(
                f"Received {len(grads)} gradients for "
                f"{len(trainable_variables)} variables: pass one gradient "
                "(or None) per variable."
            )
        if not self.built:
            self.build(trainable_variables)
        if self.optimizer.global_clipnorm:
            # Over all the gradients, as the optimizer alone clips them;
            # each group's norm is then within the limit, so the clipping
            # each optimizer does on its own group changes nothing. The
            # gradients are still loss-scaled here: so is the limit.
            clip = self.optimizer.global_clipnorm * (
                self.loss_scale_factor or 1.0
            )
            grads = keras_internals.clip_by_global_norm(grads, clip)
        for inner, b_group in (
            (self.optimizer, False),
            (self.b_optimizer, True),
        ):
            pairs = [
                (grad, variable)
                for grad, variable in zip(
                    grads, trainable_variables, strict=True
                )
                if is_lora_b_factor(variable) is b_group
            ]
            if any(grad is not None for grad, _ in pairs):
                inner.apply(
                    [grad for grad, _ in pairs],
                    [variable for _, variable in pairs],
                )
            elif pairs:
                names = [getattr(v, "path", v.name) for _, v in pairs]
                warnings.warn(
                    f"Gradients do not exist for variables {names} when "
                    "minimizing the loss.",
                    stacklevel=2,
                )

    @property
    def variables(self):
        return (
            super().variables
            + self.optimizer.variables
            + self.b_optimizer.variables
        )

    @property
    def iterations(self):
        """The wrapped optimizer's step count (its twin's when only B
        factors train)."""
        trained = self.built_variables if self.built else ()
        if trained and all(map(is_lora_b_factor, trained)):
            return self.b_optimizer.iterations
        return self.optimizer.iterations

    @property
    def learning_rate(self):
        return self.optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.optimizer.learning_rate = learning_rate
        self.b_optimizer.learning_rate = scaled_learning_rate(
            learning_rate, self.loraplus_lr_ratio
        )

    @property
    def loss_scale_factor(self):
        optimizer = getattr(self, "optimizer", None)
        return None if optimizer is None else optimizer.loss_scale_factor

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        # Keras' `__init__` sets it before the two optimizers exist; a
        # LossScaleOptimizer around this one sets it to None.
        for name in ("optimizer", "b_optimizer"):
            inner = getattr(self, name, None)
            if inner is not None:
                inner.loss_scale_factor = value

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        self.optimizer.exclude_from_weight_decay(var_list, var_names)
        self.b_optimizer.exclude_from_weight_decay(var_list, var_names)

    def finalize_variable_values(self, var_list):
        var_list = list(var_list)
        self.optimizer.finalize_variable_values(
            [v for v in var_list if not is_lora_b_factor(v)]
        )
        self.b_optimizer.finalize_variable_values(
            [v for v in var_list if is_lora_b_factor(v)]
        )

    def get_config(self):
        # Not Optimizer.get_config: the wrapped optimizer holds the rest.
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.optimizer),
            "loraplus_lr_ratio": self.loraplus_lr_ratio,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Deep: Keras' optimizers rewrite the config they are given.
        config = copy.deepcopy(config)
        config["optimizer"] = keras.saving.deserialize_keras_object(
            config["optimizer"], custom_objects=custom_objects
        )
        return cls(**config)
