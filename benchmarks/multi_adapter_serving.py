"""Serving many adapters from one SavedModel against one merged export each.

Exports the default-size LoRA translator (TensorFlow backend, rank 8,
random non-zero factors) as (a) the single-adapter merged SavedModel
`export_translator` writes by default, (b, c) one multi-adapter SavedModel
(`adapters="all"`, 4 adapters) and (d) the base translator without any
adapter. Each is loaded with `tf.saved_model.load` and called through
`serving_default`, interleaved A B C D every round:

- (a) merged: the default adapter folded into the kernels;
- (b) one adapter: the multi-adapter export, every example on "default";
- (c) mixed: the multi-adapter export, 4 adapters: a batch of 64 holds 16
  examples of each; single requests take them in turn;
- (d) base: the stock translator, no adapter.

Single-sentence latency (p50, p95 over `--requests` calls a round) and
batch-of-64 throughput; the ratios (b)/(a) and (c)/(a) per round (median,
min-max) against the goals (b) <= 1.05 and (c) <= 1.20. Every arm decodes
exactly `--max-length` steps: the base's `[END]` logit bias is set to
-1e4, so random weights never stop one arm earlier than another. Then the
size on disk of a multi-adapter SavedModel with K = 1, 4, 16 adapters
against K merged exports (one measured, times K: they are the same graph
with other values). Records the load average before and after.
Writes benchmarks/results/multi_adapter_serving.json; the Markdown table
last.

Usage: KERAS_BACKEND=tensorflow python benchmarks/multi_adapter_serving.py
About four minutes on a 2-core CPU (most of it exporting).
"""

import os
import statistics
import tempfile
import time

import harness
import numpy as np

from keras_rnn_lora.measurement import summary

SENTENCE = "And it's truly a great honor to have the opportunity to come here."
RANK = 8
MIXED = 4  # adapters in the mixed arm and in the timed export
SIZES_K = (1, 4, 16)
GOALS = {"one_adapter": 1.05, "mixed": 1.20}
ARMS = ("merged", "one_adapter", "mixed", "base")


