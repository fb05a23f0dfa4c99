"""Training on several processes and hosts: the backends' own multi-worker
data parallelism, joined from the environment, and the chief that writes.

Each worker runs the same program. `multi_worker_strategy()` joins this
process to its cluster with the backend's own mechanism and returns what
the model is built under:

- TensorFlow: `tf.distribute.MultiWorkerMirroredStrategy`, its cluster and
  this worker's place in it read from `TF_CONFIG` (TensorFlow's variable).
- JAX: `jax.distributed.initialize` with the coordinator address, the
  number of processes and this process' id read from Keras' variables
  (`KERAS_DISTRIBUTION_JOB_ADDRESSES`, `KERAS_DISTRIBUTION_NUM_PROCESSES`,
  `KERAS_DISTRIBUTION_PROCESS_ID`, as `keras.distribution.initialize`
  reads them), Keras' random seed agreed between the processes, and a
  `keras.distribution.DataParallel` over every process' devices, set as
  Keras' distribution. On CPUs the collectives run over gloo.
- torch: Keras has no multi-process distribution for torch
  (`keras.distribution` is JAX's, `tf.distribute` TensorFlow's):
  `multi_worker_strategy` raises rather than train on one process.

Without a cluster in the environment it returns the same strategy over
this process alone. The gradients all-reduced at each step are those of
the trainable weights only: with `mark_only_lora_as_trainable`, the LoRA
factors. Files are written by the chief alone (`is_chief()`).

    strategy = keras_rnn_lora.multi_worker_strategy()
    with strategy.scope():
        model = keras_rnn_lora.enable_lora(build_base(), rank=8)
        keras_rnn_lora.mark_only_lora_as_trainable(model)
        model.compile(optimizer="adam", loss="mse")
    model.fit(dataset)  # a tf.data.Dataset of global batches
    if keras_rnn_lora.is_chief():
        keras_rnn_lora.save_lora_weights(model, "task.lora.weights.h5")
"""

import json
import os

import keras

from keras_rnn_lora import keras_internals
from keras_rnn_lora.checks import check_positive_int
from keras_rnn_lora.checks import invalid

#: Keras' environment variables for a JAX cluster (see
#: `keras.distribution.initialize`).
JAX_VARIABLES = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)
#: The task types of a `TF_CONFIG` cluster that train.
_TRAINING_TASKS = ("chief", "worker")


def _torch_refusal():
    return RuntimeError(
        "Multi-worker training is not available on the torch backend: "
        "Keras has no multi-process distribution for torch "
        "(keras.distribution runs on JAX, tf.distribute on TensorFlow). "
        "Train on several hosts with KERAS_BACKEND=tensorflow or "
        "KERAS_BACKEND=jax; on torch, train in one process."
    )


def _check_address(name, address):
    """`address` if it reads `host:port` (a host, and a port in 1-65535);
    otherwise `ValueError` naming `name`, where it came from."""
    host, colon, port = str(address).rpartition(":")
    if not (
        isinstance(address, str)
        and colon
        and host.strip()
        and port.isdigit()
        and 1 <= int(port) <= 65535
    ):
        raise ValueError(
            f"{name} holds the address {address!r}: an address reads "
            "host:port, with a port from 1 to 65535 (such as "
            "10.0.0.1:12345)."
        )
    return address


