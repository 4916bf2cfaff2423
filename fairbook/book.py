"""Build the Jupyter Book from notebooks that ``fairbook run`` already executed.

The book never executes anything (``execute_notebooks: "off"`` in ``book/_config.yml``): :func:`build_book` writes
the reader's page (:func:`reader_page`) of ``runs/<stem>/<config>/<stem>.ipynb`` for every notebook listed in
``book/_toc.yml`` into ``book/notebooks/``, vendors MathJax 3 into ``book/_mathjax/mathjax`` (served locally instead
of from a CDN) and calls ``jupyter-book build``. Both ``book/notebooks/`` and ``book/_mathjax/`` are generated. The
executed notebook under ``runs/`` is the record and stays as papermill wrote it.
"""
from __future__ import annotations

import ast
import json
import os
import pprint
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pandas as pd
import yaml

from fairbook.data.fairvlmed import describe
from fairbook.files import resolve
from fairbook.methods import CLAIMS
from fairbook.runs import is_complete
from fairbook.stats import NBSP, estimate
from fairbook.tables import attribute_order, claim_verdicts

#: npm package spec of the MathJax release served with the book (its ``es5/`` folder is the browser build).
MATHJAX_NPM = "mathjax@3"
#: Entry point named by ``mathjax_path`` in ``book/_config.yml``, relative to ``book/_mathjax/``.
MATHJAX_ENTRY = Path("mathjax") / "tex-mml-chtml.js"
#: Lines of the jupyter-book log shown when the build fails.
LOG_TAIL_LINES = 40
#: Characters per line of a rewritten parameters cell, a little under the code column
#: (:data:`fairbook.plots.CODE_COLUMN`).
PARAMETER_LINE = 64
#: The generated results-at-a-glance page, relative to the book folder (listed in ``_toc.yml``).
GLANCE_PAGE = "at-a-glance.md"
#: The chapter whose leaderboard the page summarises, and how many of its rows it shows.
LEADERBOARD_CHAPTER, LEADERBOARD_ROWS = "90-results", 8


class BookError(ValueError):
    """The book cannot be built; the message names the problem and the fix."""


def toc_stems(book_dir: str | Path = "book") -> list[str]:
    """Stems of the notebooks listed in ``<book_dir>/_toc.yml`` (entries ``notebooks/<stem>``), in toc order."""
    toc = yaml.safe_load((Path(book_dir) / "_toc.yml").read_text())
    files: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return [Path(f).name.removesuffix(".ipynb") for f in files if Path(f).parts[0] == "notebooks"]


def executed_notebook(stem: str, config: str = "default", runs_dir: str | Path = "runs") -> Path:
    """The executed notebook of the complete run ``runs/<stem>/<config>/`` (see :mod:`fairbook.runs`).

    Raises a one-line :class:`BookError` naming the ``fairbook run`` command to use when there is no complete run.
    """
    run_dir = resolve(runs_dir) / stem / config
    command = f"fairbook run notebooks/{stem}.py -p params/{stem}/{config}.yaml"
    failed = run_dir.with_name(f"{config}.failed") / f"{stem}.ipynb"
    if not is_complete(run_dir):
        if failed.is_file():
            raise BookError(f"the last run of {stem} [{config}] failed (see {failed}): fix it, then `{command}`")
        raise BookError(f"no complete run of {stem} [{config}] in {run_dir}: run `{command}` first")
    return run_dir / f"{stem}.ipynb"


def _tagged(notebook, tag: str) -> int | None:
    return next((i for i, cell in enumerate(notebook.cells) if tag in cell.get("metadata", {}).get("tags", [])), None)


def parameters_source(source: str, values: dict, width: int = PARAMETER_LINE) -> str:
    """``source`` (a notebook's parameters cell) with every assignment of a name in ``values`` rewritten to that
    value, its trailing comment and the other lines kept; values too long for ``width`` are wrapped."""
    lines, out, done, last = source.splitlines(), [], set(), 0
    for node in ast.parse(source).body:
        target = (node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1
                  else node.target if isinstance(node, ast.AnnAssign) else None)
        if not (isinstance(target, ast.Name) and target.id in values):
            continue
        tail = lines[node.end_lineno - 1][node.end_col_offset:].strip()
        prefix = f"{target.id} = "
        value = pprint.pformat(values[target.id], width=max(20, width - len(prefix)), sort_dicts=False,
                               compact=True)
        rewritten = (prefix + value.replace("\n", "\n" + " " * len(prefix))).splitlines()
        if tail.startswith("#"):
            rewritten[-1] += f"  {tail}"
        out += lines[last:node.lineno - 1] + rewritten
        last = node.end_lineno
        done.add(target.id)
    out += lines[last:]
    out += [f"{name} = {values[name]!r}" for name in values if name not in done]
    return "\n".join(out)


def _data_label(params: dict) -> str:
    root = params.get("data_root")
    if not root:
        return "the runs this chapter reads (each table names its data)"
    path = resolve(root)
    return describe(path) if path.is_dir() else f"`{root}` (not on this machine when the book was built)"


