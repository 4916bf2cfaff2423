"""Build the Jupyter Book from notebooks that ``fairbook run`` already executed.

The book never executes anything (``execute_notebooks: "off"`` in ``book/_config.yml``): :func:`build_book` copies
``runs/<stem>/<config>/<stem>.ipynb`` for every notebook listed in ``book/_toc.yml`` into ``book/notebooks/``,
vendors MathJax 3 into ``book/_mathjax/mathjax`` (served locally instead of from a CDN) and calls
``jupyter-book build``. Both ``book/notebooks/`` and ``book/_mathjax/`` are generated.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from fairbook.files import resolve
from fairbook.runs import is_complete

#: npm package spec of the MathJax release served with the book (its ``es5/`` folder is the browser build).
MATHJAX_NPM = "mathjax@3"
#: Entry point named by ``mathjax_path`` in ``book/_config.yml``, relative to ``book/_mathjax/``.
MATHJAX_ENTRY = Path("mathjax") / "tex-mml-chtml.js"
#: Lines of the jupyter-book log shown when the build fails.
LOG_TAIL_LINES = 40


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


def copy_if_changed(src: Path, dest: Path) -> bool:
    """Copy ``src`` to ``dest`` atomically unless ``dest`` already has the same bytes; True if it wrote.

    Leaving unchanged files untouched keeps their mtime, so Sphinx's incremental build skips them.
    """
    data = src.read_bytes()
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


def build_book(config: str = "default", runs_dir: str | Path = "runs", book_dir: str | Path = "book") -> Path:
    """Copy the executed notebooks of ``config`` into the book, build its HTML, return ``_build/html/index.html``.

    Relative paths are taken from the project root (:func:`fairbook.files.resolve`). Files whose bytes did not
    change are not rewritten, so a second build with nothing changed is incremental.
    """
    book = resolve(book_dir)
    for stem in toc_stems(book):
        copy_if_changed(executed_notebook(stem, config, runs_dir), book / "notebooks" / f"{stem}.ipynb")
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
