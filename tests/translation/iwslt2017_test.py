"""Tests for the IWSLT 2017 reader and its tensorflow-datasets builder."""

import os
import tarfile
import zipfile

import pytest
import tensorflow_datasets as tfds
from conftest import iwslt_dir

from keras_rnn_lora.translation import iwslt2017
from keras_rnn_lora.translation import iwslt2017_archive
from keras_rnn_lora.translation import iwslt2017_tfds
from keras_rnn_lora.translation.iwslt2017 import IWSLTDataError

XML = """<?xml version="1.0" encoding="UTF-8"?>
<mteval>
<srcset setid="x" srclang="english">
{docs}
</srcset>
</mteval>
"""


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_RNN_LORA_CACHE", str(tmp_path / "cache"))


def write_xml(path, docs):
    """`docs`: {docid: [(seg id, text), ...]}."""
    body = "\n".join(
        f'<doc docid="{docid}" genre="lectures">\n<talkid>{docid}</talkid>\n'
        + "\n".join(f'<seg id="{i}"> {text} </seg>' for i, text in segs)
        + "\n</doc>"
        for docid, segs in docs.items()
    )
    path.write_text(XML.format(docs=body), encoding="utf-8")


def tiny_release(root, train_en=None, train_de=None):
    """A complete release folder `root/en-de` with a few pairs per split."""
    folder = root / "en-de"
    folder.mkdir(parents=True)
    train_en = train_en or ["<url>x</url>", "Hello  world.", "Good bye."]
    train_de = train_de or ["<url>x</url>", "Hallo Welt.", "Auf Wiedersehen."]
    (folder / "train.tags.en-de.en").write_text("\n".join(train_en) + "\n")
    (folder / "train.tags.en-de.de").write_text("\n".join(train_de) + "\n")
    for name in ("dev2010", *iwslt2017.TEST_SETS):
        for lang, text in (("en", "Yes."), ("de", "Ja.")):
            write_xml(
                folder / f"IWSLT17.TED.{name}.en-de.{lang}.xml",
                {"1": [(1, f"{text} {name}"), (2, text)]},
            )
    return folder


def pack(folder, archive, arcname="en-de"):
    """Packs `folder` into `archive` (.tgz, or .zip by its suffix) as
    `arcname`, and returns `archive`."""
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
            for path in sorted(folder.rglob("*")):
                zipped.write(path, f"{arcname}/{path.relative_to(folder)}")
    else:
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(folder, arcname=arcname)
    return archive


# -- the real copy ------------------------------------------------------------


def test_real_split_sizes_and_spot_checks():
    data_dir = iwslt_dir()
    release = iwslt2017.find_release(data_dir)
    sizes = {}
    for split in iwslt2017.SPLITS:
        pairs, dropped = iwslt2017.read_split(release, split)
        sizes[split] = len(pairs)
        assert dropped == 0
        if split == "train":
            assert pairs[0] == (
                "Thank you so much, Chris.",
                "Vielen Dank, Chris.",
            )
            assert pairs[-1][1].startswith(
                "Im Sommer war dort nicht viel zu tun"
            )
        if split == "validation":
            assert pairs[0][0].startswith("Last year I showed these two slides")
            assert pairs[0][1].startswith("Letztes Jahr habe ich diese beiden")
    assert sizes == {"train": 20000, "validation": 888, "test": 8079}


def test_tfds_builder_prepares_from_manual_dir_without_network(
    tmp_path, monkeypatch
):
    data_dir = iwslt_dir()

    def no_network(*args, **kwargs):
        raise AssertionError("the builder tried to download")

    monkeypatch.setattr(
        tfds.download.DownloadManager, "download_and_extract", no_network
    )
    monkeypatch.delenv("IWSLT2017_DIR", raising=False)
    builder = tfds.builder("iwslt2017/en-de", data_dir=str(tmp_path / "tfds"))
    assert isinstance(builder, iwslt2017_tfds.Iwslt2017)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=data_dir)
    )
    assert builder.info.splits["validation"].num_examples == 888
    assert builder.info.splits["test"].num_examples == 8079
    first = next(iter(builder.as_dataset(split="validation")))
    expected = iwslt2017.read_pairs("validation", data_dir)[0]
    assert (first["en"].numpy().decode(), first["de"].numpy().decode()) == (
        expected
    )


def test_load_iwslt2017_keeps_file_order_and_max_pairs():
    data_dir = iwslt_dir()
    dataset = iwslt2017_tfds.load_iwslt2017("train", data_dir, max_pairs=3)
    got = [
        (p["en"].numpy().decode(), p["de"].numpy().decode()) for p in dataset
    ]
    assert got == iwslt2017.read_pairs("train", data_dir, max_pairs=3)


# -- small releases the tests write -------------------------------------------