def reader_page(executed: str | os.PathLike) -> nbformat.NotebookNode:
    """The page a reader sees of an executed notebook (``runs/<stem>/<config>/<stem>.ipynb``, next to its
    ``params.yaml`` and ``run.json``):

    * one parameters block: the notebook's ``parameters`` cell rewritten with the values the run used, headed by
      the configuration name, instead of the defaults followed by papermill's injected cell;
    * a note under the title naming the data (:func:`fairbook.data.describe` of ``data_root``), the configuration
      and its parameter file, and when and how long the run took.
    """
    executed = Path(executed)
    notebook = nbformat.read(executed, as_version=4)
    folder = executed.parent
    params_file, run_file = folder / "params.yaml", folder / "run.json"
    params = (yaml.safe_load(params_file.read_text()) if params_file.is_file() else None) or {}
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    config = run.get("config", folder.name)
    defaults, injected = _tagged(notebook, "parameters"), _tagged(notebook, "injected-parameters")
    if defaults is not None:
        cell = notebook.cells[defaults]
        cell.source = f"# the values of this run (configuration {config})\n" + parameters_source(cell.source, params)
        if injected is not None:
            del notebook.cells[injected]
    stem = executed.stem
    param_file = Path("params") / stem / f"{config}.yaml"
    where = f"`{config}` (`{param_file}`)" if resolve(param_file).is_file() else f"`{config}`"
    took = f", executed {run['finished'].replace('T', ' ')} in {run['seconds']:.0f} s" if "seconds" in run else ""
    note = nbformat.v4.new_markdown_cell(f"```{{note}}\n**Data:** {_data_label(params)}. **Configuration:** "
                                         f"{where}{took}.\n```", id="fairbook-data-note")  # a fixed id: same bytes
    first = notebook.cells[0] if notebook.cells else None
    if first is not None and first.cell_type == "markdown" and first.source.startswith("# "):
        heading, _, rest = first.source.partition("\n")
        first.source = heading  # the note goes right under the title, before the introduction
        if rest.strip():
            notebook.cells.insert(1, nbformat.v4.new_markdown_cell(rest.strip("\n"), id="fairbook-introduction"))
        notebook.cells.insert(1, note)
    else:
        notebook.cells.insert(0, note)
    return notebook


def write_if_changed(data: bytes, dest: Path) -> bool:
    """Write ``data`` to ``dest`` atomically unless ``dest`` already has the same bytes; True if it wrote.

    Leaving unchanged files untouched keeps their mtime, so Sphinx's incremental build skips them.
    """
    if dest.is_file() and dest.read_bytes() == data:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)
    return True


def ensure_mathjax(book_dir: str | Path = "book", cache_dir: str | Path | None = None) -> Path:
    """Make ``<book_dir>/_mathjax/mathjax`` hold MathJax 3's browser build; returns the entry script path.

    When missing, ``npm install mathjax@3`` runs once into ``cache_dir`` (default ``.cache/mathjax`` next to the
    book folder) and its ``es5/`` folder is copied in, so pages load MathJax from the book itself, not a CDN.
    """
    target_root = Path(book_dir) / "_mathjax"
    entry = target_root / MATHJAX_ENTRY
    if entry.is_file():
        return entry
    cache = Path(cache_dir) if cache_dir is not None else Path(book_dir).resolve().parent / ".cache" / "mathjax"
    es5 = cache / "node_modules" / "mathjax" / "es5"
    if not (es5 / MATHJAX_ENTRY.name).is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise BookError("npm not found: install Node.js (e.g. `apt-get install npm`) so MathJax can be vendored "
                            f"into {target_root}")
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", MATHJAX_NPM],
                              capture_output=True, text=True)
        if done.returncode != 0 or not (es5 / MATHJAX_ENTRY.name).is_file():
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise BookError(f"`npm install {MATHJAX_NPM}` into {cache} failed ({last[0]}); check npm's registry access")
    target_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target_root, prefix=".mathjax-"))
    shutil.copytree(es5, staging, dirs_exist_ok=True)
    if entry.parent.exists():  # left over from an interrupted copy
        shutil.rmtree(entry.parent)
    os.replace(staging, entry.parent)
    return entry


def _run_outputs(stem: str, config: str, runs_dir) -> tuple[dict, dict] | None:
    """``(metrics.json, run.json)`` of the complete run ``runs/<stem>/<config>/``, or None when there is none."""
    folder = resolve(runs_dir) / stem / config
    if not is_complete(folder):
        return None
    metrics = folder / "metrics.json"
    return (json.loads(metrics.read_text()) if metrics.is_file() else {}), json.loads((folder / "run.json").read_text())


#: Marks of the glance page's verdict cells, each followed by the difference and its interval, unbreakable.
HELD, NOT_HELD = "✓", "✗"


def _verdict_cell(row: dict) -> str:
    if row["verdict"] == "not run":
        return "not run"
    numbers = estimate(100 * row["diff"], lo=100 * row["boot_lo"], hi=100 * row["boot_hi"], signed=True)
    return NBSP.join([HELD if row["held"] else NOT_HELD, numbers])


