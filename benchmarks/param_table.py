"""Prints the trainable-parameter table of docs/performance.md from real
cells.

For each cell, size and rank: the size of the frozen recurrent kernel, the
LoRA factors that replace it as the trainable part, and their ratio. A
count, not a measurement: it writes no JSON.

Usage: python benchmarks/param_table.py   (a few seconds, any backend)
"""

import harness

from keras_rnn_lora import LoRAGRUCell
from keras_rnn_lora import LoRALSTMCell
from keras_rnn_lora import LoRASimpleRNNCell
from keras_rnn_lora import count_parameters

CELLS = {
    "SimpleRNN": LoRASimpleRNNCell,
    "GRU": LoRAGRUCell,
    "LSTM": LoRALSTMCell,
}
UNITS = (256, 512, 2048)
RANKS = (4, 8)
INPUT_DIM = 256


def main():
    harness.parser(__doc__).parse_args()
    rows = []
    for name, cls in CELLS.items():
        for units in UNITS:
            for rank in RANKS:
                cell = cls(units, rank=rank)
                cell.build((None, INPUT_DIM))
                kernel = count_parameters([cell.recurrent_kernel])
                factors = count_parameters(cell.lora_weights)
                rows.append(
                    [
                        name,
                        units,
                        rank,
                        f"{kernel:,}",
                        f"{factors:,}",
                        f"{100 * factors / kernel:.2f}%",
                    ]
                )
    harness.print_table(
        ["cell", "units", "rank", "recurrent kernel", "LoRA factors", "ratio"],
        rows,
    )


if __name__ == "__main__":
    main()
