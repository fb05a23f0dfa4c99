"""The units of work of the main job, each run in a fresh process
(`processes.run_in_child`): pre-training, the learning-rate choice, an
arm's incremental phase (the export: increments.py). Every job writes its
result as JSON under `--output-dir` and finds it there when the run is
started again, so a killed run resumes where it stopped.
"""

import contextlib
import math
import os
import shutil
import sys

from iwslt.arms import build_arm
from iwslt.arms import compile_arm
from iwslt.arms import fit_chunk
from iwslt.arms import read_json
from iwslt.arms import save_weights
from iwslt.arms import write_json
from iwslt.data import Split
from iwslt.data import batches
from iwslt.data import preprocessor as make_preprocessor
from iwslt.evaluate import final_scores
from iwslt.evaluate import forgetting_row
from iwslt.increments import adapter_path
from iwslt.paths import REPOSITORY
from iwslt.settings import GRID_FACTOR
from iwslt.settings import arm_spec
from iwslt.settings import grid


def path(args, *parts):
    return os.path.join(args.output_dir, *parts)


def setup(args, seed):
    """Seeds everything, then loads the data and the tokenizers."""
    import keras

    keras.utils.set_random_seed(seed)
    split = Split(args)
    return split, make_preprocessor(args, split)


# -- the record of what ran ----------------------------------------------------


def environment(args):
    """environment.json: what this invocation of the main job runs under
    (the code's commit and whether files differed from it, the backend,
    package versions, the device as the backend sees it, the
    speed-relevant environment variables, sacrebleu's signatures), as a
    list in order of every distinct one a resumed run has had: the first
    started the run, a later one finished part of it."""
    import keras

    from keras_rnn_lora import measurement
    from keras_rnn_lora.translation.evaluation import score_signatures

    backend = keras.backend.backend()
    current = {
        **measurement.git_state(REPOSITORY),
        "backend": backend,
        "versions": measurement.versions(backend),
        "device": measurement.device(backend),
        "environment": measurement.speed_environment(),
        "sacrebleu": score_signatures(),
    }
    target = path(args, "environment.json")
    known = read_json(target, [])
    if current not in known:
        write_json(target, [*known, current])


# -- pre-training -------------------------------------------------------------


def pretrain(args):
    """Trains the translator on the initial part until its validation
    perplexity stops improving (`--patience`), keeps its best epoch, and
    measures it like every arm."""
    from keras_rnn_lora.translation.model import build_translator

    split, preprocessor = setup(args, args.seed)
    model = build_translator(
        preprocessor.source_vocabulary_size,
        preprocessor.target_vocabulary_size,
        embedding_dim=args.embedding_dim,
        units=args.units,
        dropout=args.dropout,
    )
    compile_arm(args, model, args.pretrain_learning_rate)
    print(f"\n== Pre-training on {len(split.initial):,} pairs", flush=True)
    record = fit_chunk(
        args,
        model,
        batches(args, preprocessor, split.initial, True, args.seed),
        batches(args, preprocessor, split.validation, False),
        args.pretrain_epochs,
        path(args, "pretrain"),
        patience=args.patience,
    )
    if finite_or_inf(record["best_val_perplexity"]) == math.inf:
        raise RuntimeError(
            "pre-training never reached a finite validation perplexity at "
            f"--pretrain-learning-rate {args.pretrain_learning_rate:g}: it "
            "diverged. Start again with a lower rate, in a new --output-dir "
            f"(or delete {args.output_dir})."
        )
    record["forgetting_row"] = forgetting_row(args, model, preprocessor, split)
    record.update(final_scores(args, model, preprocessor, split))
    _save_model(model, path(args, "pretrained.keras"))
    write_json(path(args, "pretrain.json"), record)


def _save_model(model, target):
    from keras_rnn_lora import files

    files.save_model(model, target)


# -- choosing learning rates --------------------------------------------------


def _trial_dir(args, method, rate):
    return path(args, "learning_rates", method, f"{rate:.3g}")


def select_learning_rate(args, method):
    """Tries the method's grid on the first chunk (seed 0) and keeps the
    rate with the best validation perplexity; extends the grid past an edge
    that wins, `--grid-extensions` times at most (see
    `settings.LEARNING_RATE_GRIDS`, `settings.grid`)."""
    choice_path = path(args, "learning_rates", method, "choice.json")
    if os.path.exists(choice_path):
        return
    tried = {}
    rates = list(grid(args, method))
    extensions = 0
    while True:
        for rate in rates:
            if rate not in tried:
                tried[rate] = chunk_fit(args, method, 0, 1, rate)["best"]
        best = min(tried, key=lambda r: finite_or_inf(tried[r]))
        if finite_or_inf(tried[best]) == math.inf:
            raise RuntimeError(
                f"[{method}] no learning rate of {sorted(tried)} reached a "
                "finite validation perplexity on the first chunk: every fit "
                "diverged. Try lower rates (settings.LEARNING_RATE_GRIDS)."
            )
        lowest, highest = min(tried), max(tried)
        if extensions >= args.grid_extensions or best not in (lowest, highest):
            break
        extensions += 1
        rates.append(
            best / GRID_FACTOR if best == lowest else best * GRID_FACTOR
        )
    write_json(
        choice_path,
        {
            "chosen": best,
            "validation_perplexity": {f"{r:.3g}": v for r, v in tried.items()},
            "grid": list(grid(args, method)),
            "extensions": extensions,
        },
    )
    # Only once the choice is saved: a restart before it reads every trial.
    for rate in tried:  # the chosen trial is seed 0's first chunk: kept
        if rate != best:
            _drop_weights(_trial_dir(args, method, rate))
    print(
        f"[{method}] learning rate {best:.3g} chosen from "
        + ", ".join(
            f"{r:.3g}: {finite_or_inf(v):.2f}" for r, v in sorted(tried.items())
        ),
        flush=True,
    )


