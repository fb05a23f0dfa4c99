"""Every increment as an adapter: one SavedModel serving the pre-trained
translator and every LoRA arm after every chunk, chosen per request.

A LoRA arm that merges learns chunk k as adapter `s * A_k @ B_k` over the
base merged with chunks 1..k-1, so after chunk k its model is the
pre-trained base plus the sum of k factored updates: one adapter of rank
`k * r` (`keras_rnn_lora.add_stacked_adapter`). `lora_bf16` keeps one
adapter learning every chunk: its adapter after chunk k is that update
already (served over the float32 base, like its merged export), and is
checked against the arm's saved state after chunk k. The export serves
`<arm>_after_<k>` for each, and `base`; requests that name none get the arm
`export` is given, after the last chunk.
"""

import hashlib
import os

from iwslt.arms import build_arm
from iwslt.arms import read_json
from iwslt.arms import write_json
from iwslt.paths import from_output
from iwslt.paths import in_output
from iwslt.settings import ARMS


def adapter_path(directory, chunk):
    """The adapter file an arm writes after learning `chunk`, before it
    merges (in its seed's folder, `directory`)."""
    return os.path.join(directory, f"chunk_{chunk}.lora.weights.h5")


def state_path(directory, chunk):
    """The arm's weights after `chunk` (merged, for an arm that merges)."""
    return os.path.join(directory, f"after_chunk_{chunk}.weights.h5")


def served_name(arm, chunk):
    return f"{arm}_after_{chunk}"


def _arm_dir(args, arm):
    return os.path.join(args.output_dir, "seeds", "0", arm)


def _arm_files(args, arm):
    """Every file of `arm` the export depends on, in order: each chunk's
    adapter and the arm's state after it; a missing one is named."""
    directory = _arm_dir(args, arm)
    files = []
    for chunk in range(1, args.increments + 1):
        files += [adapter_path(directory, chunk), state_path(directory, chunk)]
    for name in files:
        if not os.path.isfile(name):
            raise FileNotFoundError(
                f"{name} is missing: the files of arm {arm!r} are "
                f"incomplete. Delete {directory} and start the run again "
                "to train the arm again."
            )
    return files


def increments_model(args, arms):
    """The pre-trained translator holding `<arm>_after_<k>` for every arm
    of `arms` (LoRA arms, seed 0) and chunk k (see module).

    Each arm's chunks are read back in the order they were learned: the
    adapter of chunk k loads (strictly: its file records the frozen base it
    was trained on) into the arm's model restored as it stood before chunk
    k, so an adapter file that does not belong to that chain is refused.
    An arm that does not merge trains every chunk over the same base, so
    its adapter of chunk k must also be the one its saved state after
    chunk k holds."""
    import keras
    import numpy as np

    import keras_rnn_lora
    import keras_rnn_lora.translation  # noqa: F401  (registers the Translator)
    from keras_rnn_lora.walk import lora_adapters

    pretrained = os.path.join(args.output_dir, "pretrained.keras")
    if not os.path.isfile(pretrained):
        raise FileNotFoundError(
            f"{pretrained} is missing: run the main job to its end first."
        )
    for arm in arms:
        _arm_files(args, arm)
    targets = sorted({t for arm in arms for t in ARMS[arm]["targets"]})
    # The conversion's own adapter stays zero and is not served: rank 1,
    # since a mixed batch computes with every adapter's columns.
    served = keras_rnn_lora.enable_lora(
        keras.saving.load_model(pretrained, compile=False),
        rank=1,
        lora_targets=targets,
        adapter_name="unserved",
    )
    hosts = lora_adapters(served)
    for arm in arms:
        replay = build_arm(args, arm, pretrained)
        replay_hosts = lora_adapters(replay)
        if set(replay_hosts) != set(hosts):
            raise ValueError(
                f"Arm {arm!r} adapts the layers {sorted(replay_hosts)}, the "
                f"served model {sorted(hosts)}: they cannot share one export."
            )
        merges = "base_dtype" not in ARMS[arm]
        directory = _arm_dir(args, arm)
        learned = []
        for chunk in range(1, args.increments + 1):
            if chunk > 1:  # the base chunk k learned on
                replay.load_weights(state_path(directory, chunk - 1))
            adapter_file = adapter_path(directory, chunk)
            keras_rnn_lora.load_lora_weights(replay, adapter_file)
            values = {
                layer: host.adapter_values(host.active_adapter)
                for layer, host in replay_hosts.items()
            }
            if not merges:
                state = state_path(directory, chunk)
                replay.load_weights(state)
                for layer, host in replay_hosts.items():
                    saved = host.adapter_values(host.active_adapter)
                    if any(
                        not np.array_equal(saved[f], values[layer][f])
                        for f in saved
                    ):
                        raise ValueError(
                            f"{adapter_file} and {state} disagree on the "
                            f"adapter arm {arm!r} held after chunk {chunk} "
                            f"(layer {layer!r}): the arm's files are mixed "
                            f"up. Delete {directory} to train the arm again."
                        )
            name = f"{arm}_chunk_{chunk}" if merges else served_name(arm, chunk)
            for layer, host in replay_hosts.items():
                hosts[layer].add_banked_adapter(
                    name, host.lora_config, values[layer]
                )
            learned.append(name)
        if merges:
            for chunk in range(1, args.increments + 1):
                keras_rnn_lora.add_stacked_adapter(
                    served, served_name(arm, chunk), learned[:chunk]
                )
            for name in learned:
                keras_rnn_lora.delete_adapter(served, name)
    return served


