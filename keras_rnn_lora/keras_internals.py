"""Every use of Keras internals, in one place.

Each entry is a private Keras name this project uses, or Keras logic it
copies or works around, with why. All were read from Keras
`KERAS_VERSION_READ`; `tests/keras_internals_test.py` checks each against
the installed Keras and fails naming the symbol when one is gone or has
changed shape. Nothing outside this module reads a private Keras name.
"""

import contextlib

import keras
from keras.src.optimizers import base_optimizer as keras_base_optimizer

KERAS_VERSION_READ = "3.15.1"


# -- LSTM gate math -----------------------------------------------------------


def lstm_carry_and_output(cell, z, c_tm1):
    """`LSTMCell._compute_carry_and_output_fused(z, c_tm1)`: the LSTM's new
    carry and output gate from the four gate pre-activations `z`. The LoRA
    cell computes `z` itself (factored) and reuses Keras' gate math so the
    two cannot drift apart."""
    return cell._compute_carry_and_output_fused(z, c_tm1)


# -- the raw weight under Keras' own LoRA -------------------------------------

#: The attribute holding the frozen weight of each Keras layer with its own
#: LoRA (`enable_lora`): the public `kernel`/`embeddings` properties add the
#: delta, these are the variables themselves.
RAW_WEIGHT_ATTRIBUTES = {
    keras.layers.Dense: "_kernel",
    keras.layers.EinsumDense: "_kernel",
    keras.layers.Embedding: "_embeddings",
}


def raw_weight(layer):
    """The frozen weight variable of a Dense, EinsumDense or Embedding."""
    for cls, attribute in RAW_WEIGHT_ATTRIBUTES.items():
        if isinstance(layer, cls):
            return getattr(layer, attribute)
    raise TypeError(f"No raw weight known for {type(layer).__name__}.")


@contextlib.contextmanager
def weights_addable(layer):
    """Lets `layer` create weights after Keras locked its tracker: Keras'
    `enable_lora` locks it (`layer._tracker.lock()`) once it has added its
    factors, and DoRA's magnitude comes after them."""
    tracker = layer._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if locked:
            tracker.lock()


def untrack_weights(layer, weights):
    """Removes `weights` from `layer`'s variable lists
    (`layer._trainable_variables`, `layer._non_trainable_variables`), which
    Keras offers no public way to do: a deleted named adapter's variables
    leave the layer."""
    ids = {id(w) for w in weights}
    for variables in (
        layer._trainable_variables,
        layer._non_trainable_variables,
    ):
        variables[:] = [v for v in variables if id(v) not in ids]


# -- attributes Keras must not track ------------------------------------------


def set_untracked(layer, name, value):
    """Sets `layer.name` without Keras' attribute tracking
    (`Layer.__setattr__` would adopt a layer-like value as a child and
    track its weights): for short-lived views of a layer's own cell, and
    for the model weights an optimizer wrapper keeps (`Optimizer`'s
    tracker would adopt the variables in a list as its own)."""
    object.__setattr__(layer, name, value)


# -- what the stock recurrent layers' loops do --------------------------------

#: Backends on which Keras' stock layer projects the whole input sequence in
#: one matmul before stepping (any device): GRU on JAX and torch, LSTM on
#: torch (`keras/src/backend/{jax,torch}/rnn.py` `gru`/`lstm`, reached from
#: `GRU.inner_loop`/`LSTM.inner_loop`); never on TensorFlow's CPU path, never
#: for SimpleRNN.
STOCK_PRECOMPUTES_ON = {
    keras.layers.GRU: ("jax", "torch"),
    keras.layers.LSTM: ("torch",),
    keras.layers.SimpleRNN: (),
}


def stock_precomputes(layer_class, use_cudnn, cell, unroll, mask):
    """Whether Keras' stock `layer_class` with these settings projects the
    input sequence in one matmul before stepping on this backend: its
    `inner_loop` tries the backend's kernel (`use_cudnn` "auto" or True, no
    recurrent dropout), which takes no mask, no unroll and (GRU) only
    `reset_after=True`."""
    return bool(
        keras.backend.backend() in STOCK_PRECOMPUTES_ON.get(layer_class, ())
        and use_cudnn in ("auto", True)
        and getattr(cell, "reset_after", True)
        and mask is None
        and not unroll
        and not cell.recurrent_dropout
    )


def contiguous_sequence(outputs):
    """`outputs` in contiguous memory on torch; unchanged elsewhere.

    Keras' torch `rnn()` returns the sequence as a transposed view of a
    time-major stack. A `Dense` after it then runs a batched matmul with its
    kernel broadcast over the batch, and a loss a log-softmax over strided
    memory; one copy makes them plain 2D matmuls (`torch.profiler`: the
    paper's Elman model, 2 x 512, vocabulary 8,000, step 180 -> 107 ms).
    """
    if keras.backend.backend() == "torch" and hasattr(outputs, "contiguous"):
        return outputs.contiguous()
    return outputs


def fused_kernel_module():
    """The module whose `gru`, `lstm`, `bidirectional_gru` and
    `bidirectional_lstm` Keras' RNN layers call for fused (cuDNN) kernels:
    what a test patches to emulate a GPU on a CPU."""
    from keras.src import backend

    return backend


# -- optimizers ---------------------------------------------------------------


def learning_rate_argument(optimizer):
    """The learning rate `optimizer` was given, as it keeps it
    (`Optimizer._learning_rate`): a `keras.Variable` for a number, else the
    `LearningRateSchedule` or callable itself. The public `learning_rate`
    evaluates a schedule at the current step, which loses the schedule."""
    return optimizer._learning_rate