def test_tiny_release_reads_and_normalizes(tmp_path):
    folder = tiny_release(tmp_path)
    pairs, dropped = iwslt2017.read_split(folder, "train")
    assert pairs == [
        ("Hello world.", "Hallo Welt."),
        ("Good bye.", "Auf Wiedersehen."),
    ]
    assert dropped == 0
    test_pairs, _ = iwslt2017.read_split(folder, "test")
    assert len(test_pairs) == 12 and test_pairs[0] == (
        "Yes. tst2010",
        "Ja. tst2010",
    )


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_archive_as_input_and_cache_per_source(tmp_path, kind):
    folder = tiny_release(tmp_path / "release")
    archive = pack(folder, tmp_path / f"en-de.{kind}")
    dataset = iwslt2017_tfds.load_iwslt2017("validation", str(archive))
    assert [p["en"].numpy().decode() for p in dataset] == [
        "Yes. dev2010",
        "Yes.",
    ]
    other = tiny_release(
        tmp_path / "other", ["Other one."], ["Anderes."]
    ).parent
    other_train = iwslt2017_tfds.load_iwslt2017("train", str(other))
    assert [p["en"].numpy().decode() for p in other_train] == ["Other one."]
    assert iwslt2017_tfds.prepared_dir(
        str(other)
    ) != iwslt2017_tfds.prepared_dir(str(archive))


def test_empty_pairs_are_dropped_and_counted(tmp_path):
    folder = tiny_release(tmp_path, ["a.", "   ", "c."], ["A.", "B.", ""])
    pairs, dropped = iwslt2017.read_split(folder, "train")
    assert pairs == [("a.", "A.")] and dropped == 2


def test_error_different_lengths_names_file_and_line(tmp_path):
    folder = tiny_release(tmp_path, ["a.", "b.", "c."], ["A.", "B."])
    with pytest.raises(
        IWSLTDataError, match="train.tags.en-de.de has 2.*line 3"
    ):
        iwslt2017.read_split(folder, "train")


def test_error_unpaired_seg_id_names_file_and_seg(tmp_path):
    folder = tiny_release(tmp_path)
    write_xml(
        folder / "IWSLT17.TED.dev2010.en-de.de.xml",
        {"1": [(1, "Ja."), (7, "X")]},
    )
    with pytest.raises(
        IWSLTDataError, match="dev2010.en-de.en.xml: doc 1 seg id 2 has no pair"
    ):
        iwslt2017.read_split(folder, "validation")


def test_error_empty_and_missing_files(tmp_path):
    folder = tiny_release(tmp_path)
    (folder / "train.tags.en-de.en").write_text("\n\n")
    with pytest.raises(
        IWSLTDataError, match="Empty file: .*train.tags.en-de.en"
    ):
        iwslt2017.read_split(folder, "train")
    os.remove(folder / "IWSLT17.TED.tst2013.en-de.de.xml")
    with pytest.raises(
        IWSLTDataError, match="Missing file: .*tst2013.en-de.de"
    ):
        iwslt2017.read_split(folder, "test")
    with pytest.raises(IWSLTDataError, match="No IWSLT 2017 data at"):
        iwslt2017.find_release(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="`split`.*split='dev'"):
        iwslt2017.read_split(folder, "dev")
    with pytest.raises(ValueError, match="`max_pairs`"):
        iwslt2017_tfds.load_iwslt2017("train", str(tmp_path), max_pairs=0)


# -- errors name the file and the line ----------------------------------------


def test_invalid_utf8_in_train_names_file_and_line(tmp_path):
    folder = tiny_release(tmp_path)
    path = folder / "train.tags.en-de.de"
    path.write_bytes(b"<url>x</url>\nHallo Welt.\nAuf \xff\xfeWiedersehen.\n")
    with pytest.raises(
        IWSLTDataError, match="train.tags.en-de.de, line 3: not valid UTF-8"
    ):
        iwslt2017.read_split(folder, "train")


def test_invalid_utf8_in_xml_names_file_and_line(tmp_path):
    folder = tiny_release(tmp_path)
    path = folder / "IWSLT17.TED.dev2010.en-de.de.xml"
    data = path.read_bytes().replace(b"Ja. dev2010", b"Ja. \xff\xfe")
    path.write_bytes(data)
    line = data[: data.index(b"\xff")].count(b"\n") + 1
    with pytest.raises(
        IWSLTDataError, match=f"dev2010.en-de.de.xml, line {line}: not valid"
    ):
        iwslt2017.read_split(folder, "validation")


def test_line_count_mismatch_names_both_files_and_counts(tmp_path):
    folder = tiny_release(
        tmp_path,
        ["<url>1</url>", "a.", "b.", "<url>2</url>", "c.", "d."],
        ["<url>1</url>", "A.", "B.", "<url>2</url>", "C."],
    )
    with pytest.raises(IWSLTDataError) as error:
        iwslt2017.read_split(folder, "train")
    message = str(error.value)
    assert "train.tags.en-de.de has 3 content lines and" in message
    assert "train.tags.en-de.en has 4" in message
    assert "line 6 of" in message  # the first unpaired English line
    assert "talk 2: 2 content lines from line 5 of" in message
    assert "1 from line 5 of" in message


