"""The special token ids every part of the translator agrees on.

The SentencePiece models are trained with these ids fixed (see
`sentencepiece_models.train_sentencepiece`); the model masks `PAD_ID`, decoding
starts from `START_ID` and stops at `END_ID`. Defined here once, with no
TensorFlow import, so that the model and decoding can use them too.
"""

PAD_ID, UNK_ID, START_ID, END_ID = 0, 1, 2, 3
SPECIAL_TOKENS = {
    "[PAD]": PAD_ID,
    "[UNK]": UNK_ID,
    "[START]": START_ID,
    "[END]": END_ID,
}
