"""The paper's experiment: pre-train an RNN translator, then learn new data
with LoRA on the hidden-state weights alone, against full fine-tuning.

IWSLT 2017 English-German. The training split is cut in file order into an
initial part and a new part (`--pretrain-fraction`). A GRU encoder-decoder
is pre-trained on the initial part; then each arm starts from the same
pre-trained weights and learns the new part with the same batches, epochs
and seed:

- `full`: full fine-tuning of every weight;
- `lora`: LoRA (rank `--rank`) on the recurrent kernels of encoder and
  decoder, everything else frozen (the paper's method);
- `lora_kernel`: LoRA on input and recurrent kernels;
- `lora_bf16`: `lora` with the frozen base stored and computed in bfloat16
  (the LoRA factors and their branch stay float32);
- `frozen`: no update, the reference for what was gained.

Each arm runs in its own subprocess, so its peak memory (RSS above the
process' idle baseline) is its own. Reported per arm: trainable parameters,
wall time per epoch, peak memory, validation and test perplexity (padding
excluded), test BLEU and chrF (sacrebleu), and perplexity on held-out pairs
of the initial part (forgetting). Output in `--output-dir`: `results.md`
(also printed last), `results.json` and `curves.png`. The best LoRA model,
merged, is exported for TensorFlow Serving when `keras_rnn_lora.export` is
available.

Runs are resumable: the pre-trained model is saved, every fit uses
`keras.callbacks.BackupAndRestore`, and finished arms are not run again.
Start an interrupted run again with the same arguments.

Time on a 2-core laptop CPU: `--smoke` about a minute; the defaults (20,000
pairs, GRU 256) about half an hour. `--preset paper` is sized for a GPU.

    python examples/iwslt_translate.py [--smoke] [--arms full,lora,frozen]
"""

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time

# -- Setup ---------------------------------------------------------------------

