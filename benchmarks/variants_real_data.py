"""The LoRA variants on the real data: a quick check from the main job's
pre-trained translator.

It reads a run of examples/iwslt_translate.py that has at least pre-trained
and chosen its learning rates. Every argument this script does not define
is the main job's (`python examples/iwslt_translate.py --help`): give the
run's own, `--output-dir` and `--smoke` or any setting it was started
with, and its data (`IWSLT2017_DIR` or `--data-dir`). The run key, which
covers the settings and the data's content, is checked.
Each variant then learns the first chunk (seed 0) exactly as the main job's
learning-rate search does for `lora`: the same pre-trained weights, batches,
seed and epochs (the run's `--update-epochs`, so every row trains as
long), the validation perplexity after every epoch, the best epoch kept,
at every rate of its grid (extended past a winning edge by the
main job's rule):

- `dora`: LoRA with `use_dora=True` on the recurrent kernels;
- `pissa`: LoRA with `lora_init="pissa"` on the recurrent kernels;
- `olora`: LoRA with `lora_init="olora"` on the recurrent kernels;
- `lora_plus`: LoRA on the recurrent kernels with `LoRAPlusOptimizer`
  (B factors at `LORAPLUS_RATIO` times the rate);
- `lora` and `full`: the run's own trials, read from its learning_rates/
  folder (not trained again).

Every variant has the arm `lora`'s rank and targets. Reported per variant:
the rate chosen, the validation perplexity after each epoch at that rate,
the best, the share of full fine-tuning's gain over the pre-trained model
that it recovers, and the first epoch at which it reaches plain LoRA's
best. This is one seed on one chunk: a first look, not the ablation.

    IWSLT2017_DIR=../shared/data/iwslt2017-en-de \
      python benchmarks/variants_real_data.py --output-dir runs/iwslt_translate

Each fit follows the main job's schedule and early stopping (at most
`--update-epochs`); at the settings of 4 epochs a fit took 1-4 minutes on
a 2-core CPU, 3 or 4 fits a variant. Fits are kept under
<output-dir>/variants/ and reused: a killed check resumes. Writes
variants_real_data.json to `--results-dir` (default
benchmarks/results; it holds the variants of this call) and prints a
Markdown table.
"""

import os
import sys

import harness

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "examples"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from iwslt import processes  # noqa: E402
from iwslt import settings  # noqa: E402
from iwslt.arms import read_json  # noqa: E402
from iwslt.arms import write_json  # noqa: E402

LORAPLUS_RATIO = 16.0  # Hayou et al.'s suggested ratio
# Rates tried first per variant. DoRA around plain LoRA's; PiSSA's and
# OLoRA's factors start large (from the kernel's own decomposition) and
# LoRA+'s B learns 16 times faster, so they start a step lower.
GRIDS = {
    "dora": (1e-3, 3e-3, 1e-2),
    "pissa": (3e-4, 1e-3, 3e-3),
    "olora": (3e-4, 1e-3, 3e-3),
    "lora_plus": (3e-4, 1e-3, 3e-3),
}
VARIANTS = tuple(GRIDS)
HEADER = (
    "variant",
    "rate",
    "validation ppl after each epoch",
    "best (epoch)",
    "share of full's gain",
    "first epoch at lora's best",
)


def parse_args(argv=None):
    """`(parser, own options, the run's settings)`: this script's options,
    and every other argument as the main job's (`settings.parse`). Options
    are never abbreviated: a shortened name would silently be another."""
    parser = harness.parser(__doc__)
    parser.allow_abbrev = False
    add = parser.add_argument
    add(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, of {list(VARIANTS)} (default: all)",
    )
    add(
        "--rates",
        default=None,
        help="comma-separated learning rates tried for every variant, "
        "instead of the grids (no extension)",
    )
    add(
        "--results-dir",
        default=str(harness.RESULTS),
        help="where variants_real_data.json is written, replacing the one "
        "there (default: benchmarks/results)",
    )
    own, rest = parser.parse_known_args(argv)
    known = set(settings.option_names())
    for token in rest:
        name = token.split("=", 1)[0]
        if name.startswith("-") and not _number(name) and name not in known:
            parser.error(
                f"unknown argument {name}: neither this script's nor the main "
                "job's (python examples/iwslt_translate.py --help); names are "
                "never abbreviated"
            )
    variants = tuple(v.strip() for v in own.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in GRIDS]
    if unknown or not variants or len(set(variants)) < len(variants):
        parser.error(
            f"--variants: unknown or repeated variant "
            f"{unknown or list(variants)}; choose from {list(VARIANTS)}"
        )
    own.variants = variants
    if own.rates is not None:
        own.rates = _rates(parser, own.rates)
    _, run = settings.parse(rest)
    return parser, own, run


