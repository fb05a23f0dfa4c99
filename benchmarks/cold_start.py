"""Cold start: a fresh process that imports Keras and one recurrent layer,
builds it and calls it once, `LoRAGRU` against the stock `keras.layers.GRU`.

What a user pays before the first step: wall time from the first import to
the first output, the process's peak resident memory, and whether
TensorFlow was imported (on torch and JAX it should not be: the layer has
nothing to do with it, but Keras' serializer imports it where installed).

Each run is a process of its own; the two layers alternate A B A B and the
figures are medians (min-max) over `--rounds`.
Writes benchmarks/results/cold_start_<backend>.json; Markdown table last.

Usage: KERAS_BACKEND=torch python benchmarks/cold_start.py [--rounds 5]
About half a minute per backend on a 2-core CPU.
"""

import harness

from keras_rnn_lora.measurement import summary

LAYERS = {
    "stock GRU": "keras.layers.GRU(64)",
    "LoRAGRU": "keras_rnn_lora.LoRAGRU(64, rank=4)",
}

SCRIPT = """
import resource, sys, time
start = time.perf_counter()
import keras, numpy as np
import keras_rnn_lora
layer = {layer}
layer(np.zeros((2, 5, 8), "float32"))
seconds = time.perf_counter() - start
from harness import report
report({{
    "seconds": seconds,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "tensorflow_imported": "tensorflow" in sys.modules,
}})
"""


def main():
    args = harness.parser(__doc__, rounds=5).parse_args()
    backend = harness.backend()
    runs = {name: [] for name in LAYERS}
    for _ in range(args.rounds):
        for name, layer in LAYERS.items():
            runs[name].append(
                harness.in_fresh_process(SCRIPT.format(layer=layer))
            )
    results = {
        name: {
            "seconds": summary(r["seconds"] for r in values),
            "peak_rss_mb": summary(r["peak_rss_mb"] for r in values),
            "tensorflow_imported": any(
                r["tensorflow_imported"] for r in values
            ),
        }
        for name, values in runs.items()
    }
    harness.write_results(
        f"cold_start_{backend}",
        {"backend": backend, "rounds": args.rounds, "layers": results},
    )
    harness.print_table(
        [backend, "seconds", "peak RSS MB", "imports TensorFlow"],
        [
            [
                name,
                harness.median_range(r["seconds"], ".2f"),
                harness.median_range(r["peak_rss_mb"], ".0f"),
                "yes" if r["tensorflow_imported"] else "no",
            ]
            for name, r in results.items()
        ],
        align="lrrl",
    )


if __name__ == "__main__":
    main()