def _markdown_table(frame: pd.DataFrame) -> list[str]:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)]
    return [header, rule, *body, ""]


def at_a_glance(config: str = "default", runs_dir: str | Path = "runs", book_dir: str | Path = "book") -> str:
    """The results-at-a-glance page (Markdown), generated from the runs of ``config``: each paper's claims
    (:data:`fairbook.methods.CLAIMS`) with the verdict of the chapter that tests them
    (:func:`fairbook.tables.claim_verdicts`), the leaderboard's top rows, and the data and configuration of every
    chapter. It is written anew at every book build, so it follows the last run of each chapter."""
    stems = toc_stems(resolve(book_dir))
    runs = {stem: found for stem in stems if (found := _run_outputs(stem, config, runs_dir)) is not None}
    paired = [pd.DataFrame(metrics["paired"]).assign(chapter=stem) for stem, (metrics, _) in runs.items()
              if isinstance(metrics.get("paired"), list) and metrics["paired"]]
    verdicts = claim_verdicts(CLAIMS, pd.concat(paired, ignore_index=True) if paired else pd.DataFrame())
    lines = ["# Results at a glance", "",
             f"Which of the papers' claims held in this book's runs (configuration `{config}`), computed from the "
             "runs when the book was built. A claim *held* under an attribute when the paired bootstrap interval of "
             "the difference (method − baseline, percentage points, mean over seeds) excludes zero in the paper's "
             f"direction; *not worse* holds unless the interval lies wholly on the wrong side. {HELD} held, {NOT_HELD} "
             "did not hold, each with the difference and its 95% interval. The data each number comes from is "
             "listed at the end.", ""]
    for paper, rows in verdicts.groupby("paper", sort=False):
        attributes = attribute_order(rows["attribute"])
        table = []
        for (source, statement, chapter), claim_rows in rows.groupby(["source", "statement", "chapter"], sort=False):
            by_attribute = {r["attribute"]: r for r in claim_rows.to_dict("records")}
            held = claim_rows["held"].dropna()
            summary = f"{int(held.sum())} of {len(held)}" if len(held) else "not run"
            link = f"{{doc}}`{chapter[:2]} <notebooks/{chapter}>`"
            table.append({"claim": f"{statement} ({source})", "chapter": link,
                          "held under": summary.replace(" ", NBSP),
                          **{a: _verdict_cell(by_attribute[a]) if a in by_attribute else "–" for a in attributes}})
        lines += [f"## {paper}", "", *_markdown_table(pd.DataFrame(table))]
    lines += ["## Leaderboard", ""]
    board = runs.get(LEADERBOARD_CHAPTER, ({}, {}))[0].get("leaderboard")
    if isinstance(board, list) and board:
        top = pd.DataFrame(board)[["Model", "mean rank", "columns"]].head(LEADERBOARD_ROWS)
        lines += [f"Every method trained on the harness, ranked over its (attribute, metric) columns, best = 1 (top "
                  f"{len(top)} of {len(board)}; the whole table and its intervals are in "
                  f"{{doc}}`the results chapter <notebooks/{LEADERBOARD_CHAPTER}>`).", "", *_markdown_table(top)]
    else:
        lines += [f"No complete run of {LEADERBOARD_CHAPTER} [{config}] yet.", ""]
    lines += ["## Data and configuration", ""]
    sources = [{"chapter": f"{{doc}}`{stem} <notebooks/{stem}>`", "data": metrics.get("data", "–"),
                "configuration": f"`{info.get('config', config)}`", "run finished": info.get("finished", "–")}
               for stem, (metrics, info) in runs.items()]
    missing = [stem for stem in stems if stem not in runs]
    lines += _markdown_table(pd.DataFrame(sources)) if sources else []
    if missing:
        lines += [f"Not run yet under `{config}`: {', '.join(missing)}.", ""]
    return "\n".join(lines)


def build_book(config: str = "default", runs_dir: str | Path = "runs", book_dir: str | Path = "book") -> Path:
    """Write the reader's pages (:func:`reader_page`) of the executed notebooks of ``config`` into the book, build
    its HTML, return ``_build/html/index.html``.

    Relative paths are taken from the project root (:func:`fairbook.files.resolve`). Files whose bytes did not
    change are not rewritten, so a second build with nothing changed is incremental.
    """
    book = resolve(book_dir)
    write_if_changed(at_a_glance(config, runs_dir, book).encode(), book / GLANCE_PAGE)
    for stem in toc_stems(book):
        page = reader_page(executed_notebook(stem, config, runs_dir))
        write_if_changed(nbformat.writes(page).encode(), book / "notebooks" / f"{stem}.ipynb")
    ensure_mathjax(book)
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    done = subprocess.run([str(jupyter_book), "build", str(book)], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-LOG_TAIL_LINES:])
        raise BookError(f"`jupyter-book build {book}` failed (exit {done.returncode}); end of its log:\n{tail}")
    index = book / "_build" / "html" / "index.html"
    if not index.is_file():
        raise BookError(f"jupyter-book finished but wrote no {index}; check {book / '_toc.yml'}")
    return index