def tf_config():
    """The parsed `TF_CONFIG`, or `None` when it is not set. A value that
    is not a cluster and a task raises `ValueError` saying what is
    wrong."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}).") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ValueError(
            "TF_CONFIG must hold a 'cluster' (task type -> addresses) and "
            "this process' 'task' ({'type': ..., 'index': ...}). Received: "
            f"TF_CONFIG={text!r}"
        )
    kind, index = task.get("type"), task.get("index")
    addresses = cluster.get(kind)
    if (
        not isinstance(addresses, list)
        or not isinstance(index, int)
        or isinstance(index, bool)
        or not 0 <= index < len(addresses)
    ):
        raise ValueError(
            f"TF_CONFIG's task {task} is not in its cluster {cluster}: "
            "'type' must name a job of the cluster and 'index' a position "
            "in its list of addresses."
        )
    if kind not in _TRAINING_TASKS:
        raise ValueError(
            f"TF_CONFIG's task type is {kind!r}: multi-worker training "
            f"runs on {list(_TRAINING_TASKS)} tasks only (an 'evaluator' "
            "would train alone; 'ps' is for parameter-server training)."
        )
    for job, listed in cluster.items():
        if not isinstance(listed, list):
            raise ValueError(
                f"TF_CONFIG's cluster lists {job!r} as {listed!r}: each job "
                "is a list of host:port addresses."
            )
        for address in listed:
            _check_address(f"TF_CONFIG's job {job!r}", address)
    return config


def _jax_cluster():
    """`(coordinator, processes, process_id)` from Keras' variables, or
    `None` when none is set."""
    values = {name: os.environ.get(name) for name in JAX_VARIABLES}
    if not any(values.values()):
        return None
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise ValueError(
            f"A JAX cluster needs all of {list(JAX_VARIABLES)}; missing: "
            f"{missing}."
        )
    coordinator = values["KERAS_DISTRIBUTION_JOB_ADDRESSES"].split(",")[0]
    _check_address("KERAS_DISTRIBUTION_JOB_ADDRESSES", coordinator.strip())
    try:
        processes = int(values["KERAS_DISTRIBUTION_NUM_PROCESSES"])
        process_id = int(values["KERAS_DISTRIBUTION_PROCESS_ID"])
    except ValueError:
        raise ValueError(
            "KERAS_DISTRIBUTION_NUM_PROCESSES and "
            "KERAS_DISTRIBUTION_PROCESS_ID must be integers. Received: "
            f"{values['KERAS_DISTRIBUTION_NUM_PROCESSES']!r}, "
            f"{values['KERAS_DISTRIBUTION_PROCESS_ID']!r}"
        ) from None
    if processes < 1 or not 0 <= process_id < processes:
        raise ValueError(
            "KERAS_DISTRIBUTION_PROCESS_ID must lie in [0, "
            "KERAS_DISTRIBUTION_NUM_PROCESSES). Received: "
            f"process id {process_id} of {processes} processes"
        )
    return coordinator, processes, process_id


def cluster_in_environment():
    """Whether the environment names a cluster for this backend: `TF_CONFIG`
    on TensorFlow, Keras' `KERAS_DISTRIBUTION_*` variables on JAX; always
    `False` on torch. A malformed value raises `ValueError`."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return tf_config() is not None
    if backend == "jax":
        return _jax_cluster() is not None
    return False


