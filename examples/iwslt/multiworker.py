"""`--multi-worker`: the main job's training on several workers (hosts).

Every worker runs the main job with the same arguments, each with its own
`--output-dir` and `--export-dir`, its place in the cluster in the
environment: `TF_CONFIG` (TensorFlow), or Keras' `KERAS_DISTRIBUTION_*`
variables (JAX). The jobs that train (pre-training, the learning-rate
trials, the arms' incremental phase, the ablation points) join the cluster
(`keras_rnn_lora.multi_worker_strategy`) and build their model under it:
each global batch is split between the workers and every step all-reduces
the gradients of the trainable weights. Every worker evaluates and writes
its own folder, so every folder holds the whole run; the chief's is the
one to read. The cost jobs (memory, step timing) and the export run on
each worker alone.

A job starts only once every worker is in the same job with the same
folder state (a digest compared through the cluster): workers resumed
from different states stop with an error instead of training different
models together. Keras shards a batch between JAX processes by cutting it
in equal parts, so there every batch is padded to `--batch-size` with
rows whose targets are all padding, which count nowhere (loss, gradients,
metrics). torch: Keras has no multi-process distribution; `--multi-worker`
is refused.
"""

import contextlib
import hashlib
import json
import os

#: The jobs that train, and so run under the cluster's strategy.
TRAINING_JOBS = ("pretrain", "select_learning_rate", "run_arm", "run_point")


def check(parser, args):
    """Refuses `--multi-worker` where it cannot run, with one clear line:
    on torch, without a cluster in the environment, or (JAX) with a batch
    that does not split evenly between the processes."""
    if not args.multi_worker:
        return
    import keras

    from keras_rnn_lora import distributed

    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        parser.error(
            f"--multi-worker: Keras has no multi-process distribution for "
            f"the {backend} backend (keras.distribution runs on JAX, "
            "tf.distribute on TensorFlow); run with KERAS_BACKEND=tensorflow "
            "or jax, or without --multi-worker"
        )
    variables = (
        "TF_CONFIG"
        if backend == "tensorflow"
        else ", ".join(distributed.JAX_VARIABLES)
    )
    try:
        present = distributed.cluster_in_environment()
    except ValueError as error:
        parser.error(f"--multi-worker: {error}")
    if not present:
        parser.error(
            f"--multi-worker needs the cluster in the environment ({variables} "
            "on every worker); see docs/multi-worker.md"
        )
    workers = distributed.worker_count()
    if backend == "jax" and args.batch_size % workers:
        parser.error(
            f"--batch-size {args.batch_size} must be a multiple of the "
            f"{workers} JAX processes (Keras cuts each batch in equal parts)"
        )


@contextlib.contextmanager
def joined(job, arguments):
    """Runs a training job under the cluster's strategy when the run is
    `--multi-worker`; any other job as it is."""
    args = arguments[0] if arguments else None
    if not getattr(args, "multi_worker", False) or (
        job.__name__ not in TRAINING_JOBS
    ):
        yield
        return
    import keras_rnn_lora

    strategy = keras_rnn_lora.multi_worker_strategy()
    _agree(strategy, _digest(job, arguments))
    with strategy.scope():
        yield


def _digest(job, arguments):
    """The job, its arguments and the files of the output folder (resumed
    work): equal on every worker that should train together."""
    args = arguments[0]
    files = []
    for root, dirs, names in os.walk(args.output_dir):
        dirs[:] = sorted(d for d in dirs if d != "backup")
        relative = os.path.relpath(root, args.output_dir)
        files += [os.path.join(relative, n) for n in sorted(names)]
    state = {
        "job": job.__name__,
        "arguments": [str(a) for a in arguments[1:]],
        "files": [f for f in files if not f.endswith("run.lock")],
    }
    text = json.dumps(state, sort_keys=True)
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def _agree(strategy, digest):
    """Raises unless every worker holds the same `digest`."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        def gather():
            context = tf.distribute.get_replica_context()
            return context.all_gather(tf.constant([digest], tf.int64), 0)

        @tf.function  # run eagerly, the strategy warns of its overhead
        def agree():
            return strategy.run(gather)

        values = strategy.experimental_local_results(agree())
        digests = set(values[0].numpy().tolist())
    else:
        import numpy as np
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather(np.array([digest]))
        digests = set(np.asarray(gathered).ravel().tolist())
    if len(digests) != 1:
        raise SystemExit(
            "--multi-worker: the workers are not in the same job with the "
            "same output-folder state (one resumed from other files, or "
            "started with other arguments); start every worker with the "
            "same arguments on an empty folder, or on copies of one."
        )


def full_batches(args, dataset):
    """`dataset` with every batch padded to `--batch-size` in a training
    job on a JAX cluster (see the module); unchanged otherwise."""
    import keras

    if not (
        args.multi_worker
        and keras.backend.backend() == "jax"
        and keras.distribution.distribution() is not None
    ):
        return dataset
    import tensorflow as tf

    size = args.batch_size

    def pad(inputs, targets):
        source, decoder_inputs = inputs
        missing = size - tf.shape(targets)[0]

        def repeat_first(x):  # real inputs: no empty sequence anywhere
            return tf.concat([x, tf.repeat(x[:1], missing, axis=0)], 0)

        targets = tf.pad(targets, [[0, missing], [0, 0]])
        return (repeat_first(source), repeat_first(decoder_inputs)), targets

    return dataset.map(pad)