def chosen_rate(args, arm):
    method = arm_spec(arm)["method"]
    return read_json(path(args, "learning_rates", method, "choice.json"))[
        "chosen"
    ]


def chunk_fit(args, arm, seed_index, chunk, rate, start_weights=None):
    """One arm learning one chunk from `start_weights` (default: the
    pre-trained model); resumable. Seed 0's first chunk is the learning-rate
    trial of the chosen rate itself. Returns the fit's record and the
    model, ending on its best epoch."""
    if seed_index == 0 and chunk == 1 and arm_spec(arm)["method"] == arm:
        directory = _trial_dir(args, arm, rate)
    else:
        directory = path(args, "seeds", str(seed_index), arm, f"chunk_{chunk}")
    split, preprocessor = setup(args, args.seed + 1000 * seed_index + chunk)
    model = build_arm(args, arm, path(args, "pretrained.keras"))
    if start_weights:
        model.load_weights(start_weights)
    record = read_json(os.path.join(directory, "fit.json"))
    best_weights = os.path.join(directory, "best.weights.h5")
    if record is not None and os.path.exists(best_weights):  # its best epoch
        model.load_weights(best_weights)
    compile_arm(args, model, rate, arm)
    record_path = os.path.join(directory, "fit.json")
    if record is None:
        kind = "initial" if arm_spec(arm).get("data") == "initial" else "new"
        print(
            f"\n== {arm}, seed {seed_index}, chunk {chunk}: learning "
            f"{len(split.chunks[chunk - 1]):,} {kind} pairs at rate "
            f"{rate:.3g}",
            flush=True,
        )
        record = fit_chunk(
            args,
            model,
            batches(
                args,
                preprocessor,
                training_pairs(args, split, arm, chunk),
                True,
                args.seed + 1000 * seed_index + chunk,
            ),
            batches(args, preprocessor, split.validation, False),
            args.update_epochs,
            directory,
            args.update_patience,
        )
        record["best"] = record["best_val_perplexity"]
        write_json(record_path, record)
    return {
        **record,
        "model": model,
        "split": split,
        "preprocessor": preprocessor,
        "directory": directory,
    }


def training_pairs(args, split, arm, chunk):
    """What `arm` learns as chunk `chunk`: the chunk's new pairs, or for an
    arm on the initial data (the control) as many pairs of the initial
    part, drawn in a seeded order without repeating one while any is left
    (chunk after chunk), so it trains as much as the others do on data
    the base has already seen."""
    size = len(split.chunks[chunk - 1])
    if arm_spec(arm).get("data") != "initial":
        return split.chunks[chunk - 1]
    import random

    order = list(range(len(split.initial)))
    random.Random(args.seed).shuffle(order)
    start = sum(len(c) for c in split.chunks[: chunk - 1])
    return [
        split.initial[order[i % len(order)]] for i in range(start, start + size)
    ]


def finite_or_inf(value):
    """`value`, or infinity for a fit that never had a finite validation
    perplexity (`None`, NaN): it ranks last."""
    return value if value is not None and math.isfinite(value) else math.inf


def _drop_weights(directory):
    """Frees the disk a finished fit's checkpoints hold (its record stays)."""
    shutil.rmtree(os.path.join(directory, "backup"), ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(directory, "best.weights.h5"))


# -- the incremental phase ----------------------------------------------------

# In a fit's result, not its record.
_LIVE = ("model", "split", "preprocessor", "directory")