def main():
    parser = harness.parser(__doc__, rounds=7, data_dir=True)
    parser.add_argument("--requests", type=harness.positive_int, default=20)
    parser.add_argument("--max-length", type=harness.positive_int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf

    from keras_rnn_lora.translation import build_translator
    from keras_rnn_lora.translation import read_pairs
    from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor

    load_before = os.getloadavg()
    keras.utils.set_random_seed(0)
    pairs = read_pairs("train", args.data_dir, max_pairs=5000)
    root = tempfile.mkdtemp()
    preprocessor = TranslationPreprocessor.train(
        pairs, os.path.join(root, "tok"), max_length=args.max_length
    )
    vocab = preprocessor.vocab_size
    base = build_translator(vocab, vocab)
    base([np.ones((1, 4), "int32"), np.ones((1, 4), "int32")])
    never_end(base)
    exports = export_arms(base, preprocessor, root)
    serve = {
        arm: tf.saved_model.load(path).signatures["serving_default"]
        for arm, path in exports.items()
    }
    adapters = {
        "merged": None,
        "one_adapter": ["default"],
        "mixed": adapter_names(MIXED),
        "base": None,
    }
    calls = {arm: caller(serve[arm], adapters[arm]) for arm in ARMS}
    batch = [p[0] for p in pairs[:64]]
    steps = {
        arm: decoded_steps(exports[arm], batch, adapters[arm]) for arm in ARMS
    }
    latencies, batch_times = measure(calls, batch, args)
    results = summarize(latencies, batch_times)
    results["decode_steps"] = steps
    results["sizes"] = sizes_on_disk(base, preprocessor, root)
    results["settings"] = {
        "rank": RANK,
        "units": 256,
        "vocab": vocab,
        "max_length": args.max_length,
        "rounds": args.rounds,
        "requests": args.requests,
        "mixed_adapters": MIXED,
    }
    results["load_average"] = {
        "before": list(load_before),
        "after": list(os.getloadavg()),
    }
    harness.write_results("multi_adapter_serving", results)
    print_tables(results, args)


def never_end(model):
    """Sets the `[END]` logit's bias to -1e4 (see module)."""
    from keras_rnn_lora.translation.tokens import END_ID

    (bias,) = [w for w in model.weights if w.path == "logits/bias"]
    value = keras_numpy(bias)
    value[END_ID] = -1e4
    bias.assign(value)


def keras_numpy(x):
    import keras

    return np.array(keras.ops.convert_to_numpy(x))


def adapter_names(count):
    return ["default", *(f"a{i}" for i in range(1, count))]


def lora_translator(base, count, seed=0):
    """`base` with `count` adapters (rank 8), every factor random."""
    import keras_rnn_lora
    from keras_rnn_lora.walk import lora_adapters

    model = keras_rnn_lora.enable_lora(base, rank=RANK)
    for name in adapter_names(count)[1:]:
        keras_rnn_lora.add_adapter(model, name)
    rng = np.random.default_rng(seed)
    for adapter in lora_adapters(model).values():
        for name in adapter_names(count):
            adapter.set_adapter_values(
                name,
                {
                    factor: rng.normal(size=shape) * 0.05
                    for factor, shape in adapter.adapter_shapes(name).items()
                },
            )
    return model


def export_arms(base, preprocessor, root):
    """`{arm: SavedModel path}`: merged, multi-adapter (for both "one
    adapter" and "mixed"), base."""
    from keras_rnn_lora.translation import export_translator

    model = lora_translator(base, MIXED)
    merged = export_translator(model, preprocessor, root, name="merged")
    multi = export_translator(
        model, preprocessor, root, name=f"multi{MIXED}", adapters="all"
    )
    plain = export_translator(base, preprocessor, root, name="base")
    return {
        "merged": merged,
        "one_adapter": multi,
        "mixed": multi,
        "base": plain,
    }


def request_adapters(names, size):
    """The `adapter` input of a request of `size` examples: `names` in
    turn."""
    return [names[i % len(names)] for i in range(size)]


def caller(serve, names):
    """`call(texts, turn)`: one request; `turn` rotates which adapter a
    single-example request of the mixed arm takes."""
    import tensorflow as tf

    def call(texts, turn=0):
        inputs = {"text": tf.constant(texts)}
        if names is not None:
            rotated = names[turn % len(names) :] + names[: turn % len(names)]
            inputs["adapter"] = tf.constant(
                request_adapters(rotated, len(texts))
            )
        return serve(**inputs)["translation"].numpy()

    return call


def decoded_steps(path, texts, names):
    """The tokens each row of a batch-64 request decodes (`[END]` never
    comes: all equal `max_length`), from `translate_tokens`."""
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    translate = loaded.signatures["translate_tokens"]
    ids = np.arange(4, 14, dtype="int32")[None].repeat(len(texts), 0)
    inputs = {"tokens": tf.constant(ids)}
    if names is not None:
        inputs["adapter"] = tf.constant(request_adapters(names, len(texts)))
    tokens = translate(**inputs)["tokens"].numpy()
    lengths = (tokens != 0).sum(axis=1)
    return {"min": int(lengths.min()), "max": int(lengths.max())}


def measure(calls, batch, args):
    """Interleaved rounds A B C D (the order rotated every round): per arm
    and round, `requests` single-sentence latencies and one batch-64
    time."""
    for call in calls.values():  # warm-up
        call([SENTENCE]), call(batch)
    latencies = {arm: [] for arm in ARMS}
    batch_times = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        shift = r % len(ARMS)
        for arm in ARMS[shift:] + ARMS[:shift]:
            times = []
            for i in range(args.requests):
                start = time.perf_counter()
                calls[arm]([SENTENCE], turn=i)
                times.append(time.perf_counter() - start)
            latencies[arm].append(times)
            start = time.perf_counter()
            calls[arm](batch)
            batch_times[arm].append(time.perf_counter() - start)
    return latencies, batch_times


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def summarize(latencies, batch_times):
    results = {"arms": {}, "ratios": {}}
    for arm in ARMS:
        ms = [1000 * t for times in latencies[arm] for t in times]
        results["arms"][arm] = {
            "p50_ms": percentile(ms, 0.5),
            "p95_ms": percentile(ms, 0.95),
            "batch64_sentences_per_s": statistics.median(
                64 / t for t in batch_times[arm]
            ),
        }
    for arm in ARMS[1:]:
        p50 = [
            statistics.median(x) / statistics.median(y)
            for x, y in zip(latencies[arm], latencies["merged"], strict=True)
        ]
        batch = [
            x / y
            for x, y in zip(
                batch_times[arm], batch_times["merged"], strict=True
            )
        ]
        results["ratios"][f"{arm}_over_merged"] = {
            "p50_latency": summary(p50),
            "batch64_time": summary(batch),
            "goal": GOALS.get(arm),
        }
        if arm in GOALS:
            within = statistics.median(p50) <= GOALS[arm]
            results["ratios"][f"{arm}_over_merged"]["p50_within_goal"] = within
    return results


def folder_bytes(path):
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(path)
        for name in names
    )


