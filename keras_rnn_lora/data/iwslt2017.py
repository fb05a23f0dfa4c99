"""IWSLT 2017 English-German: a reader of the official release and a
tensorflow-datasets builder on top of it.

The release (`2017-01-trnted/texts/en/de/en-de.tgz`) unpacks to a folder
`en-de/` holding `train.tags.en-de.{en,de}` (plain text with metadata lines
that start with `<`) and the XML sets `IWSLT17.TED.<set>.en-de.{en,de}.xml`
(`<seg id=..>` inside `<doc docid=..>`). Splits: `train`, `validation`
(dev2010) and `test` (tst2010 to tst2015, concatenated: 8,079 pairs).
"""

import hashlib
import os
import re
import tarfile
import xml.etree.ElementTree as ElementTree
import zipfile

import tensorflow_datasets as tfds

#: Where the official release lives (WIT3). No checksum is recorded here:
#: the machines this was built on have no network to compute it.
URL = "https://wit3.fbk.eu/archive/2017-01-trnted/texts/en/de/en-de.tgz"
HOMEPAGE = "https://wit3.fbk.eu/2017-01"
SPLITS = ("train", "validation", "test")
TEST_SETS = tuple(f"tst{year}" for year in range(2010, 2016))
ENV_VAR = "IWSLT2017_DIR"

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
Download the IWSLT 2017 release archive `en-de.tgz` from WIT3
({URL}) and either place the archive itself in the manual directory, or
unpack it there so that the directory holds the folder `en-de/` with:

  en-de/train.tags.en-de.en
  en-de/train.tags.en-de.de
  en-de/IWSLT17.TED.dev2010.en-de.{{en,de}}.xml
  en-de/IWSLT17.TED.tst2010.en-de.{{en,de}}.xml ... tst2015