def run_arm(args, arm, seed_index):
    """One arm, one seed: every chunk in turn (LoRA arms merge their adapter
    into the base after each, `merge_lora(reset=True)`, and start a fresh
    one; an arm with a half-precision base, which cannot hold a merge, keeps
    its adapter learning), the forgetting matrix row after each, the final
    scores."""
    import keras_rnn_lora

    directory = path(args, "seeds", str(seed_index), arm)
    result_path = os.path.join(directory, "result.json")
    if os.path.exists(result_path):
        return
    if arm == "frozen":
        return _frozen(args, directory, result_path)
    rate = chosen_rate(args, arm)
    chunks, start, fit = [], None, None
    for chunk in range(1, args.increments + 1):
        done_path = os.path.join(directory, f"chunk_{chunk}.json")
        after = os.path.join(directory, f"after_chunk_{chunk}.weights.h5")
        if os.path.exists(done_path):
            chunks.append(read_json(done_path))
            start = after
            continue
        fit = chunk_fit(args, arm, seed_index, chunk, rate, start)
        if finite_or_inf(fit["best"]) == math.inf:
            return _diverged(args, arm, seed_index, rate, chunks, fit)
        model = fit["model"]
        row = forgetting_row(args, model, fit["preprocessor"], fit["split"])
        if "targets" in arm_spec(arm):  # the increment's adapter, served later
            keras_rnn_lora.save_lora_weights(
                model, adapter_path(directory, chunk)
            )
            if "base_dtype" not in arm_spec(arm):
                keras_rnn_lora.merge_lora(model, reset=True)
        save_weights(model, after)
        record = {k: fit[k] for k in fit if k not in _LIVE}
        record["forgetting_row"] = row
        write_json(done_path, record)
        _drop_weights(fit["directory"])  # the state after the chunk is kept
        chunks.append(record)
        start = after
    if fit is None:  # every chunk was done before a restart: reload
        split, preprocessor = setup(args, args.seed + 1000 * seed_index)
        model = build_arm(args, arm, path(args, "pretrained.keras"))
        model.load_weights(start)  # before compiling: no optimizer state
        compile_arm(args, model, rate, arm)
    else:
        split, preprocessor = fit["split"], fit["preprocessor"]
    scores = final_scores(args, model, preprocessor, split)
    lora_arm = "targets" in arm_spec(arm)
    if seed_index == 0:  # the model the export serves (merged once, here)
        # A half-precision base is served in float32: the merge needs it.
        dtype = "float32" if "base_dtype" in arm_spec(arm) else None
        base = (
            keras_rnn_lora.to_base_model(model, dtype=dtype)
            if lora_arm
            else model
        )
        _save_model(base, os.path.join(directory, "final.keras"))
    trainable = _trainable(arm, model)
    write_json(
        result_path,
        {
            "arm": arm,
            "seed": seed_index,
            "learning_rate": rate,
            "trainable_params": trainable,
            "total_params": keras_rnn_lora.count_parameters(model.weights),
            "chunks": chunks,
            **scores,
        },
    )


def _trainable(arm, model):
    """What learns a chunk: the adapter, or every trainable weight."""
    import keras_rnn_lora

    if "targets" in arm_spec(arm):
        return keras_rnn_lora.lora_summary(model, print_fn=None)["lora"]
    return keras_rnn_lora.count_parameters(model.trainable_weights)


def _diverged(args, arm, seed_index, rate, chunks, fit):
    """A chunk whose fit never had a finite validation perplexity ends its
    arm's seed there: the seed's result records the fit, and every figure
    from that chunk on as not finite (NaN), so the report counts the seed
    as diverged and the run goes on with the other arms and seeds."""
    import keras_rnn_lora

    chunk = len(chunks) + 1
    print(
        f"{arm}, seed {seed_index}, chunk {chunk}: no epoch reached a finite "
        f"validation perplexity at rate {rate:.3g}; the seed is recorded as "
        f"diverged (the fit's record: {fit['directory']}/fit.json)",
        flush=True,
    )
    nan = float("nan")
    parts = read_json(path(args, "pretrain.json"))["forgetting_row"]
    row = dict.fromkeys(parts, nan)
    record = {k: fit[k] for k in fit if k not in _LIVE}
    later = [{"forgetting_row": row} for _ in range(chunk, args.increments)]
    model = fit["model"]
    write_json(
        path(args, "seeds", str(seed_index), arm, "result.json"),
        {
            "arm": arm,
            "seed": seed_index,
            "learning_rate": rate,
            "trainable_params": _trainable(arm, model),
            "total_params": keras_rnn_lora.count_parameters(model.weights),
            "diverged_at_chunk": chunk,
            "chunks": [*chunks, {**record, "forgetting_row": row}, *later],
            **dict.fromkeys(("test_perplexity", "test_bleu", "test_chrf"), nan),
            "heldout_initial_bleu": nan,
            "sentences": {},
        },
    )


def _frozen(args, directory, result_path):
    """The frozen arm learns nothing: every row is the pre-trained model's."""
    pretrained = read_json(path(args, "pretrain.json"))
    write_json(
        result_path,
        {
            "arm": "frozen",
            "learning_rate": None,
            "trainable_params": 0,
            "chunks": [
                {"forgetting_row": pretrained["forgetting_row"]}
                for _ in range(args.increments)
            ],
            **{
                key: pretrained[key]
                for key in (
                    "test_perplexity",
                    "test_bleu",
                    "test_chrf",
                    "heldout_initial_bleu",
                    "sentences",
                )
            },
        },
    )


def clean(args):
    """Removes the checkpoints of finished fits (the results stay)."""
    for root, dirs, _ in os.walk(args.output_dir):
        if "backup" in dirs:
            shutil.rmtree(os.path.join(root, "backup"), ignore_errors=True)


if __name__ == "__main__":
    sys.exit("Run examples/iwslt_translate.py.")