ARMS = ("full", "lora", "lora_kernel", "lora_bf16", "frozen")
DEFAULT_ARMS = "full,lora,frozen"
PRETRAIN_FRACTION = 0.5  # the paper: an initial half, then newly arrived data
SEED = 1234
# Settings every run has; a preset and --smoke change some of them, and an
# argument given on the command line always wins over both.
DEFAULTS = {
    "max_pairs": None,  # training pairs to read (None: all the files hold)
    "eval_pairs": None,  # cap on test pairs (None: the whole test set)
    "heldout_pairs": 500,  # initial pairs kept out to measure forgetting
    # Per language, SentencePiece unigram; 8,000 left most pieces rare in a
    # 10,000-pair initial part and learned slower on a CPU budget.
    "vocab_size": 4000,
    "max_length": 50,  # tokens per side; longer sentences are truncated
    "batch_size": 64,
}
PRESETS = {
    # Fits a 2-core CPU in about half an hour for the whole protocol.
    "cpu": {
        "embedding_dim": 128,
        "units": 256,
        "rank": 8,
        "pretrain_epochs": 6,
        "update_epochs": 3,
        "learning_rate": 5e-3,
    },
    # The paper's scale (hidden 2048): for a GPU.
    "paper": {
        "embedding_dim": 512,
        "units": 2048,
        "rank": 8,
        "pretrain_epochs": 10,
        "update_epochs": 5,
        "learning_rate": 1e-3,
    },
}
SMOKE = {
    "max_pairs": 400,
    "vocab_size": 500,
    "embedding_dim": 16,
    "units": 32,
    "rank": 2,
    "pretrain_epochs": 2,
    "update_epochs": 2,
    "heldout_pairs": 20,
    "eval_pairs": 40,
    "batch_size": 32,
}
SETTING_TYPES = {
    "max_pairs": int,
    "eval_pairs": int,
    "heldout_pairs": int,
    "vocab_size": int,
    "max_length": int,
    "batch_size": int,
    "embedding_dim": int,
    "units": int,
    "rank": int,
    "pretrain_epochs": int,
    "update_epochs": int,
    "learning_rate": float,
}
# The paper's reported reductions of LoRA against full fine-tuning.
PAPER = {
    "time_reduction": 0.837,
    "memory_reduction": 0.335,
    "trainable_reduction": 0.999,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--data-dir", default=os.environ.get("IWSLT2017_DIR"))
    add("--output-dir", default="runs/iwslt_translate")
    add("--export-dir", default="saved_models")
    add("--pretrain-fraction", type=float, default=PRETRAIN_FRACTION)
    add("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of {ARMS}")
    add("--preset", choices=sorted(PRESETS), default="cpu")
    add("--smoke", action="store_true", help="a few hundred pairs, tiny model")
    add("--seed", type=int, default=SEED)
    for key, kind in SETTING_TYPES.items():
        add(
            f"--{key.replace('_', '-')}",
            type=kind,
            default=None,
            help=f"default: the preset's ({DEFAULTS.get(key)} or per preset)",
        )
    add("--run-arm", help=argparse.SUPPRESS)  # internal: one arm, in a child
    args = parser.parse_args(argv)
    settings = {**DEFAULTS, **PRESETS[args.preset]}
    if args.smoke:
        settings.update(SMOKE)
    for key, value in settings.items():
        if getattr(args, key) is None:  # given on the command line: wins
            setattr(args, key, value)
    return parser, args


def check_args(parser, args):
    """Every argument checked before any work: one clear line each, never
    a traceback."""
    if not 0.0 < args.pretrain_fraction < 1.0:
        parser.error(
            "--pretrain-fraction must lie strictly between 0 and 1, got "
            f"{args.pretrain_fraction}"
        )
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        parser.error(
            f"--arms: unknown arm {unknown or arms}; choose from {ARMS}"
        )
    args.arm_list = arms
    # No --data-dir and no IWSLT2017_DIR: the TFDS builder downloads.
    if args.data_dir and not os.path.exists(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} does not exist")
    minimum = {
        "units": 1,
        "embedding_dim": 1,
        "batch_size": 1,
        "pretrain_epochs": 1,
        "update_epochs": 1,
        "max_length": 2,  # [START] or [END] plus one token
        "vocab_size": 8,  # the four special pieces and a few more
        "heldout_pairs": 0,
        "max_pairs": 1,
        "eval_pairs": 1,
    }
    for name, low in minimum.items():
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(
                f"--{name.replace('_', '-')} must be at least {low}, got "
                f"{value}"
            )
    if not 1 <= args.rank <= args.units:
        parser.error(
            f"--rank must lie in [1, --units={args.units}], got {args.rank}"
        )
    rate = args.learning_rate
    if not (math.isfinite(rate) and rate > 0):
        parser.error(f"--learning-rate must be finite and > 0, got {rate}")


def run_key(args):
    """A fingerprint of everything that changes results: the settings and
    the content of the data files, so a resumed run only reuses work made
    from the same settings and the same data."""
    keys = sorted(k for k in vars(args) if k not in ("run_arm", "arm_list"))
    keys = [k for k in keys if k not in ("output_dir", "export_dir", "arms")]
    keys = [k for k in keys if k != "data_dir"]
    settings = {k: getattr(args, k) for k in keys}
    settings["data"] = data_fingerprint(args)
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def data_fingerprint(args):
    """SHA-256 of the release files' content (or "download" when the TFDS
    builder fetches the data)."""
    from keras_rnn_lora.data import iwslt2017

    if not args.data_dir:
        return "download"
    return iwslt2017.content_fingerprint(iwslt2017.find_release(args.data_dir))


def write_json(path, data):
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        json.dump(data, file, indent=2)
    os.replace(temporary, path)


def rss_bytes():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process' resident memory every 20 ms in a thread."""

    def __enter__(self):
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    def peak_mb(self):
        """The peak so far above the baseline, in MB."""
        return (max(self.peak, rss_bytes()) - self.baseline) / 2**20


# -- Data ----------------------------------------------------------------------


def read_split(args, split, max_pairs=None):
    """`(en, de)` pairs in file order: straight from the release folder when
    there is one, else through the TFDS builder's download."""
    from keras_rnn_lora.data import iwslt2017

    if args.data_dir:
        return iwslt2017.read_pairs(split, args.data_dir, max_pairs)
    dataset = iwslt2017.load_iwslt2017(split, max_pairs=max_pairs)
    return [
        (pair["en"].decode(), pair["de"].decode())
        for pair in dataset.as_numpy_iterator()
    ]


def load_data(args):
    from keras_rnn_lora import text

    train = read_split(args, "train", args.max_pairs)
    cut = int(len(train) * args.pretrain_fraction)
    initial, new = train[:cut], train[cut:]
    heldout = initial[len(initial) - args.heldout_pairs :]
    initial = initial[: len(initial) - args.heldout_pairs]
    validation = read_split(args, "validation")
    test = read_split(args, "test", args.eval_pairs)
    if args.smoke:
        validation = validation[: args.eval_pairs]
    # The tokenizers learn from the initial part only: the new data has not
    # arrived when the base model is trained.
    tokenizer_dir = os.path.join(args.output_dir, "tokenizers")
    tokenizers = text.get_tokenizers(initial, tokenizer_dir, args.vocab_size)
    return {
        "initial": initial,
        "new": new,
        "heldout": heldout,
        "validation": validation,
        "test": test,
        "tokenizers": tokenizers,
    }


def batches(args, pairs, tokenizers, shuffle):
    from keras_rnn_lora import text

    return text.make_translation_dataset(
        pairs,
        *tokenizers,
        batch_size=args.batch_size,
        max_length=args.max_length,
        shuffle=shuffle,
        seed=args.seed,
    )


# -- Model ---------------------------------------------------------------------


def build_arm(args, arm, pretrained_path):
    import keras

    import keras_rnn_lora
    from keras_rnn_lora import seq2seq

    model = keras.saving.load_model(pretrained_path, compile=False)
    if arm.startswith("lora"):
        targets = ("kernel", "recurrent") if arm == "lora_kernel" else None
        model = keras_rnn_lora.enable_lora(
            model,
            rank=args.rank,
            lora_targets=targets or ("recurrent",),
            base_dtype="bfloat16" if arm == "lora_bf16" else None,
        )
        keras_rnn_lora.mark_only_lora_as_trainable(model)
    if arm == "frozen":
        model.trainable = False  # no update: nothing trains
    return seq2seq.compile_translator(model, args.learning_rate)


# -- Train ---------------------------------------------------------------------


class EpochLog:
    """Wall time and validation perplexity of each epoch, and the peak
    resident memory, persisted at every epoch end beside the checkpoint.

    A run killed mid-phase and resumed (`BackupAndRestore` restarts after
    the last finished epoch) thus reports every epoch's time as measured,
    not only the resumed ones. An epoch whose time was lost (killed after
    its checkpoint but before this log was written) stays `None`: reported
    as not measured, never guessed.
    """

    def __init__(self, path, memory=None):
        import keras

        self.path = path
        self.memory = memory
        saved = {}
        if os.path.exists(path):
            with open(path) as file:
                saved = json.load(file)
        self.seconds = {int(k): v for k, v in saved.get("seconds", {}).items()}
        self.val = {int(k): v for k, v in saved.get("val", {}).items()}
        self.peak_mb = saved.get("peak_mb", 0.0)
        self.processes = saved.get("processes", 0) + 1
        log = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                log._start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                log.seconds[epoch] = time.perf_counter() - log._start
                log.val[epoch] = (logs or {}).get("val_perplexity")
                log.save()

        self.callback = Callback()

    def save(self):
        if self.memory is not None:
            self.peak_mb = max(self.peak_mb, self.memory.peak_mb())
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        write_json(
            self.path,
            {
                "seconds": self.seconds,
                "val": self.val,
                "peak_mb": self.peak_mb,
                "processes": self.processes,
            },
        )

    def series(self, epochs, values):
        return [values.get(i) for i in range(epochs)]


def fit(args, model, data, epochs, backup_dir, log):
    import keras

    return model.fit(
        batches(args, data["train"], data["tokenizers"], shuffle=True),
        validation_data=batches(
            args, data["validation"], data["tokenizers"], shuffle=False
        ),
        epochs=epochs,
        callbacks=[
            keras.callbacks.BackupAndRestore(
                backup_dir, delete_checkpoint=False
            ),
            log.callback,
        ],
        verbose=2,
    )


def pretrain(args, data):
    from keras_rnn_lora import seq2seq

    path = os.path.join(args.output_dir, "pretrained.keras")
    if os.path.exists(path):
        print(f"Reusing the pre-trained model {path}")
        return path
    src, tgt = data["tokenizers"]
    model = seq2seq.build_translator(
        int(src.vocabulary_size()),
        int(tgt.vocabulary_size()),
        embedding_dim=args.embedding_dim,
        units=args.units,
    )
    seq2seq.compile_translator(model, args.learning_rate)
    print(f"\n== Pre-training on {len(data['initial']):,} pairs")
    fit(
        args,
        model,
        {**data, "train": data["initial"]},
        args.pretrain_epochs,
        os.path.join(args.output_dir, "backup", "pretrain"),
        EpochLog(os.path.join(args.output_dir, "progress", "pretrain.json")),
    )
    temporary = path.replace(".keras", ".tmp.keras")
    model.save(temporary)
    os.replace(temporary, path)
    return path


def run_arm(args, arm):
    """One arm, in this (child) process: train, evaluate, write its JSON."""
    import keras

    import keras_rnn_lora

    data = load_data(args)
    pretrained = os.path.join(args.output_dir, "pretrained.keras")
    model = build_arm(args, arm, pretrained)
    summary = keras_rnn_lora.lora_summary(model, print_fn=None)
    epochs = args.update_epochs if arm != "frozen" else 0
    with PeakRSS() as memory:
        log = EpochLog(
            os.path.join(args.output_dir, "progress", f"{arm}.json"), memory
        )
        if epochs:
            print(f"\n== Arm {arm}: learning {len(data['new']):,} new pairs")
            fit(
                args,
                model,
                {**data, "train": data["new"]},
                epochs,
                os.path.join(args.output_dir, "backup", arm),
                log,
            )
        log.save()
    seconds = log.series(epochs, log.seconds)
    measured = all(s is not None for s in seconds)
    result = {
        "arm": arm,
        "backend": keras.backend.backend(),
        "trainable_params": summary["trainable"],
        "total_params": summary["total"],
        "epoch_seconds": seconds,
        # None when an epoch's time was lost to a kill: not measured.
        "train_seconds": sum(seconds) if measured else None,
        "val_perplexity_curve": log.series(epochs, log.val),
        # The highest peak of every process that trained this arm.
        "peak_rss_mb": log.peak_mb,
        "resumed": log.processes > 1,
        "device_peak_mb": device_peak_mb(),
    }
    result.update(evaluate(args, model, data))
    if arm.startswith("lora"):
        keras_rnn_lora.merge_lora(model)
        model.save(os.path.join(args.output_dir, f"{arm}_merged.keras"))
    write_json(os.path.join(args.output_dir, "arms", f"{arm}.json"), result)
    print(one_line(result))


def device_peak_mb():
    """This process' peak accelerator memory in MB, where the backend
    reports it; None on a CPU."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            if not tf.config.list_physical_devices("GPU"):
                return None
            peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
        elif backend == "torch":
            import torch

            if not torch.cuda.is_available():
                return None
            peak = torch.cuda.max_memory_allocated()
        else:
            import jax

            device = jax.devices()[0]
            if device.platform == "cpu":
                return None
            peak = device.memory_stats().get("peak_bytes_in_use", 0)
    except (RuntimeError, ValueError, AttributeError):
        return None
    return peak / 2**20


# -- Evaluate ------------------------------------------------------------------


def perplexity(args, model, pairs, tokenizers):
    results = model.evaluate(
        batches(args, pairs, tokenizers, shuffle=False),
        verbose=0,
        return_dict=True,
    )
    return float(results["perplexity"])


def evaluate(args, model, data):
    from keras_rnn_lora import seq2seq

    tokenizers = data["tokenizers"]
    hypotheses = []
    test = data["test"]
    decoder = seq2seq.compiled_decoder(model, max_length=args.max_length)
    for start in range(0, len(test), 64):
        chunk = [p[0] for p in test[start : start + 64]]
        hypotheses += seq2seq.translate(
            model,
            chunk,
            *tokenizers,
            max_length=args.max_length,
            decoder=decoder,
        )
    scores = seq2seq.corpus_scores(hypotheses, [p[1] for p in test])
    return {
        "val_perplexity": perplexity(
            args, model, data["validation"], tokenizers
        ),
        "test_perplexity": perplexity(args, model, test, tokenizers),
        "heldout_initial_perplexity": perplexity(
            args, model, data["heldout"], tokenizers
        ),
        "test_bleu": scores["bleu"],
        "test_chrf": scores["chrf"],
        "example": {
            "source": test[0][0],
            "reference": test[0][1],
            "translation": hypotheses[0],
        },
    }


def number(value, spec, missing="not measured"):
    """`value` formatted with `spec`, or `missing` for a value the run did
    not measure (None)."""
    return missing if value is None else format(value, spec)


def one_line(r):
    return (
        f"[{r['arm']}] trainable {r['trainable_params']:,} | "
        f"train {number(r['train_seconds'], '.1f')}s | peak RSS "
        f"+{r['peak_rss_mb']:.0f} MB{' (resumed)' if r['resumed'] else ''}"
        f" | val ppl {r['val_perplexity']:.2f} | test ppl "
        f"{r['test_perplexity']:.2f} | BLEU {r['test_bleu']:.2f} | chrF "
        f"{r['test_chrf']:.2f} | held-out initial ppl "
        f"{r['heldout_initial_perplexity']:.2f}"
    )


# -- Report --------------------------------------------------------------------


def reductions(results):
    full, lora = results.get("full"), results.get("lora")
    if not full or not lora:
        return None

    def reduction(key):
        if lora[key] is None or not full[key]:
            return None  # a figure the run did not measure
        return 1 - lora[key] / full[key]

    return {
        "time_reduction": reduction("train_seconds"),
        "memory_reduction": reduction("peak_rss_mb"),
        "trainable_reduction": reduction("trainable_params"),
        "test_perplexity_change": lora["test_perplexity"]
        / full["test_perplexity"]
        - 1,
    }


def markdown(args, results, summary):
    rows = [
        "| arm | trainable params | s/epoch | train s | peak RSS MB | val ppl "
        "| test ppl | BLEU | chrF | held-out initial ppl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, r in results.items():
        per_epoch = (
            number(
                r["train_seconds"]
                and r["train_seconds"] / len(r["epoch_seconds"]),
                ".1f",
            )
            if r["epoch_seconds"]
            else "-"
        )
        rows.append(
            f"| {arm}{' (resumed)' if r['resumed'] else ''} | "
            f"{r['trainable_params']:,} | {per_epoch} | "
            f"{number(r['train_seconds'], '.1f')} | {r['peak_rss_mb']:.0f} | "
            f"{r['val_perplexity']:.2f} | {r['test_perplexity']:.2f} | "
            f"{r['test_bleu']:.2f} | {r['test_chrf']:.2f} | "
            f"{r['heldout_initial_perplexity']:.2f} |"
        )
    backend = next(iter(results.values()))["backend"]
    lines = [
        f"# IWSLT 2017 en-de: LoRA vs full fine-tuning ({backend} backend)",
        "",
        f"Pre-trained on {summary['initial_pairs']:,} pairs, then each arm "
        f"learns {summary['new_pairs']:,} new pairs for {args.update_epochs} "
        f"epoch(s); GRU {args.units}, embedding {args.embedding_dim}, "
        f"vocabulary {args.vocab_size}, LoRA rank {args.rank}. Perplexity "
        "excludes padding; peak RSS is above each arm's idle process.",
        "",
        *rows,
    ]
    red = summary.get("reductions")
    if red:
        lines += [
            "",
            "| LoRA vs full fine-tuning | paper | ours |",
            "|---|---:|---:|",
            f"| training time reduction | {PAPER['time_reduction']:.1%} | "
            f"{number(red['time_reduction'], '.1%')} |",
            f"| peak memory reduction | {PAPER['memory_reduction']:.1%} | "
            f"{number(red['memory_reduction'], '.1%')} |",
            f"| trainable parameter reduction | >99.9% | "
            f"{red['trainable_reduction']:.2%} |",
            f"| test perplexity change | equal or better | "
            f"{red['test_perplexity_change']:+.1%} |",
        ]
    return "\n".join(lines) + "\n"


def plot(path, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, r in results.items():
        if r["epoch_seconds"]:
            epochs = range(1, len(r["val_perplexity_curve"]) + 1)
            curves.plot(
                epochs, r["val_perplexity_curve"], marker="o", label=arm
            )
        else:
            curves.axhline(r["val_perplexity"], linestyle="--", label=arm)
    curves.set(
        xlabel="epoch",
        ylabel="validation perplexity",
        title="Learning the new data",
    )
    curves.legend()
    arms = list(results)
    x = range(len(arms))
    bars.bar(
        [i - 0.2 for i in x],
        [
            math.nan
            if results[a]["train_seconds"] is None
            else results[a]["train_seconds"]
            for a in arms
        ],
        width=0.4,
        label="train time (s)",
    )
    twin = bars.twinx()
    twin.bar(
        [i + 0.2 for i in x],
        [results[a]["peak_rss_mb"] for a in arms],
        width=0.4,
        color="tab:orange",
        label="peak RSS (MB)",
    )
    bars.set_xticks(list(x), arms)
    bars.set(ylabel="seconds", title="Cost per arm")
    twin.set_ylabel("MB")
    handles = [
        *bars.get_legend_handles_labels()[0],
        *twin.get_legend_handles_labels()[0],
    ]
    bars.legend(handles, [h.get_label() for h in handles], loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- Export --------------------------------------------------------------------


def export_best(args, results):
    """Exports the best LoRA arm, merged; a run started again exports only
    if that model or its tokenizers changed (else it reuses the version it
    wrote before)."""
    lora_arms = [a for a in results if a.startswith("lora")]
    if not lora_arms:
        return None
    best = min(lora_arms, key=lambda a: results[a]["val_perplexity"])
    try:
        from keras_rnn_lora import export
    except ImportError:
        print("keras_rnn_lora.export is not available: no SavedModel written")
        return None
    import keras

    from keras_rnn_lora import text

    model_path = os.path.join(args.output_dir, f"{best}_merged.keras")
    tokenizer_paths = [
        os.path.join(
            args.output_dir, "tokenizers", f"spm_{lang}_{args.vocab_size}.model"
        )
        for lang in ("en", "de")
    ]
    digest = hashlib.sha256(f"{args.max_length}".encode())
    for path in (model_path, *tokenizer_paths):
        with open(path, "rb") as file:
            digest.update(file.read())
    record_path = os.path.join(args.output_dir, "export.json")
    if os.path.exists(record_path):
        with open(record_path) as file:
            record = json.load(file)
        if record["fingerprint"] == digest.hexdigest() and os.path.isdir(
            record["path"]
        ):
            print(f"Reusing the export {record['path']} (nothing changed)")
            return record["path"]
    model = keras.saving.load_model(model_path, compile=False)
    tokenizers = [text.load_tokenizer(path) for path in tokenizer_paths]
    path = export.export_translator(
        model, *tokenizers, args.export_dir, max_length=args.max_length
    )
    write_json(record_path, {"fingerprint": digest.hexdigest(), "path": path})
    return path


# -- main ----------------------------------------------------------------------


def seed_everything(seed):
    """Seeds Python, numpy and the backend once, before any tokenizer
    exists: on TensorFlow, `keras.utils.set_random_seed` resets the eager
    context, which destroys the SentencePiece resources of tokenizers
    loaded before it ("Resource ... SentencepieceOp ... does not exist")."""
    import keras

    keras.utils.set_random_seed(seed)


def main(argv=None):
    parser, args = parse_args(argv)
    check_args(parser, args)
    seed_everything(args.seed)
    if args.run_arm:
        run_arm(args, args.run_arm)
        return
    os.makedirs(os.path.join(args.output_dir, "arms"), exist_ok=True)
    key_path = os.path.join(args.output_dir, "run_key.txt")
    key = run_key(args)
    if os.path.exists(key_path) and open(key_path).read() != key:
        parser.error(
            f"--output-dir {args.output_dir} holds a run with other settings "
            "or other data; choose another folder or delete it"
        )
    with open(key_path, "w") as file:
        file.write(key)
    data = load_data(args)
    pretrain(args, data)
    results = {}
    for arm in args.arm_list:
        path = os.path.join(args.output_dir, "arms", f"{arm}.json")
        reused = os.path.exists(path)
        if not reused:  # the child prints its own one-line summary
            command = [
                sys.executable,
                os.path.abspath(__file__),
                *(argv or sys.argv[1:]),
            ]
            subprocess.run([*command, "--run-arm", arm], check=True)
        with open(path) as file:
            results[arm] = json.load(file)
        if reused:
            print(f"Reusing the finished arm {arm} ({path})")
            print(one_line(results[arm]))
    summary = {
        "initial_pairs": len(data["initial"]),
        "new_pairs": len(data["new"]),
        "heldout_pairs": len(data["heldout"]),
        "paper": PAPER,
        "reductions": reductions(results),
        "settings": {k: v for k, v in vars(args).items() if k != "arm_list"},
        "peak_rss_note": "resident memory above each arm's idle process",
    }
    export_path = export_best(args, results)
    summary["export"] = export_path
    write_json(
        os.path.join(args.output_dir, "results.json"),
        {"arms": results, **summary},
    )
    plot(os.path.join(args.output_dir, "curves.png"), results)
    report = markdown(args, results, summary)
    with open(os.path.join(args.output_dir, "results.md"), "w") as file:
        file.write(report)
    print("\n" + report)


if __name__ == "__main__":
    main()
