"""The arms and how one learns a chunk of data.

Every arm starts from the same pre-trained translator. `fit_chunk` trains
it on one chunk with `BackupAndRestore` (a killed fit resumes after its
last finished epoch), halves its learning rate after half its patience
without a better validation perplexity, stops `patience` epochs after its best
epoch, keeps that epoch's weights (restored at the end: each arm is
evaluated at its best epoch) and logs every epoch's wall time, steps,
learning rate and validation perplexity, all persisted beside the
checkpoint, so a resumed fit reports what was really measured.
"""

import json
import os
import time

from iwslt.settings import arm_spec


def write_json(path, data):
    from keras_rnn_lora import files

    files.write_text(path, json.dumps(data, indent=2))


def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as file:
        return json.load(file)


def build_arm(args, arm, pretrained_path, config=None):
    """The model of `arm` (see `settings.arm_spec`), from the pre-trained
    translator. `config` (a `LoRAConfig`) replaces the arm's own."""
    import keras

    import keras_rnn_lora
    import keras_rnn_lora.translation  # registers the Translator class

    model = keras.saving.load_model(pretrained_path, compile=False)
    spec = arm_spec(arm)
    if "targets" in spec:
        config = config or keras_rnn_lora.LoRAConfig(
            **spec.get(
                "config", {"rank": args.rank, "lora_targets": spec["targets"]}
            )
        )
        model = keras_rnn_lora.enable_lora(
            model, config=config, base_dtype=spec.get("base_dtype")
        )
        keras_rnn_lora.mark_only_lora_as_trainable(model)
    if arm == "frozen":
        model.trainable = False  # no update: nothing trains
    return model


def compile_arm(args, model, learning_rate, arm=None):
    """Compiles `model` as `arm` trains (LoRA+ points: B at
    `LORAPLUS_RATIO` times the rate)."""
    from keras_rnn_lora.translation.metrics import compile_translator

    ratio = arm_spec(arm).get("loraplus_ratio") if arm else None
    return compile_translator(
        model,
        learning_rate,
        label_smoothing=args.label_smoothing,
        loraplus_lr_ratio=ratio,
    )


def _callback_base():
    import keras

    return keras.callbacks.Callback


_LOGGED = ("seconds", "steps", "val", "learning_rate")


class EpochLog:
    """Each epoch's wall time, training steps, learning rate and validation
    perplexity, persisted at every epoch end. An epoch whose time was lost
    to a kill stays missing: it is reported as not measured, never
    guessed."""

    def __init__(self, path):
        self.path = path
        saved = read_json(path, {})
        self.values = {
            name: {int(k): v for k, v in saved.get(name, {}).items()}
            for name in _LOGGED
        }
        self.processes = saved.get("processes", 0) + 1
        log = self

        class Callback(_callback_base()):
            def on_epoch_begin(self, epoch, logs=None):
                log.start = time.perf_counter()
                log.steps = 0

            def on_train_batch_end(self, batch, logs=None):
                log.steps += 1

            def on_epoch_end(self, epoch, logs=None):
                import keras

                rate = self.model.optimizer.learning_rate
                values = log.values
                values["seconds"][epoch] = time.perf_counter() - log.start
                values["steps"][epoch] = log.steps
                values["val"][epoch] = (logs or {}).get("val_perplexity")
                values["learning_rate"][epoch] = float(
                    keras.ops.convert_to_numpy(rate)
                )
                log.save()

        self.callback = Callback()

    def curve(self, name, epochs):
        return [self.values[name].get(i) for i in range(epochs)]

    def save(self):
        write_json(self.path, {**self.values, "processes": self.processes})


