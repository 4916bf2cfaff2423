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
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from browser import CHROMIUM, check_book_in_browser
from fairbook.book import (
    BookError,
    at_a_glance,
    build_book,
    executed_notebook,
    parameters_source,
    reader_page,
    toc_stems,
    write_if_changed,
)
from fairbook.stats import estimate

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


def test_write_if_changed_leaves_identical_files_untouched(tmp_path):
    dest = tmp_path / "out" / "a.ipynb"
    assert write_if_changed(b"one", dest) is True
    os.utime(dest, (1_000_000, 1_000_000))
    assert write_if_changed(b"one", dest) is False
    assert dest.stat().st_mtime == 1_000_000
    assert write_if_changed(b"two", dest) is True
    assert dest.read_text() == "two"
    assert [p.name for p in dest.parent.iterdir()] == ["a.ipynb"]  # no temp files left behind


DEFAULTS = """data_root = "data/synth-fairvlmed"  # SynthFairVLMed or a real folder
seeds = [0, 1, 2]
layers = {"n_experts": 10, "top_k": 3}
n_boot = 1000"""


def test_parameters_source_rewrites_values_and_keeps_comments_and_other_lines():
    values = {"data_root": "/data/FairVLMed", "seeds": [0], "layers": {"n_experts": 2, "top_k": 1}}
    assert parameters_source(DEFAULTS, values) == """data_root = '/data/FairVLMed'  # SynthFairVLMed or a real folder
seeds = [0]
layers = {'n_experts': 2, 'top_k': 1}
n_boot = 1000"""
    long = {"seeds": list(range(40))}
    lines = parameters_source(DEFAULTS, long, width=40).splitlines()
    seeds = lines[1:lines.index("layers = {\"n_experts\": 10, \"top_k\": 3}")]
    assert 2 < len(seeds) < 10 and max(map(len, seeds)) <= 40 and seeds[0].startswith("seeds = [0, 1,")
    assert all(line.startswith(" " * len("seeds = [")) for line in seeds[1:])
    namespace: dict = {}
    exec(parameters_source(DEFAULTS, long, width=40), namespace)  # still valid Python with the run's values
    assert namespace["seeds"] == list(range(40)) and namespace["n_boot"] == 1000


def test_reader_page_shows_one_parameter_block_with_the_run_values_and_a_data_note(tmp_path):
    path = fake_run(tmp_path, "01-data-exploration", "")
    notebook = nbformat.read(path, as_version=4)
    notebook.cells[1:1] = [new_code_cell(DEFAULTS, metadata={"tags": ["parameters"]}),
                           new_code_cell('# Parameters\nseeds = [5]\n', metadata={"tags": ["injected-parameters"]})]
    nbformat.write(notebook, path)
    (path.parent / "params.yaml").write_text("seeds: [5]\ndata_root: nowhere/at/all\n")
    (path.parent / "run.json").write_text(json.dumps({"config": "default", "status": "complete", "seconds": 12.3,
                                                      "finished": "2026-12-02T11:00:00"}))
    before = path.read_bytes()
    page = reader_page(path)
    assert path.read_bytes() == before  # the record under runs/ is untouched
    sources = [cell.source for cell in page.cells]
    assert sources[0] == "# Chapter 01-data-exploration"  # the note sits right under the title ...
    assert sources[2] == "The squared loss of 01-data-exploration is $a^2$."  # ... before the introduction
    assert sources[1] == ("```{note}\n**Data:** `nowhere/at/all` (not on this machine when the book was built). "
                          "**Configuration:** `default` (`params/01-data-exploration/default.yaml`), executed "
                          "2026-12-02 11:00:00 in 12 s.\n```")
    blocks = [c for c in page.cells if {"parameters", "injected-parameters"} & set(c.metadata.get("tags", []))]
    assert len(blocks) == 1 and blocks[0].source.splitlines()[:3] == [
        "# the values of this run (configuration default)", "data_root = 'nowhere/at/all'  # SynthFairVLMed or a "
        "real folder", "seeds = [5]"]
    synthetic = tmp_path / "synth"
    synthetic.mkdir()
    (synthetic / "synthetic.json").write_text(json.dumps({"config": {"seed": 3, "bias": "none"}}))
    (path.parent / "params.yaml").write_text(f"data_root: {synthetic}\n")
    assert "**Data:** SynthFairVLMed (synthetic; seed 3, bias none)." in reader_page(path).cells[1].source


