"""The main job's data: the split in file order, the tokenizers, batches.

The training split is cut in file order into an initial part (the
pre-training data; its last `heldout_pairs` kept out) and the new data,
which arrives in `increments` chunks one after another (the last
`chunk_heldout_pairs` of each kept out). Held-out pairs are never trained
on: perplexity on them after every chunk is the forgetting matrix.
Validation (dev2010) chooses learning rates and epochs; the test set
(tst2010-2015) is only ever reported.
"""

import os

DATA_PARTS = ("initial", "validation")  # plus "chunk_1", "chunk_2", ...


def read_split(args, split, max_pairs=None):
    """`(en, de)` pairs in file order: straight from the release folder when
    there is one, else through the TFDS builder's download."""
    from keras_rnn_lora.translation import iwslt2017

    if args.data_dir:
        return iwslt2017.read_pairs(split, args.data_dir, max_pairs)
    from keras_rnn_lora.translation import iwslt2017_tfds

    dataset = iwslt2017_tfds.load_iwslt2017(split, max_pairs=max_pairs)
    return [
        (pair["en"].decode(), pair["de"].decode())
        for pair in dataset.as_numpy_iterator()
    ]


def data_fingerprint(args):
    """SHA-256 of the release files' content, or "download"."""
    from keras_rnn_lora.translation import iwslt2017

    if not args.data_dir:
        return "download"
    release = iwslt2017.find_release(args.data_dir)
    return iwslt2017.content_fingerprint(release)


class Split:
    """The pairs of every part of the protocol (see the module)."""

    def __init__(self, args):
        train = read_split(args, "train", args.max_pairs)
        cut = int(len(train) * args.pretrain_fraction)
        initial, new = train[:cut], train[cut:]
        self.heldout = {"initial": initial[len(initial) - args.heldout_pairs :]}
        self.initial = initial[: len(initial) - args.heldout_pairs]
        self.chunks = []
        size = len(new) // args.increments
        for i in range(args.increments):
            end = len(new) if i == args.increments - 1 else (i + 1) * size
            chunk = new[i * size : end]
            keep = len(chunk) - args.chunk_heldout_pairs
            self.chunks.append(chunk[:keep])
            self.heldout[f"chunk_{i + 1}"] = chunk[keep:]
        self.validation = read_split(args, "validation")
        self.test = read_split(args, "test", args.eval_pairs)
        if args.smoke:
            self.validation = self.validation[: args.eval_pairs]
        too_small = [
            name
            for name, pairs in (
                ("the initial part", self.initial),
                *((f"chunk {i + 1}", c) for i, c in enumerate(self.chunks)),
            )
            if len(pairs) < args.batch_size
        ]
        if too_small:
            raise SystemExit(
                f"Too little data for these settings: {', '.join(too_small)} "
                f"hold fewer pairs than one batch ({args.batch_size}). Use "
                "more pairs, fewer --increments or smaller held-out sets."
            )

    def sizes(self):
        return {
            "initial": len(self.initial),
            "chunks": [len(c) for c in self.chunks],
            "heldout": {k: len(v) for k, v in self.heldout.items()},
            "validation": len(self.validation),
            "test": len(self.test),
        }


def preprocessor(args, split):
    """The tokenizers, trained on the initial part only (the new data has
    not arrived when the base model is trained), once per run."""
    from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor

    directory = os.path.join(args.output_dir, "preprocessor")
    return TranslationPreprocessor.train(
        split.initial, directory, args.vocab_size, args.max_length
    )


def batches(args, preprocessor, pairs, shuffle, seed=0):
    """Bucketed batches of `pairs`, with their number of batches declared
    (see `TranslationPreprocessor.dataset`)."""
    return preprocessor.dataset(
        pairs, batch_size=args.batch_size, shuffle=shuffle, seed=seed
    )
