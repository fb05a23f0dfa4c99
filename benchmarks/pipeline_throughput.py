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

import argparse
import json
import os
import statistics
import time

from keras_rnn_lora.translation import iwslt2017_tfds
from keras_rnn_lora.translation import read_pairs
from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor
from keras_rnn_lora.translation.preprocessing import padding_fraction

RESULTS = os.path.join(os.path.dirname(__file__), "results")


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--data-dir", default=os.environ.get("IWSLT2017_DIR"))
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
            "pairs_per_s_median": statistics.median(values),
            "pairs_per_s_min": min(values),
            "pairs_per_s_max": max(values),
            "padding_fraction": padding_fraction(datasets[mode]),
        }
        for mode, values in speeds.items()
    }
    results["config"] = {"pairs": len(pairs), "rounds": args.rounds}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "pipeline_throughput.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{len(pairs):,} pairs, {args.rounds} rounds A B A B\n")
    print("| batching | pairs/s median (min-max) | padding fraction |")
    print("|---|---:|---:|")
    for mode in ("plain", "bucketed"):
        r = results[mode]
        print(
            f"| {mode} | {r['pairs_per_s_median']:,.0f} "
            f"({r['pairs_per_s_min']:,.0f}-{r['pairs_per_s_max']:,.0f}) | "
            f"{r['padding_fraction']:.3f} |"
        )


if __name__ == "__main__":
    main()