def test_at_a_glance_gives_each_claim_its_verdict_the_leaderboard_and_the_data(tmp_path):
    copy_book_sources(tmp_path / "book")
    runs = tmp_path / "runs"
    fake_run(runs, "12-fairclip", "")
    paired = [{"attribute": "race", "method": "FairCLIP", "baseline": "CLIP", "metric": "es_auc", "diff": -0.02,
               "boot_lo": -0.03, "boot_hi": -0.01},
              {"attribute": "race", "method": "FairCLIP", "baseline": "CLIP", "metric": "auc", "diff": 0.001,
               "boot_lo": -0.002, "boot_hi": 0.004}]
    data = "SynthFairVLMed (synthetic; seed 0, bias default; 10,000 samples)"
    (runs / "12-fairclip" / "default" / "metrics.json").write_text(json.dumps({"data": data, "paired": paired}))
    fake_run(runs, "90-results", "")
    board = [{"Model": "Fair-MoE", "mean rank": 1.5, "columns": 20}, {"Model": "CLIP", "mean rank": 2.5, "columns": 20}]
    (runs / "90-results" / "default" / "metrics.json").write_text(json.dumps({"data": data, "leaderboard": board}))
    page = at_a_glance("default", runs, tmp_path / "book")
    nbsp = "\u00a0"
    assert "## FairCLIP (Luo et al., CVPR 2024)" in page
    assert (f"| FairCLIP raises ES-AUC over CLIP (Sec. 5, results on Harvard-FairVLMed) | "
            f"{{doc}}`12 <notebooks/12-fairclip>` | 0{nbsp}of{nbsp}1 | "
            f"✗{nbsp}-2.00{nbsp}[-3.00,{nbsp}-1.00] |") in page
    assert "| FairCLIP does not lower AUC (Sec. 5, results on Harvard-FairVLMed) |" in page
    assert f"✓{nbsp}+0.10{nbsp}[-0.20,{nbsp}+0.40] |" in page
    assert (f"| Fair-MoE has a higher ES-AUC than CLIP (Table 1) | {{doc}}`13 <notebooks/13-fair-moe>` | "
            f"not{nbsp}run |") in page
    assert "| Fair-MoE | 1.5 | 20 |" in page.split("## Leaderboard")[1]
    assert f"| {{doc}}`12-fairclip <notebooks/12-fairclip>` | {data} | `default` |" in page
    assert "Not run yet under `default`: 01-data-exploration, 02-fairness-metrics" in page


# --- the built book in headless Chromium ------------------------------------------------------------------------


#: A table as the chapters print them: many "mean ± std" columns, wider together than the page.
WIDE_TABLE = pd.DataFrame({f"metric {i} ↑": [estimate(77.1734 + i, 0.43), estimate(70.0, lo=68.25, hi=71.5)]
                           for i in range(12)}, index=["CLIP", "Fair-MoE"])


def add_parameters(path: Path) -> None:
    """Give a fake executed notebook what papermill adds: a defaults cell, an injected cell, params.yaml. The
    run's values are too long for one line of the page unless the book wraps them."""
    notebook = nbformat.read(path, as_version=4)
    notebook.cells[1:1] = [
        new_code_cell("seeds = [0, 1, 2]  # training seeds\nn_boot = 1000", metadata={"tags": ["parameters"]}),
        new_code_cell(f"# Parameters\nseeds = {list(range(60))}\n", metadata={"tags": ["injected-parameters"]}),
        new_code_cell("table", execution_count=2, outputs=[new_output(
            "execute_result", data={"text/html": WIDE_TABLE.to_html(), "text/plain": "table"}, execution_count=2)]),
    ]
    nbformat.write(notebook, path)
    (path.parent / "params.yaml").write_text(f"seeds: {list(range(60))}\n")


