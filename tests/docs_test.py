"""The docs' code runs as written: every Python block of the pages below,
in order, in a fresh folder, on this backend."""

import os
import re

import pytest

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
RUNNABLE = ("getting-started.md",)


def python_blocks(page):
    with open(os.path.join(DOCS, page)) as file:
        return re.findall(r"```python\n(.*?)```", file.read(), re.DOTALL)


@pytest.mark.parametrize("page", RUNNABLE)
def test_the_page_runs(page, tmp_path, monkeypatch, capsys):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no Python block"
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, page, "exec"), scope)  # noqa: S102


def test_the_tour_prints_what_the_page_shows(tmp_path, monkeypatch, capsys):
    """The summary table on the page is what the tour prints."""
    with open(os.path.join(DOCS, "getting-started.md")) as file:
        page = file.read()
    shown = re.search(r"```text\n(.*?)```", page, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    exec(  # noqa: S102
        compile(python_blocks("getting-started.md")[0], "tour", "exec"),
        {"__name__": "__docs__"},
    )
    printed = capsys.readouterr().out
    assert shown.strip() in printed
