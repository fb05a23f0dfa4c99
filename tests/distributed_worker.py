"""One worker of the two-process tests (tests/distributed_test.py).

Joins the cluster its environment names (`TF_CONFIG`, or Keras'
`KERAS_DISTRIBUTION_*` variables on JAX) with
`keras_rnn_lora.multi_worker_strategy`, trains a small LoRA model on global
batches, has the chief write the adapter file, and prints one line,
`RESULT{json}`: the weights before and after, which are trainable, and
what this worker knows of the cluster. The adapter file is named after
the process that writes it (`adapter-<pid>.lora.weights.h5`). With
`--forever` it trains until it is killed, printing `STEP n` after every
step.

    python tests/distributed_worker.py --steps 3 --adapter-dir out
"""

import argparse
import json
import os
import sys

STEPS, FEATURES, UNITS, RANK, BATCH = 5, 4, 8, 2, 8
LEARNING_RATE = 0.1


def base_model():
    """A GRU and a Dense head with the same weights in every process."""
    import keras
    import numpy as np

    inputs = keras.Input((STEPS, FEATURES))
    hidden = keras.layers.GRU(UNITS, name="gru")(inputs)
    outputs = keras.layers.Dense(2, name="head")(hidden)
    model = keras.Model(inputs, outputs, name="base")
    rng = np.random.default_rng(0)
    for weight in model.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32") * 0.4)
    return model


def lora_model():
    """The base with a rank-2 adapter on its recurrent kernel, the factors
    set to random values (with B = 0, A would learn nothing at the first
    step), compiled with plain SGD."""
    import keras
    import numpy as np

    import keras_rnn_lora

    model = keras_rnn_lora.enable_lora(base_model(), rank=RANK)
    keras_rnn_lora.mark_only_lora_as_trainable(model)
    rng = np.random.default_rng(1)
    for weight in model.trainable_weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32") * 0.3)
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse")
    return model


def global_batches(steps):
    """`(x, y)`: `steps` global batches of `BATCH` examples, in order."""
    import numpy as np

    rng = np.random.default_rng(2)
    x = rng.normal(size=(steps * BATCH, STEPS, FEATURES)).astype("float32")
    y = rng.normal(size=(steps * BATCH, 2)).astype("float32")
    return x, y


def weight_values(model):
    import keras

    return {
        w.path: keras.ops.convert_to_numpy(w.value).tolist()
        for w in model.weights
    }


def exit_with_parent():
    """Ends this process when the process that started it dies (a test
    killed outright cannot kill its workers; a `--forever` worker left
    behind would train until the machine stops)."""
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main(argv=None):
    exit_with_parent()
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--adapter-dir", required=True)
    parser.add_argument("--heartbeat", type=int, default=None)
    parser.add_argument("--forever", action="store_true")
    args = parser.parse_args(argv)

    import keras_rnn_lora

    strategy = keras_rnn_lora.multi_worker_strategy(
        heartbeat_timeout_seconds=args.heartbeat
    )
    import keras
    import tensorflow as tf

    with strategy.scope():
        model = lora_model()
    before = weight_values(model)
    dataset = tf.data.Dataset.from_tensor_slices(global_batches(args.steps))
    dataset = dataset.batch(BATCH)
    steps = None
    if args.forever:
        dataset, steps = dataset.repeat(), 10**9

    class Progress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            print(f"STEP {batch}", flush=True)

    history = model.fit(
        dataset,
        epochs=1,
        steps_per_epoch=steps,
        shuffle=False,
        verbose=0,
        callbacks=[Progress()],
    )
    if keras_rnn_lora.is_chief():
        name = f"adapter-{os.getpid()}.lora.weights.h5"
        keras_rnn_lora.save_lora_weights(
            model, os.path.join(args.adapter_dir, name)
        )
    result = {
        "is_chief": keras_rnn_lora.is_chief(),
        "worker_count": keras_rnn_lora.worker_count(),
        "trainable": [w.path for w in model.trainable_weights],
        "before": before,
        "after": weight_values(model),
        "loss": history.history["loss"],
    }
    print("RESULT" + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
