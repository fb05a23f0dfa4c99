"""Training cost of LoRA against full fine-tuning, on the current backend.

The work: a recurrent language-model-shaped network of the translator's
sizes (embedding, two recurrent layers, a `Dense` over the vocabulary; the
translator minus its attention), trained with `train_on_batch` on one fixed
batch of token ids. Modes, all from the same initial weights:

- `full`: stock `keras.layers.GRU` layers, every weight trainable;
- `lora`: `LoRAGRU` layers (what `enable_lora` makes of `GRU` layers),
  LoRA factors only: the LoRA arm, set against `full` and `floor`, which use
  the stock `GRU` layer;
- `lora_cell`: `keras.layers.RNN(LoRAGRUCell)`, LoRA factors only (Keras'
  generic RNN loop over the cell);
- `merge_each_step`: a LoRA cell in `keras.layers.RNN` that forms
  `W + s*A@B` at every step (how Keras' Dense LoRA works), LoRA factors
  only: set against `lora_cell`, the same loop;
- `floor`: stock layers with only the first RNN's bias trainable. The
  gradient still flows back through the whole network, but there is no LoRA
  matmul and no large weight gradient: what any LoRA step must pay at least.
- `lora_bf16`: `enable_lora(..., base_dtype="bfloat16")` on the `full`
  model: frozen weights stored and computed in bfloat16, LoRA factors and
  their branch in float32.

Step time is measured as ratios inside one process: each round runs every
mode once (A B C ..., warm-up first), and each ratio is the median over
rounds of per-round ratios. Peak memory per mode runs in its own
subprocess (resident memory above the idle process, after building the
model). Inference: a merged LoRA model's forward time over the stock model's.
On the torch backend the script also times the paper's own PyTorch loop on
Elman-RNN work (2 layers, hidden 512, rank 4, vocab 8000, T=30, batch 16)
against our `LoRASimpleRNN` model on the same work.

Writes benchmarks/results/lora_vs_full_<backend>_<size>.json and prints a
Markdown table last.

Usage: KERAS_BACKEND=tensorflow python benchmarks/lora_vs_full.py
       [--size default|paper] [--rounds 7]
About 2-4 minutes per backend at the default size on a 2-core CPU.
`--size paper` is hidden 2048 with embedding 512, scaled down to batch 16
and 20 steps to fit a CPU run.
"""

import argparse
import functools
import json
import os
import statistics

import numpy as np

from keras_rnn_lora import measurement
from keras_rnn_lora.measurement import PeakMemory
from keras_rnn_lora.measurement import ratio_summary

RESULTS = os.path.join(os.path.dirname(__file__), "results")
SIZES = {
    "default": {
        "vocab": 8000,
        "embed": 128,
        "units": 256,
        "batch": 64,
        "T": 30,
    },
    "paper": {"vocab": 8000, "embed": 512, "units": 2048, "batch": 16, "T": 20},
}
# benchmarks/scaling.py: hidden 256 to 2048. The vocabulary stays; the
# embedding grows with the width up to the paper's 512; batch x length
# shrink as the width grows so one step stays within seconds on a 2-core CPU.
SCALING = {
    256: {"vocab": 8000, "embed": 256, "units": 256, "batch": 64, "T": 30},
    512: {"vocab": 8000, "embed": 512, "units": 512, "batch": 64, "T": 30},
    1024: {"vocab": 8000, "embed": 512, "units": 1024, "batch": 32, "T": 20},
    2048: {"vocab": 8000, "embed": 512, "units": 2048, "batch": 16, "T": 20},
}
SIZES.update({f"hidden{units}": size for units, size in SCALING.items()})
MODES = (
    "full",
    "lora",
    "lora_cell",
    "merge_each_step",
    "floor",
    "lora_bf16",
)
RANK = 8
INFERENCE_CALLS = 5  # forward passes per timed sample


def build(mode, size, seed=0):
    import keras

    import keras_rnn_lora

    keras.utils.set_random_seed(seed)
    if mode == "lora_bf16":
        model = keras_rnn_lora.enable_lora(
            build("full", size, seed), rank=RANK, base_dtype="bfloat16"
        )
        keras_rnn_lora.mark_only_lora_as_trainable(model)
        return _compile(model)
    stock_layers = mode in ("full", "floor")
    inputs = keras.Input((size["T"],), dtype="int32")
    x = keras.layers.Embedding(size["vocab"], size["embed"])(inputs)
    for i in range(2):
        if stock_layers:
            layer = keras.layers.GRU(size["units"], return_sequences=True)
        elif mode == "lora":
            layer = keras_rnn_lora.LoRAGRU(
                size["units"], rank=RANK, return_sequences=True
            )
        else:
            cell_cls = (
                merge_each_step_cell_class()
                if mode == "merge_each_step"
                else keras_rnn_lora.LoRAGRUCell
            )
            layer = keras.layers.RNN(
                cell_cls(size["units"], rank=RANK), return_sequences=True
            )
        x = layer(x)
        if i == 0:
            first = layer
    model = keras.Model(inputs, keras.layers.Dense(size["vocab"])(x))
    if mode == "floor":
        for w in model.weights:
            w.trainable = w is first.cell.bias
    elif mode != "full":
        keras_rnn_lora.mark_only_lora_as_trainable(model)
    return _compile(model)