@pytest.fixture(scope="module")
def built_book(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("book-build")
    copy_book_sources(root / "book")
    png = small_png()
    for stem in toc_stems(root / "book"):
        add_parameters(fake_run(root / "runs", stem, png))
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
@needs_chromium
def test_the_check_catches_sideways_scrolling_and_wrapped_estimates_but_not_a_check_mark(tmp_path):
    nbsp = "\u00a0"
    (tmp_path / "page.html").write_text(
        "<html><head><meta charset='utf-8'><title>narrow</title></head><body style='width: 600px'>"
        "<div class='cell_output'><pre style='overflow-x: auto'>" + "x" * 200 + "</pre></div>"
        "<div class='cell_output'><div style='overflow-x: auto'><table><tr><td>"
        + "wide table cell " * 30 + "</td></tr></table></div></div>"
        "<table style='width: 120px'><tr><td>77.17 ± 0.43 [76.10, 78.30]</td>"
        f"<td>✓{nbsp}+0.84{nbsp}[-3.22,{nbsp}+5.80]</td></tr></table></body></html>")
    page = check_book_in_browser(tmp_path)["pages"][0]
    assert len(page["too_wide"]) == 1 and page["too_wide"][0].startswith("output pre.")  # the table box may scroll
    assert page["wrapped_cells"] == ["77.17 ± 0.43 [76.10, 78.30]"]                    # NBSP-joined: one line


@pytest.mark.browser
def test_second_build_with_nothing_changed_rewrites_nothing(built_book):
    html = built_book.parent
    before = {p: p.stat().st_mtime_ns for p in html.rglob("*.html")}
    build_book(runs_dir=html.parents[2] / "runs", book_dir=html.parents[1])
    assert {p: p.stat().st_mtime_ns for p in html.rglob("*.html")} == before


def assert_reads_well(report: dict, config: str) -> None:
    """Issue #13's reader checks on every page of a built book: one parameter block per chapter, with the run's
    values and its configuration; nothing scrolls sideways; no estimate wraps; the glance page comes first and
    links every chapter that tests a paper's claim. Used on the fake book here and on the real smoke book
    (tests/test_notebooks.py)."""
    from fairbook.methods import CLAIMS

    chapters = [page for page in report["pages"] if page["page"].startswith("notebooks/")]
    assert len(chapters) == len(toc_stems(REPO / "book"))
    for page in chapters:
        assert page["parameter_blocks"] == 1, page["page"]
        assert f"the values of this run (configuration {config})" in page["text"], page["page"]
        stem = page["page"].removeprefix("notebooks/").removesuffix(".html")
        assert f"Configuration: {config} (params/{stem}/{config}.yaml)" in page["text"], page["page"]
    for page in report["pages"]:
        assert page["too_wide"] == [], (page["page"], page["too_wide"])
        assert page["wrapped_cells"] == [], (page["page"], page["wrapped_cells"])
    pages = {page["page"]: page for page in report["pages"]}
    glance = pages["at-a-glance.html"]
    assert glance["title"].startswith("Results at a glance")
    for chapter in {claim.chapter for claim in CLAIMS}:
        assert f"notebooks/{chapter}.html" in glance["links"], chapter
    navigation = pages["intro.html"]["text"]
    assert navigation.index("Results at a glance") < navigation.index("Data and metrics")


@pytest.mark.browser
@needs_chromium
def test_pages_read_well_one_parameter_block_nothing_sideways_no_wrapped_estimate_glance_first(report):
    assert_reads_well(report, "default")


