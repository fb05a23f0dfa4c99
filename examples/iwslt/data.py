"""The main job's data: the split in file order, the tokenizers, batches.

The training split is cut in file order into an initial part (the
pre-training data; its last `heldout_pairs` kept out) and the new data,
which arrives in `increments` chunks one after another (the last
`chunk_heldout_pairs` of each kept out). Held-out pairs are never trained
on: perplexity on them after every chunk is the forgetting matrix.
Validation (dev2010) chooses learning rates and epochs; the test set
(tst2010-2015) is only ever reported.
"""

import contextlib
import os

from iwslt.multiworker import full_batches

DATA_PARTS = ("initial", "validation")  # plus "chunk_1", "chunk_2", ...


class DataRefused(Exception):
    """The data cannot serve these settings; the message (one line) names
    the file or the settings to change."""


@contextlib.contextmanager
def _refusing_bad_data(args):
    """Turns an error in the release files into `DataRefused` naming
    `--data-dir` and the file (the first line of the reader's message)."""
    from keras_rnn_lora.translation.iwslt2017 import IWSLTDataError

    try:
        yield
    except IWSLTDataError as error:
        first_line = str(error).strip().splitlines()[0]
        raise DataRefused(f"--data-dir {args.data_dir}: {first_line}") from None


def read_split(args, split, max_pairs=None):
    """`(en, de)` pairs in file order: straight from the release folder when
    there is one, else through the TFDS builder's download."""
    from keras_rnn_lora.translation import iwslt2017

    if args.data_dir:
        with _refusing_bad_data(args):
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
    with _refusing_bad_data(args):
        release = iwslt2017.find_release(args.data_dir)
        return iwslt2017.content_fingerprint(release)


class Split:
    """The pairs of every part of the protocol (see the module)."""

    def __init__(self, args):
        train = read_split(args, "train", args.max_pairs)
        cut = int(len(train) * args.pretrain_fraction)
        initial, new = train[:cut], train[cut:]
        # Never below 0: a negative cut would count from the end instead.
        keep = max(0, len(initial) - args.heldout_pairs)
        self.heldout = {"initial": initial[keep:]}
        self.initial = initial[:keep]
        self.chunks = []
        size = len(new) // args.increments
        for i in range(args.increments):
            end = len(new) if i == args.increments - 1 else (i + 1) * size
            chunk = new[i * size : end]
            keep = max(0, len(chunk) - args.chunk_heldout_pairs)
            self.chunks.append(chunk[:keep])
            self.heldout[f"chunk_{i + 1}"] = chunk[keep:]
        self.validation = read_split(args, "validation")
        self.test = read_split(args, "test", args.eval_pairs)
        if args.smoke:
            self.validation = self.validation[: args.eval_pairs]
        _refuse_small_parts(args, self.initial, self.chunks, len(new))

    def sizes(self):
        return {
            "initial": len(self.initial),
            "chunks": [len(c) for c in self.chunks],
            "heldout": {k: len(v) for k, v in self.heldout.items()},
            "validation": len(self.validation),
            "test": len(self.test),
        }


def _refuse_small_parts(args, initial, chunks, new_pairs):
    """Raises `DataRefused` if a part to train on holds less than one batch,
    naming the settings that would make it fit."""
    batch = args.batch_size
    advice = []
    if len(initial) < batch:
        advice.append(
            f"a smaller --heldout-pairs (now {args.heldout_pairs}), a larger "
            f"--pretrain-fraction (now {args.pretrain_fraction})"
        )
    small_chunks = [i + 1 for i, c in enumerate(chunks) if len(c) < batch]
    if small_chunks:
        # Chunk i keeps new_pairs // increments pairs less its held-out ones.
        fits = new_pairs // (batch + args.chunk_heldout_pairs)
        advice.append(
            f"--increments {fits} or fewer (now {args.increments})"
            if fits
            else "a smaller --chunk-heldout-pairs (now "
            f"{args.chunk_heldout_pairs})"
        )
    if not advice:
        return
    if args.max_pairs is not None:
        advice.append(f"a larger --max-pairs (now {args.max_pairs})")
    parts = (["the initial part"] if len(initial) < batch else []) + [
        f"chunk {i}" for i in small_chunks[:3]
    ]
    if len(small_chunks) > 3:
        parts.append(f"{len(small_chunks) - 3} more chunks")
    raise DataRefused(
        f"Too little data for these settings: {', '.join(parts)} "
        f"{'holds' if len(parts) == 1 else 'hold'} fewer pairs than one "
        f"batch (--batch-size {batch}) once the held-out pairs are set "
        "aside; use " + ", ".join(advice) + " or a smaller --batch-size"
    )


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
    (see `TranslationPreprocessor.dataset`); full ones on a JAX cluster
    (`multiworker.full_batches`)."""
    dataset = preprocessor.dataset(
        pairs, batch_size=args.batch_size, shuffle=shuffle, seed=seed
    )
    return full_batches(args, dataset)
