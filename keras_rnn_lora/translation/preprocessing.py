"""Text <-> token ids for the translator, written once.

`TranslationPreprocessor` owns both SentencePiece models, the special ids,
`max_length` and where the models live on disk (keras-hub's
`Seq2SeqLMPreprocessor` is the model). Everything that turns text into ids
or ids into text goes through it: the `tf.data` training pipeline,
`evaluation.translate` and the TF Serving graph of `export`. Its TensorFlow
Text SentencePiece ops run eagerly, inside `tf.data` and inside a
SavedModel that TensorFlow Serving loads (which links TF Text in).

Tokenizers are SentencePiece unigram models trained with the
`sentencepiece` trainer (it is what fixes the special ids and full
character coverage). `source_tokenizer` / `target_tokenizer` give them as
keras-hub `SentencePieceTokenizer`s.
"""

import json
import os

import tensorflow as tf
import tensorflow_text as tf_text

from keras_rnn_lora import files
from keras_rnn_lora.checks import check_positive_int
from keras_rnn_lora.translation.sentencepiece_models import DEFAULT_VOCAB_SIZE
from keras_rnn_lora.translation.sentencepiece_models import train_sentencepiece
from keras_rnn_lora.translation.tokens import END_ID
from keras_rnn_lora.translation.tokens import PAD_ID
from keras_rnn_lora.translation.tokens import START_ID
from keras_rnn_lora.translation.tokens import UNK_ID

LANGUAGES = ("en", "de")
_CONFIG_FILE = "preprocessor.json"


