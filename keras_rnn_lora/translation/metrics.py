"""Loss and metrics of the translator, over real tokens only.

Padding (id 0) in the targets never counts. Perplexity is the corpus value
`exp(sum of token losses / number of tokens)` accumulated over the epoch,
not a mean of batch values. A `sample_weight` (per sentence, or per token)
weighs each token's loss and count.
"""

import keras
from keras import ops

from keras_rnn_lora.translation.tokens import PAD_ID


def _token_weights(y_true, sample_weight):
    """1 for real target tokens and 0 for padding, times `sample_weight`."""
    weights = ops.cast(ops.not_equal(y_true, PAD_ID), "float32")
    if sample_weight is not None:
        sample_weight = ops.cast(sample_weight, "float32")
        if len(sample_weight.shape) == 1:  # one weight per sentence
            sample_weight = ops.expand_dims(sample_weight, -1)
        weights = weights * sample_weight
    return weights


def _token_losses(y_true, logits, sample_weight=None, label_smoothing=0.0):
    """Per-token cross-entropy (smoothed when `label_smoothing > 0`: the
    target gets `1 - e`, every token `e / vocab` more), and the weights."""
    y_true = ops.cast(y_true, "int32")
    weights = _token_weights(y_true, sample_weight)
    logits = ops.cast(logits, "float32")
    log_probs = logits - ops.logsumexp(logits, axis=-1, keepdims=True)
    target = ops.take_along_axis(log_probs, y_true[..., None], axis=-1)
    losses = -target[..., 0]
    if label_smoothing:
        uniform = -ops.mean(log_probs, axis=-1)
        losses = (1.0 - label_smoothing) * losses + label_smoothing * uniform
    return losses * weights, weights


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class MaskedSparseCrossEntropy(keras.losses.Loss):
    """Mean token cross-entropy from logits over non-padding tokens only.

    Padding (id 0) in the targets never counts: the sum of per-token losses
    is divided by the number of real tokens in the batch.

    Args:
        label_smoothing: float in `[0, 1)`, default 0. The training loss
            spreads this much of each target's probability evenly over the
            vocabulary; perplexity (`MaskedPerplexity`) stays unsmoothed.
    """

    def __init__(
        self, label_smoothing=0.0, name="masked_sparse_cross_entropy", **kwargs
    ):
        if (
            isinstance(label_smoothing, bool)
            or not isinstance(label_smoothing, (int, float))
            or not 0 <= label_smoothing < 1
        ):
            raise ValueError(
                "Received an invalid value for `label_smoothing`, expected "
                "a float in [0, 1). Received: "
                f"label_smoothing={label_smoothing!r}"
            )
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        losses, weights = _token_losses(
            y_true, y_pred, label_smoothing=self.label_smoothing
        )
        return ops.sum(losses) / ops.maximum(ops.sum(weights), 1.0)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class MaskedPerplexity(keras.metrics.Metric):
    """exp(mean per-token cross-entropy), over non-padding tokens only.

    Accumulates the summed loss and the token count over all batches, so
    the epoch value is the corpus perplexity, not a mean of batch values.
    """

    def __init__(self, name="perplexity", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total_loss = self.add_variable((), "zeros", name="total_loss")
        self.tokens = self.add_variable((), "zeros", name="tokens")

    def update_state(self, y_true, y_pred, sample_weight=None):
        losses, weights = _token_losses(y_true, y_pred, sample_weight)
        self.total_loss.assign_add(ops.sum(losses))
        self.tokens.assign_add(ops.sum(weights))

    def result(self):
        return ops.exp(self.total_loss / ops.maximum(self.tokens, 1.0))


@keras.saving.register_keras_serializable(package="keras_rnn_lora")
class MaskedAccuracy(keras.metrics.Metric):
    """Token accuracy (argmax of the logits) over non-padding tokens."""

    def __init__(self, name="accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.correct = self.add_variable((), "zeros", name="correct")
        self.tokens = self.add_variable((), "zeros", name="tokens")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.cast(y_true, "int32")
        weights = _token_weights(y_true, sample_weight)
        predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        hits = ops.cast(ops.equal(predicted, y_true), "float32")
        self.correct.assign_add(ops.sum(hits * weights))
        self.tokens.assign_add(ops.sum(weights))

    def result(self):
        return self.correct / ops.maximum(self.tokens, 1.0)


def compile_translator(
    model,
    learning_rate=1e-3,
    label_smoothing=0.0,
    loraplus_lr_ratio=None,
    **compile_kwargs,
):
    """Compiles `model` with Adam (gradient norm clipped at 1), the masked
    loss (label-smoothed as given), accuracy and perplexity.

    `loraplus_lr_ratio`: a number wraps that Adam in a `LoRAPlusOptimizer`,
    so the LoRA B factors learn at that many times `learning_rate`."""
    optimizer = keras.optimizers.Adam(learning_rate, clipnorm=1.0)
    if loraplus_lr_ratio is not None:
        from keras_rnn_lora.lora_plus import LoRAPlusOptimizer

        optimizer = LoRAPlusOptimizer(optimizer, loraplus_lr_ratio)
    model.compile(
        optimizer=optimizer,
        loss=MaskedSparseCrossEntropy(label_smoothing),
        metrics=[MaskedAccuracy(), MaskedPerplexity()],
        **compile_kwargs,
    )
    return model
