"""Serving latency of the exported SavedModel: merged vs unmerged LoRA graph.

Exports one LoRA translator twice (TensorFlow backend): merged (what
`export_translator` serves) and with the LoRA branch kept in the graph. Both
are loaded with `tf.saved_model.load` and called through `serving_default`,
alternating A B A B: single-sentence latency (p50, p95 over `--requests`
calls per round) and batch-of-64 throughput (sentences/s).
Writes benchmarks/results/serving_latency.json; the Markdown table last.

Usage: KERAS_BACKEND=tensorflow python benchmarks/serving_latency.py
About two minutes on a 2-core CPU (default-size translator, random weights,
`--max-length` 20 decoding steps).
"""

import os
import statistics
import tempfile
import time

import harness
import numpy as np

SENTENCE = "And it's truly a great honor to have the opportunity to come here."


def main():
    parser = harness.parser(__doc__, rounds=5, data_dir=True)
    parser.add_argument("--requests", type=harness.positive_int, default=20)
    parser.add_argument("--max-length", type=harness.positive_int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf

    import keras_rnn_lora
    from keras_rnn_lora.translation import build_translator
    from keras_rnn_lora.translation import export_translator
    from keras_rnn_lora.translation import read_pairs
    from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor
    from keras_rnn_lora.walk import lora_weight_ids

    keras.utils.set_random_seed(0)
    pairs = read_pairs("train", args.data_dir, max_pairs=5000)
    root = tempfile.mkdtemp()
    preprocessor = TranslationPreprocessor.train(
        pairs, os.path.join(root, "tok"), max_length=args.max_length
    )
    vocab = preprocessor.vocab_size
    translator = build_translator(vocab, vocab)
    translator([np.ones((1, 4), "int32"), np.ones((1, 4), "int32")])
    model = keras_rnn_lora.enable_lora(translator, rank=8)
    factors = lora_weight_ids(model)
    rng = np.random.default_rng(0)
    for weight in model.weights:
        if id(weight) in factors:  # non-zero factors: a real delta
            weight.assign(rng.normal(size=weight.shape) * 0.05)
    serve = {}
    for mode, merge in (("merged", True), ("unmerged", False)):
        path = export_translator(
            model, preprocessor, root, name=mode, merge=merge
        )
        serve[mode] = tf.saved_model.load(path).signatures["serving_default"]
    single = tf.constant([SENTENCE])
    batch = tf.constant([p[0] for p in pairs[:64]])
    for fn in serve.values():  # warm-up
        fn(text=single), fn(text=batch)
    latencies = {mode: [] for mode in serve}
    throughput = {mode: [] for mode in serve}
    for _ in range(args.rounds):
        for mode, fn in serve.items():
            for _ in range(args.requests):
                start = time.perf_counter()
                fn(text=single)["translation"].numpy()
                latencies[mode].append(time.perf_counter() - start)
            start = time.perf_counter()
            fn(text=batch)["translation"].numpy()
            throughput[mode].append(64 / (time.perf_counter() - start))
    results = {}
    for mode in serve:
        ms = sorted(1000 * t for t in latencies[mode])
        results[mode] = {
            "p50_ms": ms[len(ms) // 2],
            "p95_ms": ms[int(len(ms) * 0.95)],
            "batch64_sentences_per_s": statistics.median(throughput[mode]),
        }
    results["merged_over_unmerged_p50"] = (
        results["merged"]["p50_ms"] / results["unmerged"]["p50_ms"]
    )
    harness.write_results("serving_latency", results)
    print(f"merged / unmerged p50: {results['merged_over_unmerged_p50']:.3f}")
    harness.print_table(
        ["graph", "p50 ms", "p95 ms", "batch 64 sentences/s"],
        [
            [
                mode,
                f"{results[mode]['p50_ms']:.1f}",
                f"{results[mode]['p95_ms']:.1f}",
                f"{results[mode]['batch64_sentences_per_s']:.1f}",
            ]
            for mode in serve
        ],
        title=f"{args.rounds} rounds A B A B, {args.max_length} decode steps",
    )


if __name__ == "__main__":
    main()
