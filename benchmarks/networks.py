"""The networks, batches and steps several benchmark scripts measure.

The language-model-shaped network of `lora_vs_full.py`, `speed_targets.py`,
`scaling.py` and `profile_tf_step.py`: an embedding, two recurrent layers
and a `Dense` over the vocabulary (the translator minus its attention),
trained with `train_on_batch` on one fixed batch of token ids. Its modes,
all from the same initial weights (`build`):

- `full`: stock `keras.layers.GRU` layers, every weight trainable;
- `lora`: `LoRAGRU` layers (what `enable_lora` makes of `GRU` layers),
  LoRA factors only;
- `lora_cell`: `keras.layers.RNN(LoRAGRUCell)`, LoRA factors only (Keras'
  generic RNN loop over the cell);
- `merge_each_step`: a LoRA cell in `keras.layers.RNN` that forms
  `W + s*A@B` at every step (how Keras' Dense LoRA works), LoRA factors
  only;
- `floor`: stock layers with only the first RNN's bias trainable. The
  gradient still flows back through the whole network, but there is no
  LoRA matmul and no large weight gradient: what any LoRA step must pay at
  least;
- `lora_bf16`: `enable_lora(..., base_dtype="bfloat16")` on the `full`
  model: frozen weights stored and computed in bfloat16, LoRA factors and
  their branch in float32.

Also the paper's own PyTorch LoRA Elman RNN and our `LoRASimpleRNN` model
on the same work (`paper_loop_steps`, torch only), and the default
translator's compiled greedy decoder (`greedy_decoder`).
"""

import functools

import harness
import numpy as np

from keras_rnn_lora import measurement
from keras_rnn_lora.measurement import PeakMemory
from keras_rnn_lora.measurement import ratio_summary

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
RANK = 8
INFERENCE_CALLS = 5  # forward passes per timed inference sample


def build(mode, size, seed=0):
    """The compiled network of `mode` (see the module's docstring) at
    `size` (one of `SIZES`)."""
    import keras

    import keras_rnn_lora

    keras.utils.set_random_seed(seed)
    if mode == "lora_bf16":
        model = keras_rnn_lora.enable_lora(
            build("full", size, seed), rank=RANK, base_dtype="bfloat16"
        )
        keras_rnn_lora.mark_only_lora_as_trainable(model)
        return compile_model(model)
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
    return compile_model(model)


def compile_model(model):
    """Adam and sparse cross-entropy on logits."""
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
    """One fixed batch of token ids and targets for `size`."""
    rng = np.random.default_rng(seed)
    shape = (size["batch"], size["T"])
    x = rng.integers(1, size["vocab"], shape).astype("int32")
    y = rng.integers(1, size["vocab"], shape).astype("int32")
    return x, y


def step_times(size, modes, rounds):
    """Training-step seconds of every mode in `modes` at `size`:
    `measurement.interleaved_times` (two warm-up steps each, then one step
    per mode a round, the order rotated every round).

    Returns:
        `(times, models)`: `{mode: [seconds per round]}` and the models.
    """
    x, y = batch(size)
    models = {mode: build(mode, size) for mode in modes}
    steps = {
        mode: functools.partial(model.train_on_batch, x, y)
        for mode, model in models.items()
    }
    return measurement.interleaved_times(steps, rounds), models


def inference_ratio(size, rounds):
    """Forward time of a merged LoRA model over the same stock model: the
    `LoRAGRU` layers `enable_lora` makes of `GRU` layers, merged, against
    the stock `GRU` layers, `INFERENCE_CALLS` forward passes a sample (one
    is a few ms, the scale of the machine's noise)."""
    import keras_rnn_lora

    base = build("full", size)
    lora_model = build("lora", size)
    keras_rnn_lora.merge_lora(lora_model)
    x, _ = batch(size)

    def predict(model):
        def run():
            for _ in range(INFERENCE_CALLS):
                model.predict_on_batch(x)

        return run

    times = measurement.interleaved_times(
        {"merged": predict(lora_model), "base": predict(base)}, rounds
    )
    return ratio_summary(times, "merged", "base")


def peak_memory(mode, size_name, steps=3):
    """Peak resident memory (MB above the built model) of `steps`
    training steps of one mode, in a fresh process."""
    script = (
        "import sys, harness, networks\n"
        "harness.report(networks.measure_peak(*sys.argv[1:]))\n"
    )
    return harness.in_fresh_process(script, mode, size_name, steps)


def measure_peak(mode, size_name, steps):
    """`peak_memory`'s measurement, in this process."""
    size = SIZES[size_name]
    model = build(mode, size)
    x, y = batch(size)
    with PeakMemory() as memory:
        for _ in range(int(steps)):
            model.train_on_batch(x, y)
    return memory.peak_mb


# -- the paper's own PyTorch loop --------------------------------------------


def paper_loop_ratios(rounds):
    """Our `LoRASimpleRNN` model's step over the paper's PyTorch loop's,
    on the same work (`paper_loop_steps`), interleaved."""
    times = measurement.interleaved_times(paper_loop_steps(), rounds)
    return {
        "ours / paper torch loop": ratio_summary(times, "ours", "paper"),
        "ours with Keras' 3D loss / paper torch loop": ratio_summary(
            times, "ours_keras_3d_loss", "paper"
        ),
    }


def paper_loop_steps():
    """Training-step functions of the paper's PyTorch LoRA Elman RNN
    (`paper`) and of our `LoRASimpleRNN` model on the same work (`ours`,
    the loss on flattened logits as the paper computes it;
    `ours_keras_3d_loss`, Keras' loss on 3D logits): 2 layers, hidden 512,
    rank 4, vocabulary 8,000, T=30, batch 16. Torch backend only."""
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


# -- decoding -----------------------------------------------------------------


def greedy_decoder(steps, vocab=8000, seed=0):
    """`build_translator`'s default over `vocab` tokens a side (random
    weights) and its `compiled_decoder` for `steps` tokens."""
    import keras

    from keras_rnn_lora.translation import build_translator
    from keras_rnn_lora.translation import compiled_decoder

    keras.utils.set_random_seed(seed)
    model = build_translator(vocab, vocab)
    return model, compiled_decoder(model, max_length=steps)


def source_sentences(count, length=20, vocab=8000, seed=0):
    """`count` random source sentences of `length` token ids."""
    rng = np.random.default_rng(seed)
    return rng.integers(4, vocab, (count, length)).astype("int32")