def export(args, arms, default_arm):
    """Exports the pre-trained translator and every arm of `arms` after
    every chunk (seed 0; see module) as one SavedModel for TensorFlow
    Serving, `default_arm` after the last chunk answering requests that
    name no adapter. A run started again exports only if the pre-trained
    model, an arm's adapters or saved states, the tokenizers, the arms or
    `--export-dir` changed, or the SavedModel it wrote lacks its graph or
    its variables' index, and otherwise names the version it wrote."""
    from keras_rnn_lora.translation.export import export_translator
    from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor

    preprocessor_dir = os.path.join(args.output_dir, "preprocessor")
    adapters = [
        served_name(arm, chunk)
        for arm in arms
        for chunk in range(1, args.increments + 1)
    ]
    default = served_name(default_arm, args.increments)
    digest = hashlib.sha256(f"{adapters}{default}".encode())
    # Where the export goes is part of what is reused: a new --export-dir
    # gets its own export. (Hashed: the record holds no absolute path.)
    digest.update(os.path.realpath(args.export_dir).encode() + b"\0")
    inputs = [
        os.path.join(preprocessor_dir, name)
        for name in sorted(os.listdir(preprocessor_dir))
    ]
    inputs.append(os.path.join(args.output_dir, "pretrained.keras"))
    for arm in arms:
        inputs += _arm_files(args, arm)
    for name in inputs:
        with open(name, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    record_path = os.path.join(args.output_dir, "export.json")
    record = read_json(record_path)
    if record and record["fingerprint"] == digest.hexdigest():
        existing = in_output(args, record["path"])
        written = ("saved_model.pb", "variables/variables.index")
        if all(os.path.isfile(os.path.join(existing, f)) for f in written):
            print(f"Reusing the export {existing} (nothing changed)")
            return
    model = increments_model(args, arms)
    preprocessor = TranslationPreprocessor.load(preprocessor_dir)
    target = export_translator(
        model,
        preprocessor,
        args.export_dir,
        adapters=["base", *adapters],
        default_adapter=default,
    )
    print(
        f"Exported the pre-trained model and {', '.join(adapters)} to "
        f"{target} (requests that name no adapter: {default})",
        flush=True,
    )
    write_json(
        record_path,
        {
            "fingerprint": digest.hexdigest(),
            "path": from_output(args, target),
            "arm": default_arm,
            "adapters": ["base", *adapters],
            "default_adapter": default,
        },
    )