def plateau_patience(patience):
    """Epochs without a better validation perplexity after which a fit
    that early stopping ends `patience` epochs after its best reduces its
    learning rate: half of them (at least 1), so the fit tries the lower
    rate before it stops, and one noisy epoch does not cut the rate of a
    long fit."""
    return max(1, patience // 2)


def plateau_schedule(directory, factor, patience=1):
    """Keras' `ReduceLROnPlateau` on validation perplexity: the rate is
    multiplied by `factor` after `patience` epochs in a row that do not
    improve on the best, its state persisted per epoch beside the fit's
    checkpoint so that a resumed fit goes on as the killed one would have.
    `None` when `factor` is 1 (a constant rate)."""
    if factor >= 1.0:
        return None
    import keras

    state_path = os.path.join(directory, "plateau.json")
    fields = ("best", "wait", "cooldown_counter")

    class Schedule(keras.callbacks.ReduceLROnPlateau):
        def on_epoch_begin(self, epoch, logs=None):
            # The state after the epoch before this one (the learning rate
            # itself is an optimizer variable: BackupAndRestore restores it).
            state = read_json(state_path, {}).get(str(epoch - 1))
            if state:
                for name in fields:
                    setattr(self, name, state[name])

        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            saved = read_json(state_path, {})
            saved[str(epoch)] = {
                "best": None if self.best is None else float(self.best),
                "wait": int(self.wait),
                "cooldown_counter": int(self.cooldown_counter),
            }
            write_json(state_path, saved)

    # min_delta=0: any improvement is one, as for the best epoch.
    return Schedule(
        monitor="val_perplexity",
        mode="min",
        factor=factor,
        patience=patience,
        min_delta=0.0,
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
                # The last epoch this callback has judged: a fit killed
                # before this write judges that epoch again when resumed.
                state["seen"] = epoch
                write_json(best.state_path, state)
                if best.patience and best.ended(epoch, state):
                    self.model.stop_training = True

            def on_train_end(self, logs=None):
                if os.path.exists(best.weights_path):
                    self.model.load_weights(best.weights_path)

        self.callback = Callback()

    def state(self):
        return read_json(self.state_path, {})

    def ended(self, epoch, state=None):
        """Whether early stopping ends the fit after `epoch`: `patience`
        epochs after the best, or after the first `patience` epochs when
        none has had a finite validation perplexity (a diverged fit)."""
        if self.patience is None:
            return False
        state = self.state() if state is None else state
        return epoch - state.get("epoch", -1) >= self.patience


def save_weights(model, path):
    from keras_rnn_lora import files

    files.save_weights(model, path)


def atomic_backup(directory):
    """Keras' `BackupAndRestore`, writing its checkpoint atomically (see
    `keras_rnn_lora.keras_internals.AtomicBackupAndRestore`)."""
    from keras_rnn_lora.keras_internals import AtomicBackupAndRestore

    return AtomicBackupAndRestore(directory, delete_checkpoint=False)


def fit_chunk(args, model, train, validation, epochs, directory, patience):
    """Trains `model` on `train` (batches) for at most `epochs` (the cap),
    multiplying the learning rate by `args.plateau_factor` on a plateau
    (`plateau_patience`) and stopping `patience` epochs after the best,
    resumable, ending on its
    best-validation epoch. Returns the record of the fit; its `stopped`
    says what ended it: "early stopping" or "cap"."""

    os.makedirs(directory, exist_ok=True)
    log = EpochLog(os.path.join(directory, "epochs.json"))
    best = BestEpoch(directory, patience)
    schedule = plateau_schedule(
        directory, args.plateau_factor, plateau_patience(patience or 1)
    )
    seen = best.state().get("seen")
    if seen is not None and (seen + 1 >= epochs or best.ended(seen)):
        # It had ended (killed before its caller saved what followed): the
        # fit as it ended, not more epochs from its backup.
        if os.path.exists(best.weights_path):
            model.load_weights(best.weights_path)
    else:
        _fit(model, train, validation, epochs, directory, log, best, schedule)
    return _record(log, best, epochs, patience)


def _fit(model, train, validation, epochs, directory, log, best, schedule):
    model.fit(
        train,
        validation_data=validation,
        epochs=epochs,
        shuffle=False,  # the dataset shuffles itself, seeded
        callbacks=[
            # Before the backup: an epoch counts as done only once its time
            # and its weights (if best) are on disk. The log reads the rate
            # the epoch trained with, before the schedule changes it.
            log.callback,
            *([schedule] if schedule else []),
            best.callback,
            atomic_backup(os.path.join(directory, "backup")),
        ],
        verbose=2,
    )


def _record(log, best, epochs, patience):
    ran = len(log.values["seconds"])
    seconds = log.curve("seconds", ran)
    measured = all(s is not None for s in seconds)
    state = best.state()
    return {
        "epochs_run": ran,
        "epoch_cap": epochs,
        "patience": patience,
        "plateau_patience": plateau_patience(patience or 1),
        # Early stopping ends a fit before its cap, or on the cap's last
        # epoch when that epoch is `patience` after the best.
        "stopped": "early stopping"
        if ran < epochs or best.ended(ran - 1, state)
        else "cap",
        "epoch_seconds": seconds,
        # None when an epoch's time was lost to a kill: not measured.
        "train_seconds": sum(seconds) if measured else None,
        "epoch_steps": log.curve("steps", ran),
        "learning_rate_curve": log.curve("learning_rate", ran),
        "val_perplexity_curve": log.curve("val", ran),
        "best_epoch": state.get("epoch"),
        "best_val_perplexity": state.get("value"),
        "resumed": log.processes > 1,
    }