def _number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def _rates(parser, text):
    """The rates of `--rates`, each to 6 significant digits (the precision
    of its fit's folder name), none twice."""
    try:
        rates = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        rates = ()
    if not rates or not all(0 < r < float("inf") for r in rates):
        parser.error(
            f"--rates must be positive numbers separated by commas, got "
            f"{text!r}"
        )
    rounded = tuple(float(rate_name(r)) for r in rates)
    if len(set(rounded)) < len(rounded):
        parser.error(
            f"--rates: {text!r} names one rate twice (to 6 significant digits)"
        )
    return rounded


def rate_name(rate):
    """A rate as its fit's folder names it: 6 significant digits."""
    return f"{rate:.6g}"


def read_record(path, what="fit record"):
    """The JSON record at `path`, or `None` where there is none; a damaged
    one ends the program naming the file."""
    try:
        record = read_json(path)
    except (OSError, ValueError) as error:
        raise SystemExit(
            f"{path} is not a readable {what} ({error}); delete it (and "
            "the checkpoints beside it) to make it again"
        ) from None
    if record is not None and not isinstance(record, dict):
        raise SystemExit(f"{path} is not a {what}: delete it")
    return record


def check_results_dir(parser, directory):
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        parser.error(f"--results-dir {directory!r}: {error.strerror or error}")
    if not os.access(directory, os.W_OK):
        parser.error(f"--results-dir {directory!r} is not writable")


def check_run(parser, run):
    """Refuses a run this check cannot start from, naming what is missing;
    returns the run's `(split sizes, recorded trials of full and lora)`."""
    from iwslt.data import DataRefused
    from iwslt.data import Split
    from iwslt.data import data_fingerprint

    folder = run.output_dir
    key_path = os.path.join(folder, "run_key.txt")
    if not os.path.exists(key_path):
        parser.error(
            f"--output-dir {folder} holds no run of the main job (no "
            "run_key.txt); start examples/iwslt_translate.py there first"
        )
    try:
        fingerprint = data_fingerprint(run)
    except DataRefused as error:
        parser.error(str(error))
    if settings.run_key(run, fingerprint) != run_key(run):
        data = run.data_dir or "none given, the TFDS download"
        parser.error(
            f"--output-dir {folder} holds a run with other settings, data or "
            f"code than these arguments (data: {data}); give the arguments "
            "and the data that run was started with (--smoke, --units, ...; "
            "IWSLT2017_DIR or --data-dir), from the code it was made with"
        )
    needed = [
        os.path.join(folder, "pretrained.keras"),
        os.path.join(folder, "pretrain", "best.json"),
        *(
            os.path.join(folder, "learning_rates", method, "choice.json")
            for method in ("full", "lora")
        ),
    ]
    missing = [p for p in needed if not os.path.exists(p)]
    if missing:
        parser.error(
            f"{missing[0]} is missing: the run has not finished pre-training "
            "and choosing the learning rates of full and lora; resume it "
            "with the same arguments first"
        )
    if not is_keras_file(needed[0]):
        parser.error(f"{needed[0]} is not a Keras model file: resume the run")
    best = read_record(needed[1], "pre-training record")
    if not isinstance(best.get("value"), (int, float)):
        parser.error(f"{needed[1]} holds no best validation perplexity")
    variants = os.path.join(folder, "variants")
    if os.path.exists(variants) and not os.path.isdir(variants):
        parser.error(f"{variants} is not a folder: move it away")
    try:
        sizes = Split(run).sizes()
    except DataRefused as error:
        parser.error(str(error))
    trials = {}
    for method in ("full", "lora"):
        trials[method] = recorded_trials(run, method)
        if not trials[method]:
            parser.error(
                f"{os.path.join(folder, 'learning_rates', method)} holds no "
                "finished learning-rate trial: resume the run"
            )
    return sizes, best["value"], trials