def multi_worker_strategy(heartbeat_timeout_seconds=None):
    """Joins this process to its cluster and returns the backend's
    data-parallel strategy, to build and compile the model under
    (`with strategy.scope():`).

    Call it once, at the start of the program, before anything else runs
    on the backend (TensorFlow configures its collectives and JAX its
    distributed runtime then). Every worker runs the same program; give
    `fit` a `tf.data.Dataset` of global batches (every worker the same
    one): each worker trains on its share of each batch, and a step
    all-reduces the gradients of the trainable weights.

    TensorFlow: `tf.distribute.MultiWorkerMirroredStrategy` over the
    cluster in `TF_CONFIG`. Keras 3's TensorFlow trainer fails under it
    with more than one worker (it reduces a whole batch structure, and
    scalar metrics along an axis, with calls the strategy refuses); this
    applies the fix in `keras_internals.fix_multi_worker_tensorflow_trainer`
    first. A worker that dies makes the others fail (TensorFlow's
    coordination service stops waiting for its heartbeats).

    JAX: `jax.distributed.initialize` from Keras' `KERAS_DISTRIBUTION_*`
    variables, then what `keras.distribution.initialize` does after it
    (one random seed for every process, so that replicated weights start
    equal), then a `keras.distribution.DataParallel` over every process'
    devices, set as Keras' distribution and returned. Keras shards a
    `tf.data.Dataset` between the processes itself; every batch must hold
    a multiple of the number of processes. A process that dies ends the
    others after `heartbeat_timeout_seconds`.

    torch: raises `RuntimeError`; Keras has no multi-process distribution
    for torch.

    Args:
        heartbeat_timeout_seconds: int or `None` (default: JAX's, 100
            seconds). JAX only: how long the others wait for a silent
            process before ending with an error.

    Returns:
        The `tf.distribute.Strategy` (TensorFlow) or the
        `keras.distribution.DataParallel` (JAX); both have `scope()`.
    """
    if heartbeat_timeout_seconds is not None:
        check_positive_int(
            "heartbeat_timeout_seconds", heartbeat_timeout_seconds
        )
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tensorflow_strategy()
    if backend == "jax":
        return _jax_distribution(heartbeat_timeout_seconds)
    if backend == "torch":
        raise _torch_refusal()
    raise invalid("KERAS_BACKEND", "tensorflow or jax", backend)


def _tensorflow_strategy():
    import tensorflow as tf

    tf_config()  # a malformed TF_CONFIG fails here, naming what is wrong
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as error:
        raise RuntimeError(
            f"{error} Create the strategy (`multi_worker_strategy()`) at "
            "the start of the program, before TensorFlow runs anything."
        ) from error
    keras_internals.fix_multi_worker_tensorflow_trainer()
    return strategy


def _jax_distribution(heartbeat_timeout_seconds):
    import jax

    cluster = _jax_cluster()
    if cluster is not None and not jax.distributed.is_initialized():
        coordinator, processes, process_id = cluster
        options = {}
        if heartbeat_timeout_seconds is not None:
            options["heartbeat_timeout_seconds"] = heartbeat_timeout_seconds
        jax.distributed.initialize(
            coordinator_address=coordinator.strip(),
            num_processes=processes,
            process_id=process_id,
            **options,
        )
        if jax.process_count() != processes:
            raise ValueError(
                f"KERAS_DISTRIBUTION_NUM_PROCESSES is {processes} here, but "
                f"the cluster this process joined has {jax.process_count()} "
                "processes: give every process the same count."
            )
        keras_internals.agree_on_random_seed()
    distribution = keras.distribution.DataParallel()
    keras.distribution.set_distribution(distribution)
    return distribution


def worker_count():
    """How many workers train together: the training tasks of `TF_CONFIG`
    (TensorFlow), the processes of the JAX cluster (JAX), 1 without a
    cluster (and on torch)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        config = tf_config()
        if config is None:
            return 1
        cluster = config["cluster"]
        return sum(len(cluster.get(kind, [])) for kind in _TRAINING_TASKS)
    if backend == "jax":
        import jax

        if jax.distributed.is_initialized():
            return jax.process_count()  # the cluster as it formed
        cluster = _jax_cluster()
        return 1 if cluster is None else cluster[1]
    return 1


def is_chief():
    """Whether this process is the one that writes files (adapter files,
    checkpoints, reports): the `chief` task of `TF_CONFIG`, or worker 0
    of a cluster without one (TensorFlow's rule); process 0 on JAX; always
    without a cluster (and on torch).

    Every worker holds the same weights after a step, so one file is
    enough; reading them takes no collective, so the chief writes alone:

        if keras_rnn_lora.is_chief():
            keras_rnn_lora.save_lora_weights(model, path)
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        config = tf_config()
        if config is None:
            return True
        kind, index = config["task"]["type"], config["task"]["index"]
        if "chief" in config["cluster"]:
            return kind == "chief"
        return kind == "worker" and index == 0
    if backend == "jax":
        cluster = _jax_cluster()
        return cluster is None or cluster[2] == 0
    return True
