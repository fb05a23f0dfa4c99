"""Prints the trainable-parameter table of the README from real cells.

For each cell, size and rank: the size of the frozen recurrent kernel, the
LoRA factors that replace it as the trainable part, and their ratio.
Usage: python benchmarks/param_table.py   (a few seconds, any backend)
"""

import numpy as np

from keras_rnn_lora import LoRAGRUCell
from keras_rnn_lora import LoRALSTMCell
from keras_rnn_lora import LoRASimpleRNNCell

CELLS = {
    "SimpleRNN": LoRASimpleRNNCell,
    "GRU": LoRAGRUCell,
    "LSTM": LoRALSTMCell,
}
UNITS = (256, 512, 2048)
RANKS = (4, 8)
INPUT_DIM = 256


def size(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def main():
    print("| cell | units | rank | recurrent kernel | LoRA factors | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, cls in CELLS.items():
        for units in UNITS:
            for rank in RANKS:
                cell = cls(units, rank=rank)
                cell.build((None, INPUT_DIM))
                kernel = size([cell.recurrent_kernel])
                factors = size(cell.lora_weights)
                print(
                    f"| {name} | {units} | {rank} | {kernel:,} | "
                    f"{factors:,} | {100 * factors / kernel:.2f}% |"
                )


if __name__ == "__main__":
    main()
