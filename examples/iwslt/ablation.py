"""`--ablation`: which LoRA recovers how much of full fine-tuning's gain,
at what cost.

Every point is an arm of its own, run exactly as the main arms are: its
own learning-rate grid on the first chunk (extended past an edge that
wins), every chunk in turn with the same schedule and early stopping,
merging after each, over `--ablation-seeds` seeds (`full` and `control`
too, for the share of the gain). In three stages, each chosen from the
figures of the one before (validation perplexity after the last chunk,
mean over seeds):

1. ranks 4-64 on the recurrent kernels, and at `--rank` the target sets
   (recurrent; + input kernels; + the attention and output `Dense`
   layers; + the embeddings: everything this translator has);
2. the variants (DoRA, PiSSA, LoRA+), each at the best target set it can
   be built on (DoRA has no form for an embedding);
3. LoRA alpha at the best point so far, and LoRA dropout at the best
   point it can be built on (it is the cells' alone).

A stage's choice, once made, is kept (`ablation/choices.json`).

A point that is a main arm (`rec_r<rank>` is `lora`, `in+rec_r<rank>`
is `lora_kernel`) is that arm's run, not a second one.
"""

import math
import statistics

from iwslt.arms import read_json
from iwslt.arms import write_json
from iwslt.jobs import path
from iwslt.settings import ABLATION_ALPHAS
from iwslt.settings import ABLATION_DROPOUTS
from iwslt.settings import ABLATION_RANKS
from iwslt.settings import ABLATION_TARGETS
from iwslt.settings import ABLATION_VARIANTS
from iwslt.settings import ablation_point
from iwslt.settings import buildable


def seeds(args):
    """Seeds of every ablation point, and of `full` and `control`."""
    return args.ablation_seeds


def aliases(args):
    """`{point: main arm}` for the points the main arms already are."""
    return {
        ablation_point("rec", args.rank): "lora",
        ablation_point("in+rec", args.rank): "lora_kernel",
    }


def arm_of(args, point):
    """The arm whose runs are `point`'s."""
    return aliases(args).get(point, point)


def first_stage(args):
    ranks = [r for r in ABLATION_RANKS if r <= args.units]
    points = [ablation_point("rec", r) for r in ranks]
    points += [ablation_point(t, args.rank) for t in ABLATION_TARGETS]
    return list(dict.fromkeys(points))


def validation(args, point):
    """Validation perplexity after the last chunk, mean over the point's
    seeds (infinite where one diverged); `None` until every seed has
    finished."""
    arm = arm_of(args, point)
    values = []
    for seed in range(seeds(args)):
        result = read_json(path(args, "seeds", str(seed), arm, "result.json"))
        if result is None:
            return None
        values.append(result["chunks"][-1]["forgetting_row"]["validation"])
    if not all(math.isfinite(v) for v in values):
        return math.inf
    return statistics.fmean(values)


def _best(args, candidates):
    """The candidate with the lowest validation perplexity (ties: the
    first)."""
    return min(candidates, key=lambda p: validation(args, p))


def _variants(args, done):
    """Stage 2: `{variant: target set point}`, each variant at the best
    target set it can be built on."""
    sets = [ablation_point(t, args.rank) for t in ABLATION_TARGETS]
    return {
        variant: _best(args, [p for p in sets if buildable(f"{p}_{variant}")])
        for variant in ABLATION_VARIANTS
    }


def _tuning(args, done):
    """Stage 3: `{"alpha": point, "dropout": point}`: alpha at the best
    point so far, dropout at the best one it can be built on."""
    return {
        "alpha": _best(args, done),
        "dropout": _best(args, [p for p in done if buildable(f"{p}_d0.1")]),
    }


STAGES = {
    "variants": (
        _variants,
        lambda chosen: [f"{at}_{v}" for v, at in chosen.items()],
    ),
    "tuning": (
        _tuning,
        lambda chosen: (
            [f"{chosen['alpha']}_a{a:g}" for a in ABLATION_ALPHAS]
            + [f"{chosen['dropout']}_d{d:g}" for d in ABLATION_DROPOUTS]
        ),
    ),
}


def points(args):
    """The points of every stage whose choice is made, in stage order: the
    first stage, and each later one once every point before it has
    finished (every seed). A choice, once made, is kept in
    `ablation/choices.json`: a run started again, or with more seeds,
    runs the same points. Run the unfinished ones and ask again."""
    choices_path = path(args, "ablation", "choices.json")
    choices = read_json(choices_path, {})
    done = first_stage(args)
    for stage, (choose, expand) in STAGES.items():
        if stage not in choices:
            if any(validation(args, p) is None for p in done):
                return done
            choices[stage] = choose(args, done)
            write_json(choices_path, choices)
        done = done + [p for p in expand(choices[stage]) if p not in done]
    return done
