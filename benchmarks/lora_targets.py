"""What each LoRA target set costs on the default translator.

For every target set (recurrent kernels only, the paper's method; + the
RNN input kernels; + the attention and output `Dense` layers; + both
embeddings) and for full fine-tuning: the trainable parameters after
`mark_only_lora_as_trainable`, and one training step's time, timed
interleaved in one process (every set once per round, order rotating;
median and range of per-round ratios to full fine-tuning), on the same
fixed random batch. The translator is `build_translator`'s default
(embedding 256, GRU 256, dropout 0.3) over the main job's vocabulary of
4,000 pieces per language; batch 64 x 30 tokens.

    KERAS_BACKEND=tensorflow python benchmarks/lora_targets.py [--rounds 7]

About a minute per backend on a 2-core CPU. Writes
benchmarks/results/lora_targets_<backend>.json and prints a markdown table.
"""

import harness
import keras
import numpy as np

import keras_rnn_lora
from keras_rnn_lora import count_parameters
from keras_rnn_lora.measurement import interleaved_times
from keras_rnn_lora.measurement import ratio_summary
from keras_rnn_lora.translation import build_translator
from keras_rnn_lora.translation import compile_translator

TARGET_SETS = {
    "recurrent": ("recurrent",),
    "+ input kernels": ("kernel", "recurrent"),
    "+ Dense": ("kernel", "recurrent", "dense"),
    "+ Embedding": ("kernel", "recurrent", "dense", "embedding"),
}
VOCAB = 4000


def parse_args():
    parser = harness.parser(__doc__, rounds=7)
    for name, default in (
        ("--rank", 8),
        ("--batch-size", 64),
        ("--length", 30),
    ):
        parser.add_argument(name, type=harness.positive_int, default=default)
    return parser.parse_args()


def main():
    args = parse_args()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.length)
    source = rng.integers(4, VOCAB, shape).astype("int32")
    decoder_inputs = rng.integers(4, VOCAB, shape).astype("int32")
    targets = rng.integers(4, VOCAB, shape).astype("int32")

    base = build_translator(VOCAB, VOCAB)
    base([source[:1], decoder_inputs[:1]])
    models = {"full": base}
    for name, targets_set in TARGET_SETS.items():
        model = keras_rnn_lora.enable_lora(
            base, rank=args.rank, lora_targets=targets_set
        )
        keras_rnn_lora.mark_only_lora_as_trainable(model)
        models[name] = model
    steps, params = {}, {}
    for name, model in models.items():
        compile_translator(model, learning_rate=1e-3, label_smoothing=0.1)
        params[name] = count_parameters(model.trainable_weights)

        def step(model=model):
            model.train_on_batch((source, decoder_inputs), targets)

        steps[name] = step
    times = interleaved_times(steps, args.rounds)
    rows = {
        name: {
            "trainable_params": params[name],
            "step_ms_median": 1e3 * float(np.median(times[name])),
            "ratio_to_full": ratio_summary(times, name, "full"),
        }
        for name in models
    }
    backend = harness.backend()
    harness.write_results(
        f"lora_targets_{backend}", {"settings": vars(args), "rows": rows}
    )
    total = count_parameters(base.trainable_weights)
    harness.print_table(
        ["targets", "trainable params", "share", "step ms", "step / full"],
        [
            [
                name,
                f"{row['trainable_params']:,}",
                f"{100 * row['trainable_params'] / total:.2f}%",
                f"{row['step_ms_median']:.1f}",
                harness.median_range(row["ratio_to_full"]),
            ]
            for name, row in rows.items()
        ],
        title=f"{backend}: default translator ({total:,} weights), rank "
        f"{args.rank}, batch {args.batch_size} x {args.length}, "
        f"{args.rounds} interleaved rounds",
    )


if __name__ == "__main__":
    main()
