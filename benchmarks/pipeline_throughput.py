"""Translation pipeline throughput and padding, with and without bucketing.

Runs `TranslationPreprocessor.dataset` over the IWSLT 2017
training pairs (tokenization in the graph, batching, padding), alternating
A B A B: plain padded batches vs length-bucketed batches. Reports pairs/s
(median, min, max over the rounds) and the padding fraction of each.
Writes benchmarks/results/pipeline_throughput.json; the Markdown table last.

Usage: IWSLT2017_DIR=../shared/data/iwslt2017-en-de \
       python benchmarks/pipeline_throughput.py [--rounds 5] [--pairs 20000]
About a minute on a 2-core CPU.
"""

import os
import time

import harness

from keras_rnn_lora.measurement import summary
from keras_rnn_lora.translation import iwslt2017_tfds
from keras_rnn_lora.translation import read_pairs
from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor
from keras_rnn_lora.translation.preprocessing import padding_fraction


def run_once(pairs, preprocessor, bucketed, seed):
    dataset = preprocessor.dataset(
        pairs,
        batch_size=64,
        seed=seed,
        cache=False,
        bucket_boundaries=(8, 12, 16, 20, 24, 32, 40, 48) if bucketed else None,
    )
    start = time.perf_counter()
    rows = sum(int(batch[1].shape[0]) for batch in dataset)
    return rows / (time.perf_counter() - start), dataset


def main():
    parser = harness.parser(__doc__, rounds=5, data_dir=True)
    parser.add_argument("--pairs", type=harness.positive_int, default=20000)
    args = parser.parse_args()
    pairs = read_pairs("train", args.data_dir, max_pairs=args.pairs)
    directory = os.path.join(iwslt2017_tfds.prepared_dir(args.data_dir), "tok")
    preprocessor = TranslationPreprocessor.train(pairs, directory)
    run_once(pairs[:1000], preprocessor, True, 0)  # warm-up: trace the graphs
    speeds = {"plain": [], "bucketed": []}
    datasets = {}
    for i in range(args.rounds):
        for mode in ("plain", "bucketed"):
            speed, datasets[mode] = run_once(
                pairs, preprocessor, mode == "bucketed", seed=i
            )
            speeds[mode].append(speed)
    results = {
        mode: {
            "pairs_per_s": summary(values),
            "padding_fraction": padding_fraction(datasets[mode]),
        }
        for mode, values in speeds.items()
    }
    results["config"] = {"pairs": len(pairs), "rounds": args.rounds}
    harness.write_results("pipeline_throughput", results)
    harness.print_table(
        ["batching", "pairs/s median (min-max)", "padding fraction"],
        [
            [
                mode,
                harness.median_range(results[mode]["pairs_per_s"], ",.0f"),
                f"{results[mode]['padding_fraction']:.3f}",
            ]
            for mode in ("plain", "bucketed")
        ],
        title=f"{len(pairs):,} pairs, {args.rounds} rounds A B A B",
    )


if __name__ == "__main__":
    main()