def clip_by_global_norm(grads, clip_norm):
    """Keras' own clipping for `global_clipnorm`
    (`keras.src.optimizers.base_optimizer.clip_by_global_norm`, which
    `Optimizer._clip_gradients` calls): `grads` scaled together so that
    their global norm is at most `clip_norm`; `None` entries stay `None`."""
    return keras_base_optimizer.clip_by_global_norm(grads, clip_norm)


# -- checkpoints --------------------------------------------------------------


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' `BackupAndRestore`, writing its checkpoint atomically.

    Keras writes `latest.weights.h5` in place (`_save_model`): a kill during
    the write leaves a truncated file, and the resumed run fails loading
    it. Here the weights, then the metadata saying which epoch they hold,
    are each written beside their file and renamed into place, so a kill
    leaves the previous checkpoint or the new one, never part of one. (A
    kill between the two renames, microseconds apart, leaves the new weights
    with the previous epoch number: that epoch runs once more.) Reads
    Keras' `_weights_path`, `_training_metadata_path`, `_current_epoch` and
    `_last_batch_seen`.
    """

    def _save_model(self):
        import json
        import os

        from keras_rnn_lora import files

        os.makedirs(self.backup_dir, exist_ok=True)
        files.save_weights(self.model, self._weights_path)
        metadata = {
            "epoch": self._current_epoch,
            "batch": self._last_batch_seen,
        }
        files.write_text(self._training_metadata_path, json.dumps(metadata))


# -- multi-worker training ----------------------------------------------------


def fix_multi_worker_tensorflow_trainer():
    """Lets Keras' TensorFlow trainer run under a
    `tf.distribute.MultiWorkerMirroredStrategy` with more than one worker.

    Keras 3 (read from 3.15.1; unchanged in its main branch) fails there
    in two places, both reductions the strategy refuses across workers:

    - `TensorFlowTrainer._maybe_symbolic_build` takes the first batch to
      build the model and reduces the whole `(x, y)` structure with
      `strategy.reduce("MEAN", batch, axis=None)`: `reduce` takes one
      value, not a structure ("Attempt to convert a value (PerReplica...)").
      The batch is only read for its shapes and dtypes, so here it is this
      worker's first replica's share, and nothing is reduced.
    - `reduce_per_replica(..., reduction="auto")`, which averages each
      step's metric values over the replicas, passes `axis=0` for
      multi-worker strategies: a scalar has no axis 0 ("Invalid reduction
      dimension 0 for input with 0 dimensions"). Here the values are
      averaged over the replicas (`axis=None`), as Keras does with one
      worker.

    Both apply only when the trainer's strategy is a multi-worker
    `MultiWorkerMirroredStrategy`; every other case runs Keras' own code.
    Patches the module once; calling it again does nothing.
    """
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    cls = trainer.TensorFlowTrainer
    if getattr(cls, "_keras_rnn_lora_multi_worker", False):
        return
    build = cls._maybe_symbolic_build
    reduce_per_replica = trainer.reduce_per_replica
    multi_worker = trainer._collective_all_reduce_multi_worker

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self.distribute_strategy
        if iterator is None or not multi_worker(strategy):
            return build(self, iterator=iterator, data_batch=data_batch)
        for _, _, batches in iterator:
            data_batch = tree.map_structure(
                lambda v: strategy.experimental_local_results(v)[0],
                next(batches),
            )
            break
        return build(self, data_batch=data_batch)

    def reduce_per_replica_across_workers(values, strategy, reduction):
        if reduction in ("auto", "mean") and multi_worker(strategy):
            return tree.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None), values
            )
        return reduce_per_replica(values, strategy, reduction)

    cls._maybe_symbolic_build = _maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica_across_workers
    cls._keras_rnn_lora_multi_worker = True


def agree_on_random_seed():
    """What `keras.distribution.initialize` does on JAX after
    `jax.distributed.initialize`: unless a seed is set, every process
    draws one and they all take their sum
    (`keras.src.backend.jax.distribution_lib.initialize_rng`), so that
    weights created replicated start equal on every process.
    `keras.distribution.initialize` itself cannot be used: it does not pass
    `heartbeat_timeout_seconds` on."""
    from keras.src.backend.jax import distribution_lib

    distribution_lib.initialize_rng()


#: What `tests/keras_internals_test.py` checks: each private name above and
#: the object that must have it.
PRIVATE_NAMES = (
    ("LSTMCell._compute_carry_and_output_fused", keras.layers.LSTMCell),
    ("Layer._tracker", keras.layers.Dense(1)),
    ("Layer._trainable_variables", keras.layers.Dense(1)),
    ("Layer._non_trainable_variables", keras.layers.Dense(1)),
    ("BackupAndRestore._save_model", keras.callbacks.BackupAndRestore),
    # An instance attribute: checked on `SGD()`.
    ("Optimizer._learning_rate", keras.optimizers.SGD),
    ("base_optimizer.clip_by_global_norm", keras_base_optimizer),
    # Modules of one backend, named by path: imported by the test only.
    (
        "TensorFlowTrainer._maybe_symbolic_build",
        "keras.src.backend.tensorflow.trainer.TensorFlowTrainer",
    ),
    ("trainer.reduce_per_replica", "keras.src.backend.tensorflow.trainer"),
    (
        "trainer._collective_all_reduce_multi_worker",
        "keras.src.backend.tensorflow.trainer",
    ),
    (
        "distribution_lib.initialize_rng",
        "keras.src.backend.jax.distribution_lib",
    ),
)
