"""Subword tokenizers and `tf.data` pipelines for translation.

Tokenizers are SentencePiece unigram models, trained with the
`sentencepiece` trainer (it is what fixes the special ids below and full
character coverage) and loaded with keras-nlp's `SentencePieceTokenizer`,
which runs TF Text's SentencePiece op: usable inside `tf.data`, inside a
`tf.function` and inside a SavedModel that TensorFlow Serving loads.
"""

import io
import os

import keras_hub
import sentencepiece
import tensorflow as tf

PAD_ID, UNK_ID, START_ID, END_ID = 0, 1, 2, 3
SPECIAL_TOKENS = {"[PAD]": PAD_ID, "[UNK]": UNK_ID, "[START]": START_ID}
SPECIAL_TOKENS["[END]"] = END_ID
DEFAULT_VOCAB_SIZE = 8000


def train_sentencepiece(lines, model_path, vocab_size=DEFAULT_VOCAB_SIZE):
    """Trains a unigram SentencePiece model on `lines` and writes it to
    `model_path` (atomically). Ids: `[PAD]`=0, `[UNK]`=1, `[START]`=2,
    `[END]`=3; every character of the data is covered."""
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError("Received no text to train a tokenizer on (`lines`).")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=1.0,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=START_ID,
        eos_id=END_ID,
        pad_piece="[PAD]",
        unk_piece="[UNK]",
        bos_piece="[START]",
        eos_piece="[END]",
        # Small corpora cannot always fill the vocabulary: shrink, don't fail.
        hard_vocab_limit=False,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    temporary = f"{model_path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as file:
        file.write(model.getvalue())
    os.replace(temporary, model_path)
    return model_path


def load_tokenizer(model_path):
    """A keras-nlp `SentencePieceTokenizer` for a model file."""
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"No SentencePiece model at {model_path}")
    return keras_hub.tokenizers.SentencePieceTokenizer(proto=model_path)


def get_tokenizers(
    pairs, directory, vocab_size=DEFAULT_VOCAB_SIZE, languages=("en", "de")
):
    """English and German tokenizers for `pairs`, trained once and reused.

    Args:
        pairs: `(en, de)` training pairs (a list of tuples of str).
        directory: where the models live (`spm_en_<vocab>.model`, ...): next
            to the prepared data. Present files are reused, not retrained.
        vocab_size: per language.

    Returns:
        `(source_tokenizer, target_tokenizer)`.
    """
    tokenizers = []
    for index, language in enumerate(languages):
        path = os.path.join(directory, f"spm_{language}_{vocab_size}.model")
        if not os.path.isfile(path):
            train_sentencepiece([p[index] for p in pairs], path, vocab_size)
        tokenizers.append(load_tokenizer(path))
    return tuple(tokenizers)


def _tokenize_pair(src_tokenizer, tgt_tokenizer, max_length):
    def tokenize(en, de):
        source = src_tokenizer(en)[:max_length]
        target = tgt_tokenizer(de)[: max_length - 1]
        start = tf.constant([START_ID], tf.int32)
        end = tf.constant([END_ID], tf.int32)
        return (
            tf.cast(source, tf.int32),
            tf.concat([start, tf.cast(target, tf.int32)], 0),
            tf.concat([tf.cast(target, tf.int32), end], 0),
        )

    return tokenize


def make_translation_dataset(
    pairs,
    src_tokenizer,
    tgt_tokenizer,
    *,
    batch_size=64,
    max_length=64,
    shuffle=True,
    seed=0,
    bucket_boundaries=(8, 12, 16, 20, 24, 32, 40, 48),
    cache=True,
    drop_remainder=False,
):
    """A `tf.data` pipeline from string pairs to translation batches.

    Yields `((encoder_tokens, decoder_inputs), decoder_targets)`, int32,
    padded with 0. `decoder_inputs` is `[START] + target` and
    `decoder_targets` is `target + [END]`. Sequences longer than
    `max_length` tokens are truncated; pairs with an empty side are dropped.
    With `bucket_boundaries` (lengths) batches group pairs of similar
    length, so they carry little padding; `None` pads to each batch's
    longest pair instead.

    Args:
        pairs: a `tf.data.Dataset` of `{"en": ..., "de": ...}` strings, or a
            list of `(en, de)` tuples.
        src_tokenizer, tgt_tokenizer: tokenizers from `get_tokenizers`.
        batch_size, max_length, shuffle, seed, bucket_boundaries, cache,
        drop_remainder: as their names say; shuffling is seeded.
    """
    if max_length < 2:
        raise ValueError(
            "Received an invalid value for `max_length`, expected an "
            f"integer >= 2. Received: max_length={max_length!r}"
        )
    if isinstance(pairs, (list, tuple)):
        en = [p[0] for p in pairs]
        de = [p[1] for p in pairs]
        dataset = tf.data.Dataset.from_tensor_slices((en, de))
    else:
        dataset = pairs.map(lambda pair: (pair["en"], pair["de"]))
    tokenize = _tokenize_pair(src_tokenizer, tgt_tokenizer, max_length)
    dataset = dataset.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.filter(
        lambda src, dec_in, dec_out: tf.logical_and(
            tf.size(src) > 0, tf.size(dec_in) > 1
        )
    )
    if cache:
        dataset = dataset.cache()
    if shuffle:
        dataset = dataset.shuffle(
            10_000, seed=seed, reshuffle_each_iteration=True
        )
    if bucket_boundaries:
        boundaries = [b for b in bucket_boundaries if b <= max_length]
        dataset = dataset.bucket_by_sequence_length(
            lambda src, dec_in, dec_out: tf.maximum(
                tf.size(src), tf.size(dec_in)
            ),
            bucket_boundaries=boundaries,
            bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
            padded_shapes=([None], [None], [None]),
            padding_values=(PAD_ID, PAD_ID, PAD_ID),
            drop_remainder=drop_remainder,
        )
    else:
        dataset = dataset.padded_batch(
            batch_size,
            padded_shapes=([None], [None], [None]),
            padding_values=(PAD_ID, PAD_ID, PAD_ID),
            drop_remainder=drop_remainder,
        )
    dataset = dataset.map(lambda src, dec_in, dec_out: ((src, dec_in), dec_out))
    return dataset.prefetch(tf.data.AUTOTUNE)


def padding_fraction(dataset):
    """The fraction of padding tokens in a dataset's source and target."""
    pad = total = 0
    for (src, dec_in), _ in dataset:
        for tensor in (src, dec_in):
            pad += int(tf.reduce_sum(tf.cast(tensor == PAD_ID, tf.int64)))
            total += int(tf.size(tensor))
    return pad / total if total else 0.0
