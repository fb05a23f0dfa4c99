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

import argparse
import json
import os

from keras_rnn_lora.measurement import in_fresh_process
from keras_rnn_lora.measurement import summary

RESULTS = os.path.join(os.path.dirname(__file__), "results")

LAYERS = {
    "stock GRU": "keras.layers.GRU(64)",
    "LoRAGRU": "keras_rnn_lora.LoRAGRU(64, rank=4)",
}

SCRIPT = """
import resource, sys, time
start = time.perf_counter()
import keras, numpy as np
import keras_rnn_lora
from keras_rnn_lora.measurement import report
layer = {layer}
layer(np.zeros((2, 5, 8), "float32"))
report({{
    "seconds": time.perf_counter() - start,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "tensorflow_imported": "tensorflow" in sys.modules,
}})
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    runs = {name: [] for name in LAYERS}
    for _ in range(args.rounds):
        for name, layer in LAYERS.items():
            runs[name].append(in_fresh_process(SCRIPT.format(layer=layer)))
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
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"cold_start_{backend}.json")
    with open(path, "w") as file:
        json.dump(
            {"backend": backend, "rounds": args.rounds, "layers": results},
            file,
            indent=2,
        )
    print(f"wrote {path}\n")
    print(f"| {backend} | seconds | peak RSS MB | imports TensorFlow |")
    print("|---|---:|---:|---|")
    for name, r in results.items():
        s, m = r["seconds"], r["peak_rss_mb"]
        print(
            f"| {name} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) "
            f"| {m['median']:.0f} ({m['min']:.0f}-{m['max']:.0f}) "
            f"| {'yes' if r['tensorflow_imported'] else 'no'} |"
        )


if __name__ == "__main__":
    main()