class TranslationPreprocessor(tf.Module):
    """Both tokenizers of a translator, its special ids and `max_length`.

    Args:
        source_proto: the source SentencePiece model, serialized (bytes).
        target_proto: the target SentencePiece model, serialized (bytes).
        max_length: tokens kept per side (longer text is truncated) and the
            most tokens a translation may have.
        vocab_size: the vocabulary size the models were trained for (names
            their files on disk); default: the source model's size.
        languages: the source and target language codes (file names).

    Build one with `TranslationPreprocessor.train(pairs, directory)` (trains
    the models that are not on disk yet) or `.load(directory)`. On disk a
    directory holds `spm_<language>_<vocab_size>.model` per language and
    `preprocessor.json` with the settings.
    """

    pad_id, unk_id, start_id, end_id = PAD_ID, UNK_ID, START_ID, END_ID

    def __init__(
        self,
        source_proto,
        target_proto,
        max_length=64,
        vocab_size=None,
        languages=LANGUAGES,
    ):
        super().__init__(name="translation_preprocessor")
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            max_length = -1
        if max_length < 2:
            raise ValueError(
                "Received an invalid value for `max_length`, expected an "
                f"integer >= 2. Received: max_length={max_length!r}"
            )
        self.source_proto = bytes(source_proto)
        self.target_proto = bytes(target_proto)
        self.max_length = max_length
        self.languages = tuple(languages)
        self._make_tokenizers()
        self.vocab_size = vocab_size or self.source_vocabulary_size

    def _make_tokenizers(self):
        # Distinct names: a loaded SavedModel shares SentencePiece resources
        # by node name, so two unnamed tokenizers would become one.
        self._source = tf_text.SentencepieceTokenizer(
            model=self.source_proto,
            out_type=tf.int32,
            name="source_sentencepiece",
        )
        self._target = tf_text.SentencepieceTokenizer(
            model=self.target_proto,
            out_type=tf.int32,
            name="target_sentencepiece",
        )

    def revive_tokenizers(self):
        """Recreates the tokenizers if their TensorFlow resources are gone.

        A SentencePiece model lives in the eager context's resource manager,
        and TensorFlow empties that whenever the context's caches are
        cleared: `tf.random.set_seed` does (so `keras.utils.set_random_seed`
        does, on every backend), and so does `keras.backend.clear_session`.
        Every eager use checks first (one cheap op). In a graph being traced
        (a `tf.function`, `tf.data`) nothing can be checked: whoever traces
        calls this first (`dataset` and the export do)."""
        if not tf.executing_eagerly():
            return
        try:
            self._source.vocab_size()
            self._target.vocab_size()
        except tf.errors.NotFoundError:
            self._make_tokenizers()

    @property
    def source(self):
        """The source model as a TF Text `SentencepieceTokenizer`."""
        self.revive_tokenizers()
        return self._source

    @property
    def target(self):
        """The target model as a TF Text `SentencepieceTokenizer`."""
        self.revive_tokenizers()
        return self._target

    # -- on disk --------------------------------------------------------------

    @staticmethod
    def model_path(directory, language, vocab_size):
        """Where the SentencePiece model of `language` lives."""
        return os.path.join(directory, f"spm_{language}_{vocab_size}.model")

    @classmethod
    def train(
        cls,
        pairs,
        directory,
        vocab_size=DEFAULT_VOCAB_SIZE,
        max_length=64,
        languages=LANGUAGES,
    ):
        """Trains the models of `pairs` (`(source, target)` strings) into
        `directory`, unless they are there already, and loads them."""
        protos = []
        for index, language in enumerate(languages):
            path = cls.model_path(directory, language, vocab_size)
            if not os.path.isfile(path):
                train_sentencepiece([p[index] for p in pairs], path, vocab_size)
            with open(path, "rb") as file:
                protos.append(file.read())
        preprocessor = cls(*protos, max_length, vocab_size, languages)
        preprocessor.save(directory)
        return preprocessor

    @classmethod
    def load(cls, directory):
        """Loads the preprocessor `save` (or `train`) wrote to `directory`."""
        config_path = os.path.join(directory, _CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(
                f"No {_CONFIG_FILE} in {directory}: not a folder that "
                "TranslationPreprocessor.save or .train wrote."
            )
        with open(config_path) as file:
            config = json.load(file)
        protos = []
        for language in config["languages"]:
            path = cls.model_path(directory, language, config["vocab_size"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"No SentencePiece model at {path}")
            with open(path, "rb") as file:
                protos.append(file.read())
        return cls(
            *protos,
            max_length=config["max_length"],
            vocab_size=config["vocab_size"],
            languages=config["languages"],
        )

    def save(self, directory):
        """Writes both models and the settings to `directory`."""
        for language, proto in zip(
            self.languages,
            (self.source_proto, self.target_proto),
            strict=True,
        ):
            path = self.model_path(directory, language, self.vocab_size)
            if not _holds(path, proto):  # a trained model is never rewritten
                files.write_bytes(path, proto)
        config = {
            "vocab_size": self.vocab_size,
            "languages": list(self.languages),
            "max_length": self.max_length,
        }
        files.write_text(
            os.path.join(directory, _CONFIG_FILE), json.dumps(config)
        )

    @property
    def source_vocabulary_size(self):
        """The source vocabulary's size (ids 0 to size - 1)."""
        return int(self.source.vocab_size())

    @property
    def target_vocabulary_size(self):
        """The target vocabulary's size (ids 0 to size - 1)."""
        return int(self.target.vocab_size())

    @property
    def source_tokenizer(self):
        """The source model as a keras-hub `SentencePieceTokenizer`."""
        import keras_hub

        return keras_hub.tokenizers.SentencePieceTokenizer(
            proto=self.source_proto
        )

    @property
    def target_tokenizer(self):
        """The target model as a keras-hub `SentencePieceTokenizer`."""
        import keras_hub

        return keras_hub.tokenizers.SentencePieceTokenizer(
            proto=self.target_proto
        )

    # -- text <-> ids, as TensorFlow ops --------------------------------------

    def tokenize_source(self, texts):
        """Source ids of a batch of strings: ragged int32, at most
        `max_length` per row. Invalid UTF-8 becomes U+FFFD."""
        texts = tf.strings.unicode_transcode(
            texts, "UTF-8", "UTF-8", errors="replace"
        )
        return self.source.tokenize(texts)[:, : self.max_length]

    def tokenize_target(self, texts):
        """`(decoder_inputs, decoder_targets)` of a batch of strings, ragged
        int32: `[START] + ids` and `ids + [END]`, `max_length` at most."""
        ids = self.target.tokenize(texts)[:, : self.max_length - 1]
        start = tf.fill([ids.nrows(), 1], START_ID)
        end = tf.fill([ids.nrows(), 1], END_ID)
        return tf.concat([start, ids], 1), tf.concat([ids, end], 1)

    def detokenize_target(self, ids):
        """Strings of generated target ids `(batch, length)`: everything
        from `[END]` on, and padding, is dropped."""
        ids = tf.convert_to_tensor(ids, tf.int32)
        ended = tf.cumsum(tf.cast(tf.equal(ids, END_ID), tf.int32), axis=1)
        keep = tf.logical_and(tf.equal(ended, 0), tf.not_equal(ids, PAD_ID))
        return self.target.detokenize(tf.ragged.boolean_mask(ids, keep))

    # -- for Python callers ---------------------------------------------------

    def source_batch(self, sentences):
        """Padded source ids (NumPy int32) of a list of strings. The width is
        a multiple of 16 so that a compiled decoder sees few shapes."""
        ragged = self.tokenize_source(tf.constant(list(sentences), tf.string))
        lengths = ragged.row_lengths().numpy()
        width = 16 * (int(lengths.max(initial=0)) // 16 + 1)
        return ragged.to_tensor(PAD_ID, shape=[None, width]).numpy()

    def target_texts(self, ids):
        """A list of strings of generated target ids."""
        return [t.decode("utf-8") for t in self.detokenize_target(ids).numpy()]

    def dataset(
        self,
        pairs,
        *,
        batch_size=64,
        shuffle=True,
        seed=0,
        bucket_boundaries=(8, 12, 16, 20, 24, 32, 40, 48),
        cache=True,
        drop_remainder=False,
        count_batches=True,
    ):
        """A `tf.data` pipeline from string pairs to translation batches.

        Yields `((encoder_tokens, decoder_inputs), decoder_targets)`, int32,
        padded with 0. Pairs with an empty side are dropped. With
        `bucket_boundaries` (lengths, each a positive integer) batches
        group pairs of similar length, so they carry little padding, and
        every batch of a bucket is padded to the bucket's upper bound
        (`max_length` for the last one), both sides alike: a compiled
        training step sees one shape per bucket, not one per batch (JAX
        compiles again for every new shape). `None` (or no boundaries)
        pads to each batch's longest pair instead. Shuffling is seeded.

        Args:
            pairs: a list of `(source, target)` strings, or a
                `tf.data.Dataset` of `{"en": ..., "de": ...}` strings.
            count_batches: count the batches once (a pass over the data,
                which also fills the cache) and declare the number as the
                dataset's cardinality, so `model.fit` knows an epoch's
                length instead of finding it by running out of data (and
                warning). Dropping empty pairs and bucketing leave it
                unknown otherwise; the number does not depend on the
                shuffling order. `False` skips the pass.

        The pipeline holds the tokenizers as they are when it is made:
        after `keras.utils.set_random_seed` (which clears TensorFlow's
        resources) make it again.
        """
        boundaries = self._bucket_limits(bucket_boundaries)
        self.revive_tokenizers()
        if isinstance(pairs, (list, tuple)):
            sources = [p[0] for p in pairs]
            targets = [p[1] for p in pairs]
            data = tf.data.Dataset.from_tensor_slices((sources, targets))
        else:
            data = pairs.map(lambda pair: (pair["en"], pair["de"]))

        def tokenize(source, target):
            decoder_inputs, decoder_targets = self.tokenize_target(target[None])
            return (
                self.tokenize_source(source[None])[0],
                decoder_inputs[0],
                decoder_targets[0],
            )

        data = data.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)
        data = data.filter(
            lambda src, dec_in, dec_out: tf.logical_and(
                tf.size(src) > 0, tf.size(dec_in) > 1
            )
        )
        if cache:
            data = data.cache()
        if shuffle:
            data = data.shuffle(
                10_000, seed=seed, reshuffle_each_iteration=True
            )
        shapes, padding = ([None], [None], [None]), (PAD_ID, PAD_ID, PAD_ID)
        if boundaries:
            data = data.bucket_by_sequence_length(
                lambda src, dec_in, dec_out: tf.maximum(
                    tf.size(src), tf.size(dec_in)
                ),
                bucket_boundaries=boundaries,
                bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
                padded_shapes=shapes,
                padding_values=padding,
                pad_to_bucket_boundary=True,
                drop_remainder=drop_remainder,
            )
        else:
            data = data.padded_batch(
                batch_size,
                padded_shapes=shapes,
                padding_values=padding,
                drop_remainder=drop_remainder,
            )
        data = data.map(lambda src, dec_in, dec_out: ((src, dec_in), dec_out))
        if count_batches:
            count = int(data.reduce(0, lambda n, _: n + 1))
            data = data.apply(tf.data.experimental.assert_cardinality(count))
        return data.prefetch(tf.data.AUTOTUNE)

    def _bucket_limits(self, bucket_boundaries):
        """`tf.data`'s boundaries for `bucket_boundaries`: those within
        `max_length`, sorted, and one past `max_length` so that the last
        bucket pads to it (no sequence is longer). Pairs fall in `[lower,
        upper)` and pad to `upper - 1`."""
        if bucket_boundaries is None:
            return None
        if isinstance(bucket_boundaries, (str, bytes)) or not hasattr(
            bucket_boundaries, "__iter__"
        ):
            raise ValueError(
                "Received an invalid value for `bucket_boundaries`, expected "
                "a sequence of positive integers or None. Received: "
                f"bucket_boundaries={bucket_boundaries!r}"
            )
        values = [
            check_positive_int("bucket_boundaries", b)
            for b in bucket_boundaries
        ]
        if not values:
            return None
        kept = {b for b in values if b <= self.max_length}
        return sorted(kept | {self.max_length + 1})


def _holds(path, data):
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as file:
        return file.read() == data


def padding_fraction(dataset):
    """The fraction of padding tokens in a dataset's source and target."""
    pad = total = 0
    for (source, decoder_inputs), _ in dataset:
        for tensor in (source, decoder_inputs):
            pad += int(tf.reduce_sum(tf.cast(tensor == PAD_ID, tf.int64)))
            total += int(tf.size(tensor))
    return pad / total if total else 0.0
