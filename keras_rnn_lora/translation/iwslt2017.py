"""IWSLT 2017 English-German: a reader of the official release (plain
Python; the tensorflow-datasets builder on top of it is in
`iwslt2017_tfds.py`).

The release (`2017-01-trnted/texts/en/de/en-de.tgz`) unpacks to a folder
`en-de/` holding `train.tags.en-de.{en,de}` (plain text with metadata lines
that start with `<`) and the XML sets `IWSLT17.TED.<set>.en-de.{en,de}.xml`
(`<seg id=..>` inside `<doc docid=..>`). Splits: `train`, `validation`
(dev2010) and `test` (tst2010 to tst2015, concatenated: 8,079 pairs).
"""

import hashlib
import os
import re
from xml.parsers import expat

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
    """The lines of a UTF-8 text file; bad UTF-8 names the file and line."""
    if not os.path.isfile(path):
        raise IWSLTDataError(f"Missing file: {path}")
    with open(path, "rb") as file:
        data = file.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - data.rfind(b"\n", 0, error.start)
        raise IWSLTDataError(
            f"{path}, line {line}: not valid UTF-8 ({error.reason} at byte "
            f"{column} of the line)"
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not any(line.strip() for line in lines):
        raise IWSLTDataError(f"Empty file: {path}")
    return lines


def _talks(path):
    """The content lines of a `train.tags` file as `(line_number, text)`,
    grouped into talks: a run of metadata lines (`<url>`, `<talkid>`, ...)
    starts a new talk. A file without metadata is one talk."""
    talks, in_metadata = [[]], False
    for number, line in enumerate(_read_lines(path), start=1):
        if line.strip().startswith("<"):
            in_metadata = True
            continue
        if in_metadata and talks[-1]:
            talks.append([])
        in_metadata = False
        talks[-1].append((number, normalize(line)))
    return talks


def read_train(en_path, de_path):
    """Pairs the content lines of the `train.tags` files, line by line.

    Returns `(pairs, dropped)`: the pairs and the number dropped because
    one side was empty. Files that do not pair up raise `IWSLTDataError`
    with both counts and, where the files mark their talks, the first talk
    where they differ.
    """
    en_talks, de_talks = _talks(en_path), _talks(de_path)
    en_lines = [line for talk in en_talks for line in talk]
    de_lines = [line for talk in de_talks for line in talk]
    if len(en_lines) != len(de_lines):
        raise IWSLTDataError(_mismatch(en_path, en_talks, de_path, de_talks))
    return _keep_non_empty(
        (en, de) for (_, en), (_, de) in zip(en_lines, de_lines, strict=True)
    )


def _mismatch(en_path, en_talks, de_path, de_talks):
    counts = {
        path: sum(len(talk) for talk in talks)
        for path, talks in ((en_path, en_talks), (de_path, de_talks))
    }
    shorter, longer = sorted(counts, key=counts.get)
    longer_lines = [
        line
        for talk in (de_talks if longer == de_path else en_talks)
        for line in talk
    ]
    message = (
        f"{shorter} has {counts[shorter]} content lines and {longer} has "
        f"{counts[longer]}: the files must pair line by line; the first "
        f"unpaired line is line {longer_lines[counts[shorter]][0]} of "
        f"{longer}."
    )
    if len(en_talks) == len(de_talks) > 1:
        for index, (en, de) in enumerate(
            zip(en_talks, de_talks, strict=True), start=1
        ):
            if len(en) != len(de):
                message += (
                    f" The first talk that differs is talk {index}: "
                    f"{len(en)} content lines from line {en[0][0]} of "
                    f"{en_path}, {len(de)} from line {de[0][0]} of "
                    f"{de_path}."
                )
                break
    return message


def _segments(path):
    """`{(docid, seg id): text}` of an IWSLT XML file, in file order.

    Parsed with expat, so every error names the file and line; entity
    declarations (the way to an entity-expansion attack) are refused.
    """
    if not os.path.isfile(path):
        raise IWSLTDataError(f"Missing file: {path}")
    parser = expat.ParserCreate()
    segments, first_line = {}, {}
    state = {"doc": None, "in_doc": False, "seg": None, "text": []}

    def fail(message):
        line = parser.CurrentLineNumber
        raise IWSLTDataError(f"{path}, line {line}: {message}")

    def start(name, attributes):
        if name == "doc":
            state["doc"], state["in_doc"] = attributes.get("docid"), True
        elif name == "seg" and state["in_doc"]:
            seg_id, docid = attributes.get("id"), state["doc"]
            if seg_id is None:
                fail(f"a <seg> without an id (in doc {docid})")
            key = (docid, seg_id)
            if key in segments or key == state["seg"]:
                fail(
                    f"seg id {seg_id} appears twice in doc {docid} (first "
                    f"at line {first_line[key]})"
                )
            first_line[key] = parser.CurrentLineNumber
            state["seg"], state["text"] = key, []

    def end(name):
        if name == "seg" and state["seg"] is not None:
            segments[state["seg"]] = normalize("".join(state["text"]))
            state["seg"] = None
        elif name == "doc":
            state["in_doc"] = False

    def text(data):
        if state["seg"] is not None:
            state["text"].append(data)

    def entity_declaration(name, *args):
        fail(f"declares the entity {name!r}; IWSLT files declare none")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    parser.EntityDeclHandler = entity_declaration
    try:
        with open(path, "rb") as file:
            parser.ParseFile(file)
    except expat.ExpatError as error:
        raise IWSLTDataError(
            f"{path}, line {error.lineno}: not valid XML "
            f"({expat.errors.messages[error.code]})"
        ) from None
    if not segments:
        raise IWSLTDataError(f"Empty file: {path} holds no <seg> element")
    return segments, first_line


def read_xml(en_path, de_path):
    """Pairs the `<seg>` elements of two XML files by (doc, seg id).

    Returns `(pairs, dropped)` as `read_train`.
    """
    (en, en_lines), (de, de_lines) = _segments(en_path), _segments(de_path)
    for this, other, lines, this_path, other_path in (
        (en, de, en_lines, en_path, de_path),
        (de, en, de_lines, de_path, en_path),
    ):
        unpaired = [key for key in this if key not in other]
        if unpaired:
            docid, seg_id = unpaired[0]
            raise IWSLTDataError(
                f"{this_path}: doc {docid} seg id {seg_id} has no pair in "
                f"{other_path} (the seg is at line {lines[unpaired[0]]}; "
                f"{len(unpaired)} unpaired in all)"
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


# -- locating the release -----------------------------------------------------


def _archive_in(directory):
    for name in ("en-de.tgz", "en-de.tar.gz", "en-de.zip"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def find_release(source, cache_dir=None):
    """The unpacked `en-de/` folder for `source`.

    `source` may be that folder, a folder holding it (or holding the
    archive), or the archive `en-de.tgz` / `en-de.zip` itself.
    """
    # Imported here: the archive module builds on this one's errors.
    from keras_rnn_lora.translation.iwslt2017_archive import extract_archive

    source = os.path.abspath(os.path.expanduser(os.fspath(source)))
    cache_dir = cache_dir or default_cache_dir()
    if os.path.isfile(source):
        return _complete(extract_archive(source, cache_dir))
    if not os.path.isdir(source):
        raise IWSLTDataError(
            f"No IWSLT 2017 data at {source}: expected a folder holding "
            "`en-de/` (or the archive `en-de.tgz`), or the archive itself."
        )
    if os.path.isfile(os.path.join(source, "train.tags.en-de.en")):
        return _complete(source)
    if os.path.isdir(os.path.join(source, "en-de")):
        return _complete(os.path.join(source, "en-de"))
    archive = _archive_in(source)
    if archive:
        return _complete(extract_archive(archive, cache_dir))
    raise IWSLTDataError(
        f"{source} holds neither `en-de/` nor `en-de.tgz`/`en-de.zip`."
        + MANUAL_DOWNLOAD_INSTRUCTIONS
    )


def _complete(release_dir):
    """`release_dir`, once every file the splits are read from is there and
    not empty: an incomplete copy fails here, naming the first file
    missing, before anything (tfds included) starts reading it."""
    for split in SPLITS:
        for pair in _release_files(release_dir, split):
            for path in pair:
                if not os.path.isfile(path):
                    raise IWSLTDataError(
                        f"Missing file: {path} (an incomplete copy of the "
                        "release)" + MANUAL_DOWNLOAD_INSTRUCTIONS
                    )
                if os.path.getsize(path) == 0:
                    raise IWSLTDataError(f"Empty file: {path}")
    return release_dir


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


def content_fingerprint(release_dir):
    """SHA-256 of the content of every file the splits are read from in an
    unpacked release folder: changed data under the same path changes it."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for pair in _release_files(release_dir, split):
            for path in pair:
                if not os.path.isfile(path):
                    raise IWSLTDataError(f"Missing file: {path}")
                digest.update(os.path.basename(path).encode() + b"\0")
                with open(path, "rb") as file:
                    for block in iter(lambda: file.read(1 << 20), b""):
                        digest.update(block)
    return digest.hexdigest()


def default_cache_dir():
    return os.environ.get(
        "KERAS_RNN_LORA_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "keras_rnn_lora"),
    )


def read_pairs(split, data_dir=None, max_pairs=None):
    """The pairs of `split` as a Python list, straight from the release
    (no TFDS): `[(en, de), ...]`."""
    source = data_dir or os.environ.get(ENV_VAR)
    if not source:
        raise ValueError(f"No data source: pass `data_dir` or set {ENV_VAR}.")
    pairs, _ = read_split(find_release(source), split)
    return pairs if max_pairs is None else pairs[:max_pairs]