def test_seg_without_id_names_the_line(tmp_path):
    folder = tiny_release(tmp_path)
    path = folder / "IWSLT17.TED.tst2011.en-de.en.xml"
    text = path.read_text().replace('<seg id="2">', "<seg>")
    path.write_text(text)
    line = text[: text.index("<seg>")].count("\n") + 1
    with pytest.raises(
        IWSLTDataError,
        match=f"tst2011.en-de.en.xml, line {line}: a <seg> without an id",
    ):
        iwslt2017.read_split(folder, "test")


def test_duplicate_seg_and_entity_declarations_are_refused(tmp_path):
    folder = tiny_release(tmp_path)
    path = folder / "IWSLT17.TED.dev2010.en-de.en.xml"
    text = path.read_text()
    path.write_text(text.replace('<seg id="2">', '<seg id="1">'))
    with pytest.raises(IWSLTDataError, match="seg id 1 appears twice.*line"):
        iwslt2017.read_split(folder, "validation")
    bomb = (
        '<?xml version="1.0"?>\n<!DOCTYPE m [<!ENTITY a "aaaaaaaaaa">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>\n'
        '<mteval><doc docid="1"><seg id="1">&b;</seg></doc></mteval>\n'
    )
    path.write_text(bomb)
    with pytest.raises(IWSLTDataError, match="line 2: declares the entity"):
        iwslt2017.read_split(folder, "validation")


# -- unpacking an archive: concurrency, truncation ----------------------------


def release_archive(tmp_path):
    """The tiny release packed as WIT3 packs it, `en-de/` deep inside."""
    folder = tiny_release(tmp_path / "release")
    deep = "2017-01-trnted/texts/en/de/en-de"
    return pack(folder, tmp_path / "en-de.tgz", deep)


def test_concurrent_unpackers_of_one_archive_agree(tmp_path, monkeypatch):
    # Another process finishes unpacking the same archive while this one is
    # unpacking: both must end with the one complete folder.
    archive = release_archive(tmp_path)
    cache = str(tmp_path / "cache")
    real_extractall = tarfile.TarFile.extractall
    others = []

    def extract_while_another_finishes(self, *args, **kwargs):
        real_extractall(self, *args, **kwargs)
        if not others:
            others.append(None)  # the other one runs once
            others[0] = iwslt2017_archive.extract_archive(str(archive), cache)

    monkeypatch.setattr(
        tarfile.TarFile, "extractall", extract_while_another_finishes
    )
    folder = iwslt2017_archive.extract_archive(str(archive), cache)
    assert others == [folder]
    pairs, _ = iwslt2017.read_split(folder, "train")
    assert pairs[0] == ("Hello world.", "Hallo Welt.")
    # No staging folder is left behind.
    assert os.listdir(os.path.dirname(os.path.dirname(folder))) == [
        os.path.basename(os.path.dirname(folder))
    ]


def test_threads_unpacking_one_archive_at_once(tmp_path):
    import concurrent.futures

    archive = release_archive(tmp_path)
    cache = str(tmp_path / "cache")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        folders = list(
            pool.map(
                lambda _: iwslt2017.find_release(str(archive), cache), range(8)
            )
        )
    assert len(set(folders)) == 1
    assert iwslt2017.read_split(folders[0], "validation")[0]


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_truncated_archive_names_the_file(tmp_path, kind):
    folder = tiny_release(tmp_path / "release")
    for name in ("train.tags.en-de.en", "train.tags.en-de.de"):
        # Incompressible content: cutting the archive cuts into the data.
        (folder / name).write_bytes(os.urandom(200_000).hex().encode())
    archive = pack(folder, tmp_path / f"en-de.{kind}")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(IWSLTDataError, match=f"en-de.{kind}: truncated"):
        iwslt2017.find_release(archive, str(tmp_path / "cache"))


def test_an_incomplete_release_names_the_first_file_missing(tmp_path):
    folder = tiny_release(tmp_path)
    os.remove(folder / "IWSLT17.TED.tst2015.en-de.de.xml")
    with pytest.raises(IWSLTDataError, match="Missing file: .*tst2015.en-de"):
        iwslt2017.find_release(tmp_path)
    (folder / "IWSLT17.TED.tst2015.en-de.de.xml").write_bytes(b"")
    with pytest.raises(IWSLTDataError, match="Empty file: .*tst2015.en-de.de"):
        iwslt2017.find_release(folder)
    empty = tmp_path / "empty" / "en-de"
    empty.mkdir(parents=True)
    with pytest.raises(IWSLTDataError, match="Missing file: .*train.tags"):
        iwslt2017.find_release(empty.parent)