def _compile(model):
    import keras

    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def merge_each_step_cell_class():
    """A LoRA GRU cell that forms the full-size `W + s*A@B` at every step,
    the way `keras.layers.Dense` LoRA does, for comparison only."""
    from keras import ops

    import keras_rnn_lora

    class Cell(keras_rnn_lora.LoRAGRUCell):
        def _project(self, target, x, gates=None, training=False):
            kernel = self.effective_kernel(target)
            if gates is not None:
                start, stop, _ = gates.indices(self.gates)
                kernel = kernel[:, start * self.units : stop * self.units]
            return ops.matmul(x, kernel)

    return Cell


def batch(size, seed=1):
    rng = np.random.default_rng(seed)
    shape = (size["batch"], size["T"])
    x = rng.integers(1, size["vocab"], shape).astype("int32")
    y = rng.integers(1, size["vocab"], shape).astype("int32")
    return x, y


def interleaved_times(models, x, y, rounds):
    """Training-step seconds per mode: `measurement.interleaved_times` (two
    warm-up steps each, then one step per mode a round, the order rotated
    every round)."""
    steps = {
        mode: functools.partial(model.train_on_batch, x, y)
        for mode, model in models.items()
    }
    return measurement.interleaved_times(steps, rounds)


def step_ratios(size, rounds):
    models = {mode: build(mode, size) for mode in MODES}
    times = interleaved_times(models, *batch(size), rounds)
    params = {
        mode: sum(int(np.prod(w.shape)) for w in m.trainable_weights)
        for mode, m in models.items()
    }
    return times, params


def ratio(times, a, b):
    return ratio_summary(times, a, b)


def inference_ratio(size, rounds):
    """Forward time of a merged LoRA model over the same stock model: the
    `LoRAGRU` layers `enable_lora` makes of `GRU` layers, merged, against
    the stock `GRU` layers (so both take the backend's same GRU path)."""
    import keras_rnn_lora

    base = build("full", size)
    lora_model = build("lora", size)
    keras_rnn_lora.merge_lora(lora_model)
    x, _ = batch(size)

    def predict(model):
        # A few forward passes a sample: one is a few ms, the scale of the
        # machine's noise.
        def run():
            for _ in range(INFERENCE_CALLS):
                model.predict_on_batch(x)

        return run

    times = measurement.interleaved_times(
        {"merged": predict(lora_model), "base": predict(base)}, rounds
    )
    return ratio(times, "merged", "base")


def peak_memory(mode, size_name, steps=3):
    """Runs `steps` training steps of one mode in a fresh process."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import lora_vs_full as b\n"
        "from keras_rnn_lora.measurement import report\n"
        f"report(b.measure_peak(sys.argv[2], sys.argv[3], {steps}))\n"
    )
    return measurement.in_fresh_process(
        script, os.path.dirname(__file__), mode, size_name
    )


def measure_peak(mode, size_name, steps):
    size = SIZES[size_name]
    model = build(mode, size)
    x, y = batch(size)
    with PeakMemory() as memory:
        for _ in range(steps):
            model.train_on_batch(x, y)
    return memory.peak_mb


def paper_torch_loop(rounds):
    """The paper's PyTorch LoRA Elman RNN vs our LoRASimpleRNN, same work."""
    times = measurement.interleaved_times(paper_loop_steps(), rounds)
    return {
        "ours / paper torch loop": ratio(times, "ours", "paper"),
        "ours with Keras' 3D loss / paper torch loop": ratio(
            times, "ours_keras_3d_loss", "paper"
        ),
    }


