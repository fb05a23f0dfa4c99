"""The main job's settings: defaults, presets, arms, learning-rate grids,
the command line, its checks and the run key.

Every default is an UPPER_CASE constant with the reason it has its value;
a preset (`--preset`) and `--smoke` change some of them, and an argument
given on the command line always wins over both.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os

PRETRAIN_FRACTION = 0.5  # the paper: an initial part, then new data arrives
SEED = 1234
# Settings every run has (`None`: all there is).
DEFAULTS = {
    "max_pairs": None,  # training pairs read, in file order
    "eval_pairs": None,  # test pairs scored (None: all 8,079 of tst2010-15)
    "heldout_pairs": 500,  # initial pairs kept out: forgetting is read there
    "chunk_heldout_pairs": 300,  # pairs of each new chunk kept out likewise
    # Per language, SentencePiece unigram, trained on the initial part only.
    "vocab_size": 4000,
    "max_length": 50,  # tokens per side; longer sentences are truncated
    "batch_size": 64,
    "label_smoothing": 0.1,  # training loss only; perplexity is unsmoothed
    # Every fit (pre-training and each arm's chunks) ends this many epochs
    # after its best validation epoch; its cap (`pretrain_epochs`,
    # `update_epochs`) is set so that early stopping, not the cap, ends it.
    "patience": 4,  # pre-training
    "update_patience": 2,  # each chunk, the same for every arm
    # Every fit halves its learning rate after half its patience without a
    # better validation perplexity (Keras' ReduceLROnPlateau; pre-training
    # 2 epochs, a chunk 1: `arms.plateau_patience`), so it settles at its
    # optimum before early stopping ends it, and one noisy epoch does not
    # cut a long fit's rate.
    "plateau_factor": 0.5,
    "increments": 2,  # chunks the new data arrives in
    "seeds": 1,  # repetitions of the incremental phase (README: 3)
    # `--ablation`: seeds of every point (and of `full` and `control`, for
    # the share of the gain), whatever `--seeds` is: two give a spread.
    "ablation_seeds": 2,
    # Times a method's learning-rate grid is extended past a winning edge
    # (`LEARNING_RATE_GRIDS`); `--smoke`: none, its fits are too short to
    # tell rates apart.
    "grid_extensions": 2,  # benchmarks/variants_real_data.py's too
    "timing_rounds": 7,  # rounds of the interleaved step timing
    "memory_samples": 3,  # fresh processes per arm measuring peak memory
}
PRESETS = {
    # A 2-core CPU: the default run (one seed).
    "cpu": {
        "embedding_dim": 256,
        "units": 256,
        "dropout": 0.3,
        "rank": 8,
        "pretrain_epochs": 100,  # a cap: early stopping ends it
        "pretrain_learning_rate": 2e-3,
        "update_epochs": 30,  # per chunk, a cap; the best epoch is kept
    },
    # The paper's scale (hidden 2048): for a GPU.
    "paper": {
        "embedding_dim": 512,
        "units": 2048,
        "dropout": 0.3,
        "rank": 8,
        "pretrain_epochs": 80,
        "pretrain_learning_rate": 1e-3,
        "update_epochs": 30,
        "increments": 4,
    },
}
SMOKE = {
    "max_pairs": 400,
    "eval_pairs": 40,
    "heldout_pairs": 20,
    "chunk_heldout_pairs": 10,
    "vocab_size": 500,
    "batch_size": 32,
    "embedding_dim": 16,
    "units": 32,
    "rank": 2,
    "pretrain_epochs": 2,
    "update_epochs": 2,
    "update_patience": 1,
    "grid_extensions": 0,
    "timing_rounds": 2,
    "memory_samples": 1,
}
SETTING_TYPES = {
    "max_pairs": int,
    "eval_pairs": int,
    "heldout_pairs": int,
    "chunk_heldout_pairs": int,
    "vocab_size": int,
    "max_length": int,
    "batch_size": int,
    "label_smoothing": float,
    "patience": int,
    "update_patience": int,
    "plateau_factor": float,
    "increments": int,
    "seeds": int,
    "ablation_seeds": int,
    "grid_extensions": int,
    "timing_rounds": int,
    "memory_samples": int,
    "embedding_dim": int,
    "units": int,
    "dropout": float,
    "rank": int,
    "pretrain_epochs": int,
    "pretrain_learning_rate": float,
    "update_epochs": int,
}

# The arms. `method` names the learning-rate grid the arm is tuned on; an
# arm whose method is another arm's reuses that arm's chosen rate.
ARMS = {
    "full": {"method": "full", "about": "every weight fine-tuned"},
    "lora": {
        "method": "lora",
        "about": "LoRA on the recurrent kernels (the paper's method)",
        "targets": ("recurrent",),
    },
    "lora_kernel": {
        "method": "lora_kernel",
        "about": "LoRA on the input and recurrent kernels",
        "targets": ("kernel", "recurrent"),
    },
    "lora_bf16": {
        "method": "lora_bf16",
        "about": "`lora` with the frozen base in bfloat16; one adapter "
        "learns every chunk (a bfloat16 kernel cannot hold a merge)",
        "targets": ("recurrent",),
        "base_dtype": "bfloat16",
    },
    "control": {
        "method": "full",
        "about": "`full` on as many pairs of the initial data instead of "
        "each chunk's new pairs",
        "data": "initial",
    },
    "frozen": {"method": None, "about": "no update: the pre-trained model"},
}
DEFAULT_ARMS = "full,lora,lora_kernel,lora_bf16,control,frozen"
# Learning rates tried per method on the first chunk (seed 0), chosen on
# validation perplexity (`lora_bf16` too: its base rounds differently).
# Each grid spans both directions around a prior (the rate an earlier run
# of this job chose at this size); if the best rate is at an edge, the grid
# is extended by the same factor (`--grid-extensions` times at most), so
# the choice is an interior optimum.
LEARNING_RATE_GRIDS = {
    "full": (3e-4, 1e-3, 3e-3),
    "lora": (1e-3, 3e-3, 1e-2),
    "lora_kernel": (1e-3, 3e-3, 1e-2),
    "lora_bf16": (1e-3, 3e-3, 1e-2),
}
SMOKE_GRIDS = {"full": (1e-3, 3e-3), "lora": (1e-2, 3e-2)}
SMOKE_GRIDS["lora_kernel"] = SMOKE_GRIDS["lora_bf16"] = SMOKE_GRIDS["lora"]
GRID_FACTOR = 3.0
# `--ablation`: which LoRA closes the gap to full fine-tuning, at what
# cost, each point an arm of its own under the same protocol (its own rate
# grid, every chunk, early stopping, `--ablation-seeds` seeds). A
# point's name says what it is: `<targets>_r<rank>[_<variant>][_a<alpha>]
# [_d<dropout>]`, e.g. `rec_r16`, `in+rec+dense_r8_dora`.
ABLATION_RANKS = (4, 8, 16, 32, 64)  # on the recurrent kernels
ABLATION_TARGETS = {  # at `--rank`
    "rec": ("recurrent",),
    "in+rec": ("kernel", "recurrent"),
    "in+rec+dense": ("kernel", "recurrent", "dense"),
    # Every target the translator has (it holds no EinsumDense).
    "all": ("kernel", "recurrent", "dense", "embedding"),
}
# At the target set with the best validation perplexity after the last
# chunk: the variants, each from its own grid, centred on the rate each
# chose in benchmarks/variants_real_data.py (docs/variants.md).
ABLATION_VARIANTS = {
    "dora": {"use_dora": True},
    "pissa": {"lora_init": "pissa"},
    "loraplus": {},
}
LORAPLUS_RATIO = 16.0  # Hayou et al.'s suggested ratio of B's rate to A's
VARIANT_GRIDS = {
    "dora": (3e-3, 1e-2, 3e-2),
    "pissa": (1e-3, 3e-3, 1e-2),
    "loraplus": (1e-4, 3e-4, 1e-3),
}
# At the best point of all before: LoRA alpha (as a multiple of the rank;
# 1, the default, is the point itself) and LoRA dropout.
ABLATION_ALPHAS = (0.5, 2.0)
ABLATION_DROPOUTS = (0.1, 0.3)
# The paper's reported reductions of LoRA against full fine-tuning.
PAPER = {
    "time_reduction": 0.837,
    "memory_reduction": 0.335,
    "trainable_reduction": 0.999,
}
# Translated by every arm in the report.
SENTENCES = (
    "Thank you so much, Chris.",
    "We have to do something.",
    "Climate change is the biggest problem of our time.",
    "I would like to tell you a story about my grandmother.",
    "This is the most important thing in the world.",
)


def ablation_point(targets, rank, variant=None, alpha=None, dropout=None):
    """The name of an ablation point (see `ABLATION_TARGETS`)."""
    name = f"{targets}_r{rank}"
    if variant:
        name += f"_{variant}"
    if alpha is not None:
        name += f"_a{alpha:g}"
    if dropout:
        name += f"_d{dropout:g}"
    return name


def arm_spec(arm):
    """What an arm is: an entry of `ARMS`, or an ablation point read from
    its name (`ablation_point`): its method is its own name (its own rate
    grid), its `config` the `LoRAConfig` arguments. `KeyError` for a name
    that is neither."""
    if arm in ARMS:
        return ARMS[arm]
    parts = arm.split("_")
    if len(parts) < 2 or parts[0] not in ABLATION_TARGETS:
        raise KeyError(arm)
    targets = ABLATION_TARGETS[parts[0]]
    try:
        config = {"rank": _number(parts[1], "r", int), "lora_targets": targets}
        variant = None
        kinds = [p if p in ABLATION_VARIANTS else p[:1] for p in parts[2:]]
        kinds = ["variant" if k in ABLATION_VARIANTS else k for k in kinds]
        if len(set(kinds)) < len(kinds):  # say each thing once
            raise ValueError(arm)
        for part in parts[2:]:
            if part in ABLATION_VARIANTS:
                variant = part
                config.update(ABLATION_VARIANTS[part])
            elif part.startswith("a"):
                config["lora_alpha"] = _number(part, "a") * config["rank"]
            else:
                config["lora_dropout"] = _number(part, "d")
    except ValueError:
        raise KeyError(arm) from None
    return {
        "method": arm,
        "about": f"ablation: LoRA on {'+'.join(targets)}, rank "
        f"{config['rank']}"
        + (f", {variant}" if variant else "")
        + (
            f", alpha {config['lora_alpha']:g}"
            if "lora_alpha" in config
            else ""
        )
        + (
            f", LoRA dropout {config['lora_dropout']:g}"
            if "lora_dropout" in config
            else ""
        ),
        "targets": targets,
        "config": config,
        "variant": variant,
        "loraplus_ratio": LORAPLUS_RATIO if variant == "loraplus" else None,
    }


def _number(part, prefix, kind=float):
    """The number in a name part such as `r16` or `a0.5` (`ValueError` if
    the part is not `prefix` and a positive number)."""
    if not part.startswith(prefix):
        raise ValueError(part)
    value = kind(part[len(prefix) :])
    if not value > 0:
        raise ValueError(part)
    return value


def buildable(point):
    """Whether the library can build ablation point `point`: DoRA has no
    form for an embedding (it rescales a kernel's columns), and LoRA
    dropout is the cells' alone (Keras' own layers have no dropout of
    their input to share)."""
    spec = arm_spec(point)
    config, targets = spec["config"], set(spec["targets"])
    if config.get("use_dora") and "embedding" in targets:
        return False
    return not (
        config.get("lora_dropout") and targets - {"kernel", "recurrent"}
    )


def grid(args, method):
    """The learning rates `method` tries first: its entry in the settings'
    grids, or an ablation point's: its variant's, else LoRA's."""
    if method in args.grids:
        return args.grids[method]
    variant = arm_spec(method)["variant"]
    if variant and not args.smoke:
        return VARIANT_GRIDS[variant]
    return args.grids["lora"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of one run, built once from the command line by
    `parse` (presets and `--smoke` applied, every value checked). The jobs
    receive it whole; nothing is added to it after parsing."""

    data_dir: str | None
    output_dir: str
    export_dir: str
    pretrain_fraction: float
    arms: tuple
    preset: str
    smoke: bool
    ablation: bool
    multi_worker: bool
    seed: int
    max_pairs: int | None
    eval_pairs: int | None
    heldout_pairs: int
    chunk_heldout_pairs: int
    vocab_size: int
    max_length: int
    batch_size: int
    label_smoothing: float
    patience: int
    update_patience: int
    plateau_factor: float
    increments: int
    seeds: int
    ablation_seeds: int
    grid_extensions: int
    timing_rounds: int
    memory_samples: int
    embedding_dim: int
    units: int
    dropout: float
    rank: int
    pretrain_epochs: int
    pretrain_learning_rate: float
    update_epochs: int
    grids: dict  # method -> the learning rates tried first

    def recorded(self):
        """The settings as plain JSON values."""
        values = dataclasses.asdict(self)
        values["arms"] = list(self.arms)
        values["grids"] = {k: list(v) for k, v in self.grids.items()}
        return values


def _parser():
    """The command line's parser, and the option names it takes."""
    parser = argparse.ArgumentParser(
        description="LoRA against full fine-tuning on IWSLT 2017 en-de, "
        "with data that arrives in increments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    names = []

    def add(*flags, **kwargs):
        names.extend(parser.add_argument(*flags, **kwargs).option_strings)

    add("--data-dir", default=os.environ.get("IWSLT2017_DIR"))
    add("--output-dir", default="runs/iwslt_translate")
    add("--export-dir", default="saved_models")
    add("--pretrain-fraction", type=float, default=PRETRAIN_FRACTION)
    add(
        "--arms", default=DEFAULT_ARMS, help=f"comma-separated, of {list(ARMS)}"
    )
    add("--preset", choices=sorted(PRESETS), default="cpu")
    add("--smoke", action="store_true", help="a few hundred pairs, tiny model")
    add("--ablation", action="store_true", help="ranks and targets of LoRA")
    add(
        "--multi-worker",
        action="store_true",
        help="train on the cluster in TF_CONFIG (TensorFlow) or "
        "KERAS_DISTRIBUTION_* (JAX): docs/multi-worker.md",
    )
    add("--seed", type=int, default=SEED)
    for key, kind in SETTING_TYPES.items():
        default = DEFAULTS.get(key, PRESETS["cpu"].get(key))
        add(
            f"--{key.replace('_', '-')}",
            type=kind,
            default=None,
            help=f"default {default} (the preset's, or --smoke's)",
        )
    return parser, names


def option_names():
    """Every option name the main job's command line takes (`--smoke`,
    `--output-dir`, ...), for a script that passes them through."""
    return _parser()[1]


def parse(argv=None):
    """`(parser, Settings)` from the command line `argv`; a bad argument
    ends the program with one clear line (argparse's `error`)."""
    parser, _ = _parser()
    given = vars(parser.parse_args(argv))
    values = {**DEFAULTS, **PRESETS[given["preset"]]}
    if given["smoke"]:
        values.update(SMOKE)
    for key, value in given.items():
        if value is not None or key not in values:  # the command line wins
            values[key] = value
    values["arms"] = _arms(parser, given["arms"])
    values["grids"] = SMOKE_GRIDS if given["smoke"] else LEARNING_RATE_GRIDS
    settings = Settings(**values)
    _check(parser, settings)
    return parser, settings


def _arms(parser, text):
    arms = tuple(a for a in text.split(",") if a)
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        parser.error(
            f"--arms: unknown arm {unknown or list(arms)}; choose from "
            f"{list(ARMS)}"
        )
    return arms


def _check(parser, args):
    """Every argument checked before any work: one clear line each."""
    if not 0.0 < args.pretrain_fraction < 1.0:
        parser.error(
            "--pretrain-fraction must lie strictly between 0 and 1, got "
            f"{args.pretrain_fraction}"
        )
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
        "heldout_pairs": 1,
        "chunk_heldout_pairs": 1,
        "max_pairs": 1,
        "eval_pairs": 1,
        "increments": 1,
        "seeds": 1,
        "ablation_seeds": 1,
        "grid_extensions": 0,
        "patience": 1,
        "update_patience": 1,
        "timing_rounds": 1,
        "memory_samples": 1,
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
    for name in ("dropout", "label_smoothing"):
        value = getattr(args, name)
        if not 0.0 <= value < 1.0:
            parser.error(
                f"--{name.replace('_', '-')} must lie in [0, 1), got {value}"
            )
    if not 0.0 < args.plateau_factor <= 1.0:
        parser.error(
            "--plateau-factor must lie in (0, 1] (1: no reduction), got "
            f"{args.plateau_factor}"
        )
    rate = args.pretrain_learning_rate
    if not (math.isfinite(rate) and rate > 0):
        parser.error(
            f"--pretrain-learning-rate must be finite and > 0, got {rate}"
        )


# The modules that only present results: the report is made afresh from
# the saved records on every run, so a change to them reuses every record.
PRESENTATION = ("report.py", "plots.py")


def code_fingerprint(package_dir=None, examples_dir=None):
    """SHA-256 (12 hex digits) of the source the results come from: the
    main job (iwslt_translate.py and iwslt/ but for its `PRESENTATION`
    modules, in this examples folder or `examples_dir`) and the
    `keras_rnn_lora` it imports (or the package folder `package_dir`)."""
    import importlib.util

    examples = examples_dir or os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))
    )
    if package_dir is None:
        spec = importlib.util.find_spec("keras_rnn_lora")
        package_dir = list(spec.submodule_search_locations)[0]
    roots = {
        "examples/iwslt": os.path.join(examples, "iwslt"),
        "keras_rnn_lora": package_dir,
    }
    files = [
        (
            "examples/iwslt_translate.py",
            os.path.join(examples, "iwslt_translate.py"),
        )
    ]
    for name, root in roots.items():
        for folder, _, found in os.walk(root):
            for file in found:
                full = os.path.join(folder, file)
                relative = os.path.relpath(full, root)
                shown = name == "examples/iwslt" and relative in PRESENTATION
                if file.endswith(".py") and not shown:
                    files.append((f"{name}/{relative}", full))
    digest = hashlib.sha256()
    for name, full in sorted(files):
        digest.update(name.replace(os.sep, "/").encode() + b"\0")
        with open(full, "rb") as file:
            digest.update(file.read() + b"\0")
    return digest.hexdigest()[:12]


def run_key(args, data_fingerprint):
    """A fingerprint of everything that changes results: the settings, the
    content of the data and the code (`code_fingerprint`), so a resumed run
    only reuses work made from the same settings, data and code. (`--seeds`,
    `--ablation-seeds`, `--arms` and `--ablation` add work without changing
    what is done, so they are not in it; `--multi-worker` is, when given.)"""
    skip = {
        "data_dir",
        "output_dir",
        "export_dir",
        "arms",
        "seeds",
        "ablation_seeds",
        "ablation",
        "timing_rounds",
        "memory_samples",
    }
    recorded = args.recorded()
    settings = {k: v for k, v in sorted(recorded.items()) if k not in skip}
    settings["data"] = data_fingerprint
    settings["code"] = code_fingerprint()
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
