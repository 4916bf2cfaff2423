"""The offline book build (fairbook.book) and its check in headless Chromium (tests/browser.py).

The browser tests build a copy of the real book (book/_config.yml, _toc.yml, intro.md) in a temporary folder from
fake executed notebooks, serve it on 127.0.0.1 and load every page in /usr/bin/chromium.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from browser import CHROMIUM, check_book_in_browser
from fairbook.book import BookError, build_book, copy_if_changed, executed_notebook, toc_stems

REPO = Path(__file__).resolve().parents[1]
BOOK_SOURCES = ("_config.yml", "_toc.yml", "intro.md")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)")


def small_png() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5), dpi=50)
    ax.plot([0, 1], [0, 1])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def fake_run(runs_dir: Path, stem: str, png: str, config: str = "default") -> Path:
    """An executed notebook as `fairbook run` leaves it: math in markdown, a captioned PNG figure output."""
    notebook = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                     "language": "python"}})
    notebook.cells = [
        new_markdown_cell(f"# Chapter {stem}\n\nThe squared loss of {stem} is $a^2$."),
        new_code_cell("fb.plots.show()", execution_count=1,
                      metadata={"mystnb": {"figure": {"caption": f"Curve of {stem}.", "name": f"fig-{stem}"}}},
                      outputs=[new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"})]),
    ]
    path = runs_dir / stem / config / f"{stem}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, path)
    (path.parent / "run.json").write_text(json.dumps({"config": config, "status": "complete"}))
    return path


def copy_book_sources(book_dir: Path) -> None:
    book_dir.mkdir(parents=True)
    for name in BOOK_SOURCES:
        shutil.copy(REPO / "book" / name, book_dir / name)
    if (REPO / "book" / "_mathjax").is_dir():  # reuse the vendored MathJax instead of running npm again
        (book_dir / "_mathjax").symlink_to(REPO / "book" / "_mathjax", target_is_directory=True)


# --- fairbook.book without a browser -------------------------------------------------------------------------


def test_toc_stems_lists_the_notebooks_in_toc_order():
    assert toc_stems(REPO / "book")[:2] == ["01-data-exploration", "02-fairness-metrics"]


def test_missing_run_names_the_command_to_run(tmp_path):
    with pytest.raises(BookError, match=r"run `fairbook run notebooks/01-data-exploration.py "
                                        r"-p params/01-data-exploration/smoke.yaml` first"):
        executed_notebook("01-data-exploration", "smoke", tmp_path)


def test_complete_run_is_found_and_a_failed_one_is_reported(tmp_path):
    path = fake_run(tmp_path, "01-data-exploration", "")
    assert executed_notebook("01-data-exploration", "default", tmp_path) == path
    path.parent.rename(path.parent.with_name("default.failed"))  # what fairbook.runs leaves after a failure
    with pytest.raises(BookError, match=r"the last run of 01-data-exploration \[default\] failed"):
        executed_notebook("01-data-exploration", "default", tmp_path)


def test_copy_if_changed_leaves_identical_files_untouched(tmp_path):
    src, dest = tmp_path / "a.ipynb", tmp_path / "out" / "a.ipynb"
    src.write_text("one")
    assert copy_if_changed(src, dest) is True
    os.utime(dest, (1_000_000, 1_000_000))
    assert copy_if_changed(src, dest) is False
    assert dest.stat().st_mtime == 1_000_000
    src.write_text("two")
    assert copy_if_changed(src, dest) is True
    assert dest.read_text() == "two"
    assert [p.name for p in dest.parent.iterdir()] == ["a.ipynb"]  # no temp files left behind


# --- the built book in headless Chromium ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_book(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("book-build")
    copy_book_sources(root / "book")
    png = small_png()
    for stem in toc_stems(root / "book"):
        fake_run(root / "runs", stem, png)
    index = build_book(runs_dir=root / "runs", book_dir=root / "book")
    assert index == root / "book" / "_build" / "html" / "index.html"
    return index


@pytest.fixture(scope="module")
def report(built_book) -> dict:
    return check_book_in_browser(built_book.parent)


@pytest.mark.browser
def test_index_redirects_to_the_intro(built_book):
    assert 'url=intro.html' in built_book.read_text()


@pytest.mark.browser
@needs_chromium
def test_every_page_renders_with_title_text_and_math(report):
    pages = {page["page"]: page for page in report["pages"]}
    stems = toc_stems(REPO / "book")
    assert {"intro.html", *(f"notebooks/{stem}.html" for stem in stems)} <= set(pages)
    assert pages["intro.html"]["title"].startswith("fairbook")
    assert "SynthFairVLMed" in pages["intro.html"]["text"]
    assert "Data and metrics" in pages["intro.html"]["text"]  # part caption in the navigation
    for stem in stems:
        page = pages[f"notebooks/{stem}.html"]
        assert page["title"].startswith(f"Chapter {stem}")
        assert f"The squared loss of {stem} is" in page["text"]
        assert f"Curve of {stem}." in page["text"]  # caption taken from the cell metadata
        assert page["math"] >= 1 and page["math_errors"] == 0  # MathJax (served locally) typeset $a^2$
        assert len(page["images"]) == 1


@pytest.mark.browser
@needs_chromium
def test_every_image_loaded(report):
    assert report["images"], "the fake chapters each carry a figure"
    assert [image for image in report["images"] if image["width"] == 0] == []


@pytest.mark.browser
@needs_chromium
def test_nothing_leaves_the_machine(report):
    assert report["requests"], "the pages' own requests must have been recorded"
    assert report["external_requests"] == []
    assert report["failed_requests"] == []
    assert report["js_errors"] == []


@pytest.mark.browser
@needs_chromium
def test_the_check_catches_external_requests_and_broken_images(tmp_path):
    (tmp_path / "page.html").write_text(
        "<html><head><title>leaky</title><script src='https://cdn.example.com/x.js'></script></head>"
        "<body><img src='http://fonts.example.org/a.png'><img src='missing.png'></body></html>")
    found = check_book_in_browser(tmp_path)
    assert [page["page"] for page in found["pages"]] == ["page.html"]
    assert set(found["external_requests"]) == {"https://cdn.example.com/x.js", "http://fonts.example.org/a.png"}
    assert [image["width"] for image in found["images"]] == [0, 0]
    assert any(failure.startswith("404 ") and failure.endswith("/missing.png") for failure in found["failed_requests"])


@pytest.mark.browser
def test_second_build_with_nothing_changed_rewrites_nothing(built_book):
    html = built_book.parent
    before = {p: p.stat().st_mtime_ns for p in html.rglob("*.html")}
    build_book(runs_dir=html.parents[2] / "runs", book_dir=html.parents[1])
    assert {p: p.stat().st_mtime_ns for p in html.rglob("*.html")} == before