def paper_loop_steps():
    """Training-step functions of the paper's PyTorch LoRA Elman RNN
    (`paper`) and of our `LoRASimpleRNN` model on the same work (`ours`,
    the loss on flattened logits as the paper computes it;
    `ours_keras_3d_loss`, Keras' loss on 3D logits). Torch backend only."""
    import keras
    import torch

    import keras_rnn_lora

    vocab, hidden, rank, steps, batch_size, layers = 8000, 512, 4, 30, 16, 2
    torch.manual_seed(0)

    class LoRARNNCell(torch.nn.Module):
        def __init__(self, inp):
            super().__init__()
            self.w_ih = torch.nn.Linear(inp, hidden)
            self.w_hh = torch.nn.Linear(hidden, hidden)
            self.a = torch.nn.Parameter(torch.randn(hidden, rank) * 0.01)
            self.b = torch.nn.Parameter(torch.zeros(rank, hidden))
            for p in (*self.w_ih.parameters(), *self.w_hh.parameters()):
                p.requires_grad = False

        def forward(self, x, h):
            lora = (h @ self.a) @ self.b * (rank / rank)
            return torch.tanh(self.w_ih(x) + self.w_hh(h) + lora)

    class PaperModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, hidden)
            self.cells = torch.nn.ModuleList(
                [LoRARNNCell(hidden) for _ in range(layers)]
            )
            self.out = torch.nn.Linear(hidden, vocab)
            self.embed.weight.requires_grad = False
            for p in self.out.parameters():
                p.requires_grad = False

        def forward(self, tokens):
            x = self.embed(tokens)
            for cell in self.cells:
                h = torch.zeros(tokens.shape[0], hidden)
                outputs = []
                for t in range(tokens.shape[1]):
                    h = cell(x[:, t], h)
                    outputs.append(h)
                x = torch.stack(outputs, 1)
            return self.out(x)

    paper = PaperModel()
    optimizer = torch.optim.Adam(
        [p for p in paper.parameters() if p.requires_grad]
    )
    rng = np.random.default_rng(0)
    x = rng.integers(1, vocab, (batch_size, steps))
    y = rng.integers(1, vocab, (batch_size, steps))
    tx, ty = torch.tensor(x), torch.tensor(y)

    def paper_step():
        optimizer.zero_grad()
        logits = paper(tx)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), ty.reshape(-1)
        )
        loss.backward()
        optimizer.step()

    def flat_cross_entropy(y_true, logits):
        # What the paper's loop computes: logits flattened to 2D first.
        return keras.losses.sparse_categorical_crossentropy(
            keras.ops.reshape(y_true, (-1,)),
            keras.ops.reshape(logits, (-1, vocab)),
            from_logits=True,
        )

    def ours(loss):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((steps,), dtype="int32")
        h = keras.layers.Embedding(vocab, hidden)(inputs)
        for _ in range(layers):
            h = keras_rnn_lora.LoRASimpleRNN(
                hidden, rank=rank, return_sequences=True
            )(h)
        model = keras.Model(inputs, keras.layers.Dense(vocab)(h))
        keras_rnn_lora.mark_only_lora_as_trainable(model)
        model.compile(optimizer="adam", loss=loss)
        return lambda: model.train_on_batch(x, y)

    x, y = x.astype("int32"), y.astype("int32")
    return {
        "paper": paper_step,
        "ours": ours(flat_cross_entropy),
        # Keras' loss on 3D logits: on torch it moves the class axis to 1
        # and takes the log-softmax over strided memory.
        "ours_keras_3d_loss": ours(
            keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        ),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    import keras

    backend = keras.backend.backend()
    size = SIZES[args.size]
    times, params = step_ratios(size, args.rounds)
    results = {
        "backend": backend,
        "size": {"name": args.size, **size, "rank": RANK},
        "rounds": args.rounds,
        "step_seconds_median": {
            m: statistics.median(t) for m, t in times.items()
        },
        "trainable_params": params,
        "ratios": {
            "lora / floor": ratio(times, "lora", "floor"),
            "lora / full": ratio(times, "lora", "full"),
            "floor / full": ratio(times, "floor", "full"),
            "lora_cell / lora": ratio(times, "lora_cell", "lora"),
            "merge_each_step / lora_cell": ratio(
                times, "merge_each_step", "lora_cell"
            ),
            "lora_bf16 / full": ratio(times, "lora_bf16", "full"),
        },
        "inference merged / base": inference_ratio(size, args.rounds),
    }
    if not args.skip_memory:
        results["peak_rss_mb"] = {
            mode: peak_memory(mode, args.size) for mode in MODES
        }
    if backend == "torch" and args.size == "default":
        results["ratios"].update(paper_torch_loop(args.rounds))
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"lora_vs_full_{backend}_{args.size}.json")
    with open(path, "w") as file:
        json.dump(results, file, indent=2)
    print(
        f"\n{backend}, size {args.size} {size}, rank {RANK}, "
        f"{args.rounds} rounds\n"
    )
    print("| mode | step ms (median) | trainable params | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for mode in MODES:
        peak = results.get("peak_rss_mb", {}).get(mode)
        print(
            f"| {mode} | {1000 * results['step_seconds_median'][mode]:.1f} | "
            f"{params[mode]:,} | {'-' if peak is None else f'{peak:.0f}'} |"
        )
    print("\n| ratio | median | min | max |")
    print("|---|---:|---:|---:|")
    rows = {
        **results["ratios"],
        "inference merged / base": results["inference merged / base"],
    }
    for name, r in rows.items():
        print(
            f"| {name} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} |"
        )


if __name__ == "__main__":
    main()
