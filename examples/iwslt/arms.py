"""The arms and how one learns a chunk of data.

Every arm starts from the same pre-trained translator. `fit_chunk` trains
it on one chunk with `BackupAndRestore` (a killed fit resumes after its
last finished epoch), keeps the weights of the epoch with the best
validation perplexity (restored at the end: each arm is evaluated at its
best epoch) and logs every epoch's wall time, all persisted beside the
checkpoint, so a resumed fit reports what was really measured.
"""

import json
import os
import time

from iwslt.settings import ARMS


def write_json(path, data):
    from keras_rnn_lora import files

    files.write_text(path, json.dumps(data, indent=2))


def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as file:
        return json.load(file)


def build_arm(args, arm, pretrained_path, config=None):
    """The model of `arm`, from the pre-trained translator. `config` (a
    `LoRAConfig`) overrides the arm's adapter settings (the ablation)."""
    import keras

    import keras_rnn_lora
    import keras_rnn_lora.translation  # registers the Translator class

    model = keras.saving.load_model(pretrained_path, compile=False)
    spec = ARMS.get(arm, {})
    if config is not None or "targets" in spec:
        config = config or keras_rnn_lora.LoRAConfig(
            rank=args.rank, lora_targets=spec["targets"]
        )
        model = keras_rnn_lora.enable_lora(
            model, config=config, base_dtype=spec.get("base_dtype")
        )
        keras_rnn_lora.mark_only_lora_as_trainable(model)
    if arm == "frozen":
        model.trainable = False  # no update: nothing trains
    return model


def compile_arm(args, model, learning_rate):
    from keras_rnn_lora.translation.metrics import compile_translator

    return compile_translator(
        model, learning_rate, label_smoothing=args.label_smoothing
    )


def _callback_base():
    import keras

    return keras.callbacks.Callback


class EpochLog:
    """Each epoch's wall time and validation perplexity, persisted at every
    epoch end. An epoch whose time was lost to a kill stays missing: it is
    reported as not measured, never guessed."""

    def __init__(self, path):
        self.path = path
        saved = read_json(path, {})
        self.seconds = {int(k): v for k, v in saved.get("seconds", {}).items()}
        self.val = {int(k): v for k, v in saved.get("val", {}).items()}
        self.processes = saved.get("processes", 0) + 1
        log = self

        class Callback(_callback_base()):
            def on_epoch_begin(self, epoch, logs=None):
                log.start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                log.seconds[epoch] = time.perf_counter() - log.start
                log.val[epoch] = (logs or {}).get("val_perplexity")
                log.save()

        self.callback = Callback()

    def save(self):
        write_json(
            self.path,
            {
                "seconds": self.seconds,
                "val": self.val,
                "processes": self.processes,
            },
        )


class BestEpoch:
    """Keeps on disk the weights of the epoch with the lowest validation
    perplexity, with its value and epoch, so that a resumed fit still
    compares against every epoch; restores them when the fit ends. With
    `patience`, stops the fit that many epochs after the best one."""

    def __init__(self, directory, patience=None):
        self.state_path = os.path.join(directory, "best.json")
        self.weights_path = os.path.join(directory, "best.weights.h5")
        best = self
        self.patience = patience

        class Callback(_callback_base()):
            def on_epoch_end(self, epoch, logs=None):
                value = (logs or {}).get("val_perplexity")
                state = read_json(best.state_path, {})
                if value is not None and value < state.get(
                    "value", float("inf")
                ):
                    save_weights(self.model, best.weights_path)
                    state = {"value": value, "epoch": epoch}
                    write_json(best.state_path, state)
                if (
                    best.patience
                    and epoch - state.get("epoch", epoch) >= best.patience
                ):
                    self.model.stop_training = True

            def on_train_end(self, logs=None):
                if os.path.exists(best.weights_path):
                    self.model.load_weights(best.weights_path)

        self.callback = Callback()

    def state(self):
        return read_json(self.state_path, {})


def save_weights(model, path):
    from keras_rnn_lora import files

    files.save_weights(model, path)


def atomic_backup(directory):
    """Keras' `BackupAndRestore`, writing its checkpoint atomically (see
    `keras_rnn_lora.keras_internals.AtomicBackupAndRestore`)."""
    from keras_rnn_lora.keras_internals import AtomicBackupAndRestore

    return AtomicBackupAndRestore(directory, delete_checkpoint=False)


def fit_chunk(args, model, train, validation, epochs, directory, patience=None):
    """Trains `model` on `train` (batches) for at most `epochs`, resumable,
    ending on its best-validation epoch. Returns the record of the fit."""

    os.makedirs(directory, exist_ok=True)
    log = EpochLog(os.path.join(directory, "epochs.json"))
    best = BestEpoch(directory, patience)
    model.fit(
        train,
        validation_data=validation,
        epochs=epochs,
        shuffle=False,  # the dataset shuffles itself, seeded
        callbacks=[
            # Before the backup: an epoch counts as done only once its time
            # and its weights (if best) are on disk.
            log.callback,
            best.callback,
            atomic_backup(os.path.join(directory, "backup")),
        ],
        verbose=2,
    )
    ran = sorted(log.seconds)
    seconds = [log.seconds.get(i) for i in range(len(ran))]
    measured = all(s is not None for s in seconds)
    state = best.state()
    return {
        "epochs_run": len(ran),
        "epoch_seconds": seconds,
        # None when an epoch's time was lost to a kill: not measured.
        "train_seconds": sum(seconds) if measured else None,
        "val_perplexity_curve": [log.val.get(i) for i in range(len(ran))],
        "best_epoch": state.get("epoch"),
        "best_val_perplexity": state.get("value"),
        "resumed": log.processes > 1,
    }