def run_key(run):
    with open(os.path.join(run.output_dir, "run_key.txt")) as file:
        return file.read().strip()


def recorded_trials(run, method):
    """`{rate: fit record}` of the run's finished learning-rate trials of
    `method` (folders named by their rate, holding a fit.json)."""
    root = os.path.join(run.output_dir, "learning_rates", method)
    trials = {}
    for name in sorted(os.listdir(root)):
        try:
            rate = float(name)
        except ValueError:
            continue  # not a trial (a backup, a user's folder)
        record = read_record(os.path.join(root, name, "fit.json"))
        if record is not None:
            trials[rate] = checked_fit(record, os.path.join(root, name))
    return trials


def _real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checked_fit(record, directory):
    """`record` (a fit.json) if it holds what the summary reads."""
    curve = record.get("val_perplexity_curve")
    best = record.get("best_val_perplexity")
    epoch = record.get("best_epoch")
    if (
        not isinstance(curve, list)
        or not curve
        or not all(_real(v) for v in curve)
        or not _real(best)
        or not isinstance(epoch, int)
        or isinstance(epoch, bool)
        or not 0 <= epoch < len(curve)
        or curve[epoch] != best
        or not isinstance(record.get("epoch_seconds"), list)
    ):
        raise SystemExit(
            f"{os.path.join(directory, 'fit.json')} is not a finished fit "
            "(no validation perplexity); delete its folder to fit it again"
        )
    return record


def is_keras_file(path):
    """Whether `path` is a `.keras` archive (a zip holding config.json)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return "config.json" in archive.namelist()


def check_recorded_fits(run, variants):
    """Reads every fit already recorded for `variants`, so that a damaged
    one stops the check before anything trains."""
    for variant in variants:
        root = os.path.join(run.output_dir, "variants", variant)
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            record = read_record(os.path.join(root, name, "fit.json"))
            if record is not None:
                checked_fit(record, os.path.join(root, name))


def fit_variant(run, variant, rate):
    """One variant learning the first chunk at `rate` for the run's
    `--update-epochs`, as the main job's learning-rate trial of `lora` does
    (`iwslt.jobs.chunk_fit`). Runs in a process of its own; the record
    lands in the fit's folder."""
    from iwslt.arms import build_arm
    from iwslt.arms import fit_chunk
    from iwslt.data import batches
    from iwslt.jobs import setup

    import keras_rnn_lora
    from keras_rnn_lora.translation.metrics import compile_translator

    directory = fit_dir(run, variant, rate)
    seed = run.seed + 1  # seed 0, chunk 1: the learning-rate trials' seed
    split, preprocessor = setup(run, seed)
    options = {"use_dora": True} if variant == "dora" else {}
    if variant in ("pissa", "olora"):
        options["lora_init"] = variant
    config = keras_rnn_lora.LoRAConfig(
        rank=run.rank, lora_targets=settings.ARMS["lora"]["targets"], **options
    )
    model = build_arm(
        run, "lora", os.path.join(run.output_dir, "pretrained.keras"), config
    )
    ratio = LORAPLUS_RATIO if variant == "lora_plus" else None
    compile_translator(
        model, rate, run.label_smoothing, loraplus_lr_ratio=ratio
    )
    print(f"\n== {variant}: learning the first chunk at rate {rate:.3g}")
    record = fit_chunk(
        run,
        model,
        batches(run, preprocessor, split.chunks[0], True, seed),
        batches(run, preprocessor, split.validation, False),
        run.update_epochs,
        directory,
        run.update_patience,
    )
    write_json(os.path.join(directory, "fit.json"), record)


def fit_dir(run, variant, rate):
    return os.path.join(run.output_dir, "variants", variant, rate_name(rate))


def search(run, variant, rates, extend):
    """`{rate: fit record}`: the variant at each of `rates`, extended by the
    main job's rule while a grid edge wins (when `extend`). A finished fit
    is read, not run again."""
    tried = {}
    grid = list(rates)
    extensions = 0
    while True:
        for rate in grid:
            if rate in tried:
                continue
            directory = fit_dir(run, variant, rate)
            path = os.path.join(directory, "fit.json")
            if read_record(path) is None:
                processes.run_in_child(fit_variant, run, variant, rate)
            record = read_record(path)
            if record is None:
                raise SystemExit(f"The fit in {directory} wrote no record.")
            tried[rate] = checked_fit(record, directory)
        grid = next_grid(tried, grid, extensions if extend else None)
        if grid is None:
            return tried
        extensions += 1