The manual directory is `--manual_dir` (tfds) or the environment variable
{ENV_VAR}.
"""

_WHITESPACE = re.compile(r"\s+")


class IWSLTDataError(ValueError):
    """The release files are missing, empty or do not pair up."""


def normalize(text):
    """Strips and collapses runs of whitespace to one space."""
    return _WHITESPACE.sub(" ", text).strip()


def _read_lines(path):
    if not os.path.isfile(path):
        raise IWSLTDataError(f"Missing file: {path}")
    with open(path, encoding="utf-8") as file:
        lines = file.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not any(line.strip() for line in lines):
        raise IWSLTDataError(f"Empty file: {path}")
    return lines


def _content_lines(path):
    """`(line_number, text)` of every line not starting with `<`."""
    return [
        (number, normalize(line))
        for number, line in enumerate(_read_lines(path), start=1)
        if not line.strip().startswith("<")
    ]


def read_train(en_path, de_path):
    """Pairs the content lines of the `train.tags` files, line by line.

    Returns `(pairs, dropped)`: the pairs and the number dropped because
    one side was empty.
    """
    en_lines, de_lines = _content_lines(en_path), _content_lines(de_path)
    if len(en_lines) != len(de_lines):
        shorter = en_path if len(en_lines) < len(de_lines) else de_path
        count = min(len(en_lines), len(de_lines))
        longer_lines = de_lines if shorter == en_path else en_lines
        raise IWSLTDataError(
            f"{shorter} has {count} content lines but its pair has "
            f"{len(longer_lines)}: the first unpaired line is line "
            f"{longer_lines[count][0]} of "
            f"{de_path if shorter == en_path else en_path}"
        )
    return _keep_non_empty(
        (en, de) for (_, en), (_, de) in zip(en_lines, de_lines, strict=True)
    )


def _segments(path):
    """`{(docid, seg id): text}` of an IWSLT XML file, in file order."""
    if not os.path.isfile(path):
        raise IWSLTDataError(f"Missing file: {path}")
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise IWSLTDataError(f"{path}: not valid XML ({error})") from None
    segments = {}
    for doc in root.iter("doc"):
        docid = doc.get("docid")
        for seg in doc.iter("seg"):
            key = (docid, seg.get("id"))
            if key in segments:
                raise IWSLTDataError(
                    f"{path}: seg id {key[1]} appears twice in doc {docid}"
                )
            segments[key] = normalize(seg.text or "")
    if not segments:
        raise IWSLTDataError(f"Empty file: {path} holds no <seg> element")
    return segments


def read_xml(en_path, de_path):
    """Pairs the `<seg>` elements of two XML files by (doc, seg id).

    Returns `(pairs, dropped)` as `read_train`.
    """
    en, de = _segments(en_path), _segments(de_path)
    for this, other, this_path, other_path in (
        (en, de, en_path, de_path),
        (de, en, de_path, en_path),
    ):
        unpaired = [key for key in this if key not in other]
        if unpaired:
            docid, seg_id = unpaired[0]
            raise IWSLTDataError(
                f"{this_path}: doc {docid} seg id {seg_id} has no pair in "
                f"{other_path} ({len(unpaired)} unpaired in all)"
            )
    return _keep_non_empty((en[key], de[key]) for key in en)


def _keep_non_empty(pairs):
    kept, dropped = [], 0
    for en, de in pairs:
        if en and de:
            kept.append((en, de))
        else:
            dropped += 1
    return kept, dropped


def _release_files(folder, split):
    """The `(en, de)` file pairs of `split` in an unpacked `en-de/`."""
    if split == "train":
        return [
            (
                os.path.join(folder, "train.tags.en-de.en"),
                os.path.join(folder, "train.tags.en-de.de"),
            )
        ]
    sets = ("dev2010",) if split == "validation" else TEST_SETS
    return [
        tuple(
            os.path.join(folder, f"IWSLT17.TED.{name}.en-de.{lang}.xml")
            for lang in ("en", "de")
        )
        for name in sets
    ]


def read_split(release_dir, split):
    """All pairs of `split` from an unpacked release folder `en-de/`.

    Returns `(pairs, dropped)`: a list of `(en, de)` strings and how many
    empty pairs were dropped.
    """
    if split not in SPLITS:
        raise ValueError(
            f"Received an invalid value for `split`, expected one of "
            f"{SPLITS}. Received: split={split!r}"
        )
    pairs, dropped = [], 0
    for en_path, de_path in _release_files(release_dir, split):
        reader = read_train if split == "train" else read_xml
        more, more_dropped = reader(en_path, de_path)
        pairs.extend(more)
        dropped += more_dropped
    return pairs, dropped


# -- locating the release ------------------------------------------------------


def _archive_in(directory):
    for name in ("en-de.tgz", "en-de.tar.gz", "en-de.zip"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _extract(archive, cache_dir):
    """Unpacks `archive` once under `cache_dir`, keyed by its fingerprint."""
    target = os.path.join(cache_dir, "extracted", source_fingerprint(archive))
    folder = os.path.join(target, "en-de")
    if os.path.isdir(folder):
        return folder
    partial = target + ".partial"
    os.makedirs(partial, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(partial)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tarred:
            tarred.extractall(partial, filter="data")
    else:
        raise IWSLTDataError(f"{archive}: neither a .tgz nor a .zip archive")
    found = [root for root, dirs, _ in os.walk(partial) if "en-de" in dirs]
    if not found:
        raise IWSLTDataError(f"{archive}: holds no `en-de/` folder")
    os.makedirs(target, exist_ok=True)
    os.replace(os.path.join(found[0], "en-de"), folder)
    return folder


def find_release(source, cache_dir=None):
    """The unpacked `en-de/` folder for `source`.

    `source` may be that folder, a folder holding it (or holding the
    archive), or the archive `en-de.tgz` / `en-de.zip` itself.
    """
    source = os.path.abspath(os.path.expanduser(os.fspath(source)))
    cache_dir = cache_dir or default_cache_dir()
    if os.path.isfile(source):
        return _extract(source, cache_dir)
    if not os.path.isdir(source):
        raise IWSLTDataError(
            f"No IWSLT 2017 data at {source}: expected a folder holding "
            "`en-de/` (or the archive `en-de.tgz`), or the archive itself."
        )
    if os.path.isfile(os.path.join(source, "train.tags.en-de.en")):
        return source
    if os.path.isdir(os.path.join(source, "en-de")):
        return os.path.join(source, "en-de")
    archive = _archive_in(source)
    if archive:
        return _extract(archive, cache_dir)
    raise IWSLTDataError(
        f"{source} holds neither `en-de/` nor `en-de.tgz`/`en-de.zip`."
        + MANUAL_DOWNLOAD_INSTRUCTIONS
    )


def source_fingerprint(source):
    """A short hash of a data source's path, sizes and modification times:
    prepared data made from one source is never reused for another."""
    source = os.path.abspath(os.fspath(source))
    digest = hashlib.sha256(source.encode())
    paths = [source]
    if os.path.isdir(source):
        paths = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(source)
            for name in names
        )
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def default_cache_dir():
    return os.environ.get(
        "KERAS_RNN_LORA_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "keras_rnn_lora"),
    )


# -- tensorflow-datasets -------------------------------------------------------


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


def read_pairs(split, data_dir=None, max_pairs=None):
    """The pairs of `split` as a Python list, straight from the release
    (no TFDS): `[(en, de), ...]`."""
    source = data_dir or os.environ.get(ENV_VAR)
    if not source:
        raise ValueError(f"No data source: pass `data_dir` or set {ENV_VAR}.")
    pairs, _ = read_split(find_release(source), split)
    return pairs if max_pairs is None else pairs[:max_pairs]


def prepared_dir(data_dir=None):
    """The cache folder for one data source, where prepared data and the
    tokenizers trained on it live (`tokenizers/` inside)."""
    source = data_dir or os.environ.get(ENV_VAR)
    name = source_fingerprint(source) if source else "download"
    return os.path.join(default_cache_dir(), "tfds", name)
