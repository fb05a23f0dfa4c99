"""`--ablation`: what closes the gap between recurrent-only LoRA and full
fine-tuning, and at what cost.

LoRA at ranks 4-32 on the recurrent kernels, and at the default rank on
growing sets of targets (input kernels, then the attention and output
`Dense` layers, then the embeddings), each learning the first chunk (seed
0) from the pre-trained model at the better of two learning rates (the
rate chosen for `lora`, and a third of it: larger adapters often want
less), chosen on validation perplexity. Reported against trainable
parameters and training-step time (from the interleaved timing).
"""

import os

from iwslt.arms import build_arm
from iwslt.arms import compile_arm
from iwslt.arms import fit_chunk
from iwslt.arms import read_json
from iwslt.arms import write_json
from iwslt.data import batches
from iwslt.evaluate import bleu
from iwslt.evaluate import perplexity
from iwslt.jobs import chosen_rate
from iwslt.jobs import path
from iwslt.jobs import setup
from iwslt.settings import ABLATION_RANKS
from iwslt.settings import ABLATION_TARGETS


def configs(args):
    """`{name: LoRAConfig keyword arguments}` of every ablation point."""
    points = {
        f"rank {rank}": {"rank": rank, "lora_targets": ("recurrent",)}
        for rank in ABLATION_RANKS
        if rank <= args.units
    }
    for name, targets in ABLATION_TARGETS.items():
        if name != "recurrent" or f"rank {args.rank}" not in points:
            points[name] = {"rank": args.rank, "lora_targets": targets}
    return points


def lora_configs(args):
    from keras_rnn_lora import LoRAConfig

    return {
        name: LoRAConfig(**kwargs) for name, kwargs in configs(args).items()
    }


def run_point(args, name):
    """One ablation point: two rates, the better one scored."""
    import keras_rnn_lora

    target = path(args, "ablation", f"{name}.json")
    if os.path.exists(target):
        return
    config = lora_configs(args)[name]
    base_rate = chosen_rate(args, "lora")
    tried = {}
    for rate in (base_rate / 3, base_rate):
        directory = path(args, "ablation", name, f"{rate:.3g}")
        split, preprocessor = setup(args, args.seed + 1)
        model = build_arm(args, "lora", path(args, "pretrained.keras"), config)
        compile_arm(args, model, rate)
        record = read_json(os.path.join(directory, "fit.json"))
        if record is None:
            print(f"\n== Ablation {name}, rate {rate:.3g}", flush=True)
            record = fit_chunk(
                args,
                model,
                batches(
                    args, preprocessor, split.chunks[0], True, args.seed + 1
                ),
                batches(args, preprocessor, split.validation, False),
                args.update_epochs,
                directory,
            )
            write_json(os.path.join(directory, "fit.json"), record)
        tried[rate] = record["best_val_perplexity"]
    rate = min(tried, key=tried.get)
    model = build_arm(args, "lora", path(args, "pretrained.keras"), config)
    model.load_weights(
        path(args, "ablation", name, f"{rate:.3g}", "best.weights.h5")
    )
    compile_arm(args, model, rate)
    scores = bleu(args, model, preprocessor, split.test)
    write_json(
        target,
        {
            "name": name,
            "rank": config.rank,
            "targets": list(config.lora_targets),
            "learning_rate": rate,
            "validation_perplexity": tried[rate],
            "test_perplexity": perplexity(
                args, model, preprocessor, split.test
            ),
            "test_bleu": scores["bleu"],
            "test_chrf": scores["chrf"],
            "trainable_params": keras_rnn_lora.lora_summary(
                model, print_fn=None
            )["lora"],
        },
    )