def next_grid(tried, grid, extensions):
    """`grid` plus one rate past the winning edge of `tried` (records with
    `best_val_perplexity`), or `None` when the best rate is interior, the
    extensions are used up, or `extensions` is `None` (no extension)."""
    scores = {r: t["best_val_perplexity"] for r, t in tried.items()}
    best = min(scores, key=scores.get)
    edge = best in (min(scores), max(scores)) and len(scores) > 1
    limit = settings.DEFAULTS["grid_extensions"]
    if extensions is None or extensions >= limit or not edge:
        return None
    factor = settings.GRID_FACTOR
    rate = best / factor if best == min(scores) else best * factor
    return [*grid, float(rate_name(rate))]


def best_rate(tried):
    """The rate whose fit reached the lowest validation perplexity."""
    return min(tried, key=lambda r: tried[r]["best_val_perplexity"])


def summarize(trials, base_perplexity):
    """Per variant (a `{rate: fit record}` each, `full` and `lora` among
    them): the chosen rate, its curve, its best, the share of full
    fine-tuning's gain over `base_perplexity` it recovers, and the first
    epoch (1-based) whose validation perplexity reaches `lora`'s best."""
    chosen = {name: best_rate(tried) for name, tried in trials.items()}
    best = {
        name: trials[name][chosen[name]]["best_val_perplexity"]
        for name in trials
    }
    full_gain = base_perplexity - best["full"]
    rows = {}
    for name, tried in trials.items():
        record = tried[chosen[name]]
        curve = record["val_perplexity_curve"]
        reached = [i + 1 for i, v in enumerate(curve) if v <= best["lora"]]
        rows[name] = {
            "learning_rate": chosen[name],
            "rates_tried": {
                rate_name(r): t["best_val_perplexity"]
                for r, t in sorted(tried.items())
            },
            "val_perplexity_curve": curve,
            "best_val_perplexity": best[name],
            "best_epoch": record["best_epoch"] + 1,
            "epochs_run": len(curve),
            "epoch_seconds": record["epoch_seconds"],
            "resumed": record.get("resumed", False),
            "share_of_full_gain": (base_perplexity - best[name]) / full_gain
            if full_gain > 0
            else None,
            "first_epoch_at_lora_best": reached[0] if reached else None,
        }
    return rows


def rows(summary):
    """The Markdown table's rows, in the order of `summary`."""
    for name, row in summary.items():
        share = row["share_of_full_gain"]
        first = row["first_epoch_at_lora_best"]
        yield (
            name,
            f"{row['learning_rate']:.3g}",
            ", ".join(f"{v:.2f}" for v in row["val_perplexity_curve"]),
            f"{row['best_val_perplexity']:.2f} ({row['best_epoch']})",
            "-" if share is None else f"{share:.1%}",
            "not reached" if first is None else str(first),
        )


def main(argv=None):
    parser, own, run = parse_args(argv)
    check_results_dir(parser, own.results_dir)
    from iwslt.quiet import import_backend

    import_backend()
    sizes, base, trials = check_run(parser, run)
    check_recorded_fits(run, own.variants)
    with processes.run_lock(run.output_dir):
        for variant in own.variants:
            rates = own.rates or GRIDS[variant]
            trials[variant] = search(
                run, variant, rates, extend=own.rates is None
            )
    summary = summarize(trials, base)
    harness.write_results(
        "variants_real_data",
        {
            "settings": {
                "run": harness.relative_path(run.output_dir),
                "run_key": run_key(run),
                "rank": run.rank,
                "targets": list(settings.ARMS["lora"]["targets"]),
                "epochs": run.update_epochs,
                "grids": {v: list(GRIDS[v]) for v in own.variants},
                "rates": list(own.rates) if own.rates else None,
                "loraplus_lr_ratio": LORAPLUS_RATIO,
                "data": sizes,
            },
            "pretrained_val_perplexity": base,
            "variants": summary,
        },
        directory=own.results_dir,
    )
    harness.print_table(
        HEADER,
        rows(summary),
        align="llllrr",
        title=f"Validation perplexity learning the first chunk "
        f"(pre-trained: {base:.2f})",
    )


if __name__ == "__main__":
    main()