def sizes_on_disk(base, preprocessor, root):
    """Bytes of a multi-adapter SavedModel with K adapters, and of K merged
    exports (one measured, times K)."""
    from keras_rnn_lora.translation import export_translator

    one = lora_translator(base, 1)
    merged = folder_bytes(
        export_translator(one, preprocessor, root, name="size_merged")
    )
    sizes = {"merged_export_bytes": merged, "by_adapters": {}}
    for k in SIZES_K:
        model = one if k == 1 else lora_translator(base, k)
        path = export_translator(
            model, preprocessor, root, name=f"size_multi{k}", adapters="all"
        )
        multi = folder_bytes(path)
        sizes["by_adapters"][str(k)] = {
            "multi_adapter_bytes": multi,
            "separate_merged_bytes": k * merged,
            "multi_over_separate": multi / (k * merged),
        }
    return sizes


def print_tables(results, args):
    arms, ratios = results["arms"], results["ratios"]
    names = {
        "merged": "(a) merged, one adapter",
        "one_adapter": "(b) multi-adapter export, one adapter",
        "mixed": f"(c) multi-adapter export, {MIXED} adapters mixed",
        "base": "(d) base, no adapter",
    }
    rows = []
    for arm in ARMS:
        ratio = ratios.get(f"{arm}_over_merged")
        rows.append(
            [
                names[arm],
                f"{arms[arm]['p50_ms']:.1f}",
                f"{arms[arm]['p95_ms']:.1f}",
                f"{arms[arm]['batch64_sentences_per_s']:.1f}",
                "1"
                if ratio is None
                else harness.median_range(ratio["p50_latency"]),
                "1"
                if ratio is None
                else harness.median_range(ratio["batch64_time"]),
                "" if not ratio or not ratio["goal"] else f"<= {ratio['goal']}",
            ]
        )
    harness.print_table(
        [
            "arm",
            "p50 ms",
            "p95 ms",
            "batch 64 sentences/s",
            "p50 / (a)",
            "batch 64 time / (a)",
            "goal",
        ],
        rows,
        title=f"{args.rounds} rounds A B C D, {args.max_length} decode steps",
    )
    sizes = results["sizes"]["by_adapters"]
    harness.print_table(
        [
            "adapters K",
            "one multi-adapter SavedModel MB",
            "K merged MB",
            "ratio",
        ],
        [
            [
                k,
                f"{s['multi_adapter_bytes'] / 1e6:.2f}",
                f"{s['separate_merged_bytes'] / 1e6:.2f}",
                f"{s['multi_over_separate']:.3f}",
            ]
            for k, s in sizes.items()
        ],
        title="Size on disk",
    )


if __name__ == "__main__":
    main()
