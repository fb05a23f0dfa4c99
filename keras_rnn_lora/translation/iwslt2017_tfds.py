"""IWSLT 2017 English-German as a tensorflow-datasets builder.

`Iwslt2017` (registered as `iwslt2017/en-de`) reads the official release
with `iwslt2017.read_split`: offline from a manual directory (`manual_dir`,
or the environment variable `IWSLT2017_DIR`), online from the WIT3
download. `load_iwslt2017` gives a split as a `tf.data.Dataset`.
"""

import os

import tensorflow_datasets as tfds

from keras_rnn_lora.translation.iwslt2017 import ENV_VAR
from keras_rnn_lora.translation.iwslt2017 import HOMEPAGE
from keras_rnn_lora.translation.iwslt2017 import MANUAL_DOWNLOAD_INSTRUCTIONS
from keras_rnn_lora.translation.iwslt2017 import SPLITS
from keras_rnn_lora.translation.iwslt2017 import URL
from keras_rnn_lora.translation.iwslt2017 import default_cache_dir
from keras_rnn_lora.translation.iwslt2017 import find_release
from keras_rnn_lora.translation.iwslt2017 import read_split
from keras_rnn_lora.translation.iwslt2017 import source_fingerprint


class Iwslt2017(tfds.core.GeneratorBasedBuilder):
    """IWSLT 2017 English-German (TED talks), registered as `iwslt2017`.

    With network it downloads the official WIT3 archive; without, it reads
    the manual directory (`manual_dir`, else the environment variable
    `IWSLT2017_DIR`). Examples keep file order (shuffling is disabled), so
    "the first half of train" means what it says.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official 2017-01-trnted en-de release."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name="en-de", description="English-German TED talks"
        )
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def __init__(self, *, source=None, **kwargs):
        """`source`: the release folder or archive to read, overriding the
        manual directory (how `load_iwslt2017` passes an archive file)."""
        self._source = source
        super().__init__(**kwargs)

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"en": tfds.features.Text(), "de": tfds.features.Text()}
            ),
            supervised_keys=("en", "de"),
            homepage=HOMEPAGE,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        source = self._source or _manual_source(dl_manager)
        if source is None:
            source = dl_manager.download_and_extract(URL)
        release = find_release(source)
        return {
            split: self._generate_examples(release, split) for split in SPLITS
        }

    def _generate_examples(self, release, split):
        pairs, _ = read_split(release, split)
        for index, (en, de) in enumerate(pairs):
            yield index, {"en": en, "de": de}


def _manual_source(dl_manager):
    try:
        return os.fspath(dl_manager.manual_dir)
    except AssertionError:  # tfds: no manual directory, or an empty one
        return os.environ.get(ENV_VAR) or None


def load_iwslt2017(split, data_dir=None, max_pairs=None):
    """A `tf.data.Dataset` of `{"en": ..., "de": ...}` string pairs.

    Args:
        split: `"train"`, `"validation"` or `"test"`.
        data_dir: the folder holding the release (`en-de/...`) or the
            archive, or the archive itself. Default: the environment
            variable `IWSLT2017_DIR`, else the official download.
        max_pairs: keep only the first `max_pairs` pairs (file order).

    The prepared TFDS data is cached under `~/.cache/keras_rnn_lora` (or
    `$KERAS_RNN_LORA_CACHE`) in a folder per source fingerprint, so another
    folder never reuses a cache made from a different one.
    """
    if split not in SPLITS:
        raise ValueError(
            f"Received an invalid value for `split`, expected one of "
            f"{SPLITS}. Received: split={split!r}"
        )
    if max_pairs is not None and (
        not isinstance(max_pairs, int) or max_pairs < 1
    ):
        raise ValueError(
            "Received an invalid value for `max_pairs`, expected a positive "
            f"integer or None. Received: max_pairs={max_pairs!r}"
        )
    source = data_dir or os.environ.get(ENV_VAR)
    if source:
        find_release(source)  # clear errors before tfds wraps them
    cache = prepared_dir(source)
    builder = Iwslt2017(config="en-de", data_dir=cache, source=source)
    builder.download_and_prepare()
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    return dataset if max_pairs is None else dataset.take(max_pairs)


def prepared_dir(data_dir=None):
    """The cache folder for one data source, where prepared data and the
    tokenizers trained on it live (`tokenizers/` inside)."""
    source = data_dir or os.environ.get(ENV_VAR)
    name = source_fingerprint(source) if source else "download"
    return os.path.join(default_cache_dir(), "tfds", name)
