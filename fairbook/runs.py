"""Runs: execute a py:percent notebook with papermill under a parameter file, atomically and resumably.

A run of ``notebooks/<stem>.py`` under configuration ``<config>`` lives in ``runs/<stem>/<config>/``:

- ``<stem>.ipynb``: the executed notebook;
- ``params.yaml``: the merged parameters it ran with;
- ``run.json``: the fingerprint (notebook source + parameters + fairbook's own source), timings, status;
- whatever the notebook saved through :func:`save_metrics` and :func:`fairbook.plots.savefig`
  (``metrics.json``, ``figures/``).

The run is executed in a temporary sibling folder that is renamed only on success, so a crashed or killed run
never looks complete; the next run of the same configuration removes what a killed one left. A run whose fingerprint
is unchanged is not executed again. Configuration names are single folder names (:func:`check_config_name`), so a
run can only ever replace its own folder.

Every chapter calls :func:`begin` right after its parameters cell. Under ``fairbook run`` it returns the run's
folder; executed any other way (papermill used directly, JupyterLab) it gives the execution its own folder named
from the parameter values (or the reserved ``run_dir`` parameter), written the same atomic way.
"""
from __future__ import annotations

import ast
import atexit
import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from fairbook.files import (
    atomic_write_text,
    one_line,
    project_root,
    replace_dir,
    resolve,
    temporary_sibling,
    to_jsonable,
)

KERNEL = "fairbook"
RUN_DIR_ENV = "FAIRBOOK_RUN_DIR"
RUN_CONFIG_ENV = "FAIRBOOK_RUN_CONFIG"
#: Seconds one cell may run before the run fails (a hung kernel must not hang a sweep or CI forever).
CELL_TIMEOUT = int(os.environ.get("FAIRBOOK_CELL_TIMEOUT", 3600))
#: Longest run-folder name :func:`config_name` makes (file systems allow 255 bytes; temporary names add more).
MAX_CONFIG_NAME = 120


class ParameterError(ValueError):
    """A parameter file or ``--set`` value does not match the notebook's parameters cell."""


class RunError(RuntimeError):
    """A notebook failed while executing; the message names the failing cell."""


# --------------------------------------------------------------------------------------------------------------
# paths


def output_dir() -> Path:
    """Where a notebook writes its metrics and figures: the run folder under ``fairbook run``, else the folder
    :func:`begin` chose for this execution (papermill used directly, JupyterLab), else ``runs/interactive/`` (code
    that never called :func:`begin`)."""
    out = Path(os.environ.get(RUN_DIR_ENV) or _EXECUTION.get("tmp") or resolve("runs/interactive"))
    out.mkdir(parents=True, exist_ok=True)
    return out


#: Reserved parameter of every chapter: the run folder of an execution outside ``fairbook run`` (None: named from
#: the parameter values; a name: ``runs/<stem>/<name>/``; an absolute path: used as given).
RUN_DIR_PARAMETER = "run_dir"
#: This kernel's execution outside ``fairbook run``: its temporary and final folders, the time it began and whether
#: the last cell succeeded.
_EXECUTION: dict[str, Any] = {}


def begin(stem: str, namespace: dict) -> Path:
    """Start this execution of chapter ``stem`` (``namespace``: the notebook's ``globals()``, after its parameters
    cell): print where its results go and return the folder to write them in.

    Under ``fairbook run`` that is the run's folder. Otherwise (papermill used directly, JupyterLab) every execution
    gets its own folder, ``runs/<stem>/<name>/``, named as ``fairbook run`` names a run from ``--set`` values:
    ``defaults`` plus each parameter whose value differs from the notebook's default (:func:`config_name`, a
    digest when too long), so two executions with different parameters never share a folder. The reserved
    parameter ``run_dir`` chooses it instead: a folder name (validated like ``--name``) under ``runs/<stem>/``, or
    an absolute path, used as given. As under ``fairbook run``, the results are written to a temporary sibling
    with ``params.yaml`` and renamed over the folder, atomically, when the kernel shuts down after a successful last
    cell (``run.json`` then says complete); after a failed last cell it becomes ``<name>.failed``. So re-executing
    with the same parameters replaces that one folder atomically."""
    if os.environ.get(RUN_DIR_ENV):
        out = Path(os.environ[RUN_DIR_ENV])
        print(f"results of this run (fairbook run):\nruns/{os.environ.get(RUN_CONFIG_ENV, stem)}/")
        return out
    notebook = project_root() / "notebooks" / f"{stem}.py"
    defaults = notebook_parameters(notebook)
    values = {k: namespace[k] for k in defaults if k in namespace}
    chosen = values.pop(RUN_DIR_PARAMETER, None)
    if chosen is None:
        changed = {k: v for k, v in values.items() if v != defaults.get(k)}
        final = resolve("runs") / stem / config_name(overrides=changed)
    elif Path(str(chosen)).is_absolute():
        final = Path(str(chosen))
    else:
        final = resolve("runs") / stem / check_config_name(str(chosen), "the run_dir parameter")
    if _EXECUTION.get("final") != final:
        _finish()   # a kernel re-run with other parameters: the earlier execution ends here
        tmp = temporary_sibling(final)
        tmp.mkdir(parents=True)
        atomic_write_text(tmp / "params.yaml", yaml.safe_dump(to_jsonable({**values, RUN_DIR_PARAMETER: chosen}),
                                                               sort_keys=True))
        _EXECUTION.update(tmp=tmp, final=final, stem=stem, started=time.time(), ok=True)
        os.environ[RUN_CONFIG_ENV] = f"{stem}/{final.name}"
        _watch_cells()
    shown = final.relative_to(project_root()) if final.is_relative_to(project_root()) else final
    print(f"results of this execution:\n{shown}\n(kept in a hidden folder beside it until the kernel shuts down\n"
          "after a successful last cell)")
    return _EXECUTION["tmp"]


def _watch_cells() -> None:
    """Record whether each cell succeeds (IPython's ``post_run_cell``) and finish the execution at exit, once."""
    if _EXECUTION.get("watching"):
        return
    _EXECUTION["watching"] = True
    from IPython import get_ipython

    shell = get_ipython()   # None in a plain Python process: its exit finishes the execution
    if shell is not None:
        shell.events.register("post_run_cell", lambda result: _EXECUTION.update(ok=bool(result.success)))
    atexit.register(_finish)


def _finish() -> None:
    """Rename the execution's temporary folder over its final one (with ``run.json``), or to ``<name>.failed``."""
    tmp, final = _EXECUTION.pop("tmp", None), _EXECUTION.pop("final", None)
    if tmp is None or not tmp.is_dir():
        return
    if not _EXECUTION.get("ok", True):
        failed = final.with_name(f"{final.name}.failed")
        shutil.rmtree(failed, ignore_errors=True)
        os.replace(tmp, failed)
        return
    info = {"notebook": f"notebooks/{_EXECUTION['stem']}.py", "config": final.name, "status": "complete",
            "seconds": round(time.time() - _EXECUTION["started"], 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "executed_by": "papermill or a kernel (not fairbook run)"}
    atomic_write_text(tmp / "run.json", json.dumps(info, indent=2) + "\n")
    replace_dir(tmp, final)


def save_metrics(metrics: dict, name: str = "metrics.json") -> None:
    """Save a notebook's headline numbers as JSON in its run folder (NaN becomes null).

    A ``config`` entry (``<notebook>/<configuration>``, or ``interactive``) is added, so that every saved number
    carries the configuration it came from; the notebook adds the data label itself. Returns nothing, so a
    notebook cell ending with it shows no path.
    """
    path = output_dir() / name
    labelled = {"config": os.environ.get(RUN_CONFIG_ENV, "interactive"), **metrics}
    atomic_write_text(path, json.dumps(to_jsonable(labelled), indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------------------
# parameters


def _read_source(notebook: Path):
    import jupytext

    if not notebook.exists():
        raise FileNotFoundError(f"no notebook at {notebook}: give the path of a notebooks/*.py source")
    if not notebook.is_file():
        raise ParameterError(f"{notebook} is a folder, not a notebook: give one chapter source, e.g. "
                             "notebooks/01-data-exploration.py")
    try:
        return jupytext.read(notebook)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ParameterError(f"cannot read notebook {notebook} ({one_line(exc)}): give a py:percent source "
                             "from notebooks/") from None


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """The content of a YAML file, read with ``yaml.safe_load``; a missing, unreadable or malformed file (or one
    with Python tags such as ``!!python/object``, which safe loading refuses) raises a one-line
    :class:`ParameterError` naming the file, the line and what was expected."""
    path = resolve(path)
    if not path.exists():
        raise ParameterError(f"no {what} at {path}: check the path")
    if not path.is_file():
        raise ParameterError(f"{path} is a folder: give the path of a {what}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParameterError(f"cannot parse {path} as YAML{where} ({problem}): write plain YAML "
                             f"(key: value lines, no !!python tags)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParameterError(f"cannot read {what} {path} ({one_line(exc)}): give a readable text file") from None


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, Any]:
    """The names and default values assigned in the notebook's cell tagged ``parameters``."""
    nb = _read_source(resolve(notebook))
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ParameterError(f"{notebook} must have exactly one cell tagged 'parameters' (found {len(cells)})")
    params = {}
    for node in ast.parse(cells[0].source).body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        for t in targets:
            if isinstance(t, ast.Name):
                try:
                    params[t.id] = ast.literal_eval(node.value)
                except ValueError:
                    params[t.id] = ast.unparse(node.value)
    return params


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``["seed=1", "attribute=race"]`` -> ``{"seed": 1, "attribute": "race"}`` (values parsed as YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ParameterError(f"--set {item!r}: the value is not valid YAML; quote strings that hold "
                                 "brackets, colons or braces") from None
    return out


def load_params(files: Iterable[str | os.PathLike] = (), overrides: dict | None = None) -> dict[str, Any]:
    """Merge YAML parameter files left to right (shallow), then ``overrides``."""
    merged: dict[str, Any] = {}
    for f in files:
        data = read_yaml(f, "parameter file")
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ParameterError(f"{resolve(f)} must hold a mapping of parameter names to values "
                                 f"(found a {type(data).__name__}): write one 'name: value' line per parameter")
        merged.update(data)
    merged.update(overrides or {})
    return merged


def check_params(notebook: str | os.PathLike, params: dict) -> None:
    """Raise a one-line :class:`ParameterError` for any key that the notebook's parameters cell does not declare."""
    valid = notebook_parameters(notebook)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ParameterError(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for "
            f"{Path(notebook).stem}; valid: {', '.join(valid)}"
        )


# --------------------------------------------------------------------------------------------------------------
# running


_CONFIG_NAME = re.compile(r"[A-Za-z0-9_+=-][A-Za-z0-9_.+=-]*")


def check_config_name(name: str, origin: str = "--name") -> str:
    """Return ``name`` if it can name a run folder ``runs/<stem>/<name>/``, else raise a one-line
    :class:`ParameterError` saying where the name came from (``origin``).

    A valid name is one path component of letters, digits and ``_ . + = -`` that does not start with a dot (no
    ``.``, ``..``, hidden or empty names, no separators), does not end in ``.failed`` (the folder of a failed run)
    and has at most :data:`MAX_CONFIG_NAME` characters. So a run can only ever replace its own folder.
    """
    name = str(name)
    if not _CONFIG_NAME.fullmatch(name) or name.endswith(".failed") or len(name) > MAX_CONFIG_NAME:
        raise ParameterError(
            f"invalid configuration name {name!r} (from {origin}): use up to {MAX_CONFIG_NAME} letters, digits "
            "and _ . + = - with no leading dot, no path separator and no .failed ending, e.g. --name seed-1"
        )
    return name


def config_name(files: Iterable[str | os.PathLike] = (), overrides: dict | None = None) -> str:
    """``default`` for ``-p params/x/default.yaml``; ``default__seed-1`` with ``--set seed=1``.

    Names longer than :data:`MAX_CONFIG_NAME` characters (overrides holding paths) keep their first part and end
    with a digest of the whole, so that the folder name stays valid and unique.
    """
    parts = ["+".join(Path(f).stem for f in files) or "defaults"]
    parts += [f"{k}-{v}" for k, v in (overrides or {}).items()]
    name = re.sub(r"[^A-Za-z0-9_.+=-]", "_", "__".join(parts))
    if len(name) > MAX_CONFIG_NAME:
        name = f"{name[:MAX_CONFIG_NAME - 13]}__{hashlib.sha256(name.encode()).hexdigest()[:11]}"
    return check_config_name(name, "the parameter-file stems and --set values; pass --name")


def _package_digest() -> str:
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for f in sorted(pkg.rglob("*")):
        if f.suffix in {".py", ".json"} and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(pkg)).encode() + f.read_bytes())
    return h.hexdigest()


def fingerprint(notebook: Path, params: dict) -> str:
    """What makes a run's result: the notebook source, its parameters and fairbook's own code."""
    h = hashlib.sha256(notebook.read_bytes())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(_package_digest().encode())
    return h.hexdigest()[:16]


def is_complete(run_dir: Path, fp: str | None = None) -> bool:
    """A run is complete when its ``run.json`` says so (and, if given, matches the fingerprint)."""
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("status") == "complete" and (fp is None or info.get("fingerprint") == fp)


def ensure_kernel(name: str = KERNEL) -> str:
    """Register a kernel called ``name`` for this interpreter if Jupyter does not know it yet."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(kernel_name=name, display_name=f"Python ({name})", prefix=sys.prefix)
    return name


def run_notebook(
    notebook: str | os.PathLike,
    param_files: Iterable[str | os.PathLike] = (),
    overrides: dict | None = None,
    *,
    name: str | None = None,
    runs_dir: str | os.PathLike = "runs",
    force: bool = False,
) -> Path:
    """Execute ``notebook`` with merged parameters into ``runs/<stem>/<config>/`` and return that folder.

    Skips the run when a complete one with the same fingerprint exists (unless ``force``). On failure the partial
    run is kept in ``<config>.failed/`` and a :class:`RunError` names the failing cell.
    """
    import jupytext
    import papermill as pm

    notebook = resolve(notebook)
    param_files = list(param_files)
    params = load_params(param_files, overrides)
    check_params(notebook, params)
    if params.get(RUN_DIR_PARAMETER) is not None:
        raise ParameterError(f"{RUN_DIR_PARAMETER} chooses the folder of an execution outside fairbook run; "
                             "fairbook run names its folder itself: pass --name instead")
    stem = check_config_name(notebook.stem, "the notebook's file name")
    config = check_config_name(name) if name is not None else config_name(param_files, overrides)
    final = resolve(runs_dir) / stem / config
    fp = fingerprint(notebook, params)
    if not force and is_complete(final, fp):
        return final

    tmp = temporary_sibling(final)  # also removes what killed runs of this configuration left behind
    tmp.mkdir(parents=True)
    nb = jupytext.read(notebook)
    kernel = ensure_kernel()
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": f"Python ({kernel})", "language": "python"}
    source = tmp / f".{stem}.source.ipynb"
    jupytext.write(nb, source)

    started = time.time()
    try:
        with _kernel_environment(tmp, f"{stem}/{config}"):
            pm.execute_notebook(
                str(source), str(tmp / f"{stem}.ipynb"), parameters=params, kernel_name=kernel,
                cwd=str(project_root()), progress_bar=False, log_output=False,
                execution_timeout=CELL_TIMEOUT,
                extra_arguments=["--IPKernelApp.log_level=ERROR"],  # no kernel start-up warnings on the terminal
            )
    except pm.PapermillExecutionError as err:
        failed = final.with_name(f"{config}.failed")
        shutil.rmtree(failed, ignore_errors=True)
        os.replace(tmp, failed)
        raise RunError(
            f"{stem} [{config}] failed in cell {err.cell_index} (execution count {err.exec_count}): "
            f"{err.ename}: {err.evalue}; see {failed / (stem + '.ipynb')}"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    source.unlink()

    atomic_write_text(tmp / "params.yaml", yaml.safe_dump(params, sort_keys=True))
    shown = notebook.relative_to(project_root()) if notebook.is_relative_to(project_root()) else notebook
    info = {"notebook": str(shown),
            "config": config, "fingerprint": fp, "status": "complete", "seconds": round(time.time() - started, 1),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(tmp / "run.json", json.dumps(info, indent=2) + "\n")
    replace_dir(tmp, final)
    shutil.rmtree(final.with_name(f"{config}.failed"), ignore_errors=True)
    return final


@contextlib.contextmanager
def _kernel_environment(run_dir: Path, label: str):
    """The kernel inherits this process's environment: point it at the run folder and its configuration, and drop
    a non-inline ``MPLBACKEND`` (e.g. ``Agg`` from a CI shell), which would keep every figure out of the notebook."""
    saved = {k: os.environ.get(k) for k in (RUN_DIR_ENV, RUN_CONFIG_ENV, "MPLBACKEND")}
    os.environ[RUN_DIR_ENV] = str(run_dir)
    os.environ[RUN_CONFIG_ENV] = label
    os.environ.pop("MPLBACKEND", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------------------------------
# sweeps


def expand_grid(grid_file: str | os.PathLike) -> list[dict]:
    """Read a sweep file and list its runs.

    The file names a ``notebook``, optional base ``params`` files and a ``grid`` of parameter lists::

        notebook: notebooks/01-data-exploration.py
        params: [params/01-data-exploration/smoke.yaml]
        grid: {seed: [0, 1, 2], attribute: [race, gender]}

    Each run is a dict with ``notebook``, ``params`` (files) and ``overrides`` (one point of the grid).
    """
    path = resolve(grid_file)
    spec = read_yaml(path, "sweep file")
    if not isinstance(spec, dict):
        raise ParameterError(f"{path} must be a mapping with 'notebook', optional 'params' and 'grid' "
                             f"(found a {type(spec).__name__})")
    missing = {"notebook", "grid"} - set(spec)
    if missing:
        raise ParameterError(f"{path} lacks {', '.join(sorted(missing))}: a sweep file needs 'notebook' and 'grid'")
    grid = spec["grid"]
    problem = _grid_problem(grid)
    if problem:
        raise ParameterError(f"{path}: 'grid' must be a mapping of parameter names to non-empty lists, e.g. "
                             f"grid: {{seed: [0, 1, 2]}} (found {problem})")
    if not isinstance(spec["notebook"], str) or not resolve(spec["notebook"]).is_file():
        raise ParameterError(f"{path}: notebook {spec['notebook']!r} is not a notebook file; give the path of a "
                             "notebooks/*.py source")
    files = spec.get("params") or []
    files = [files] if isinstance(files, str) else files
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ParameterError(f"{path}: 'params' must be a parameter-file path or a list of them")
    return [
        {"notebook": spec["notebook"], "params": files, "overrides": dict(zip(grid, point))}
        for point in itertools.product(*grid.values())
    ]


def _grid_problem(grid: Any) -> str | None:
    """What is wrong with a sweep grid, or None when it is a mapping of non-empty lists."""
    if not isinstance(grid, dict):
        return f"a {type(grid).__name__}"
    if not grid:
        return "an empty grid"
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            return f"{key}: {'an empty list' if values == [] else repr(values)}"
    return None


def sweep(grid_file: str | os.PathLike, *, runs_dir: str | os.PathLike = "runs", force: bool = False,
          progress: bool = True) -> list[Path]:
    """Execute every run of a sweep file, skipping completed ones; failures are collected and reported at the end,
    so one bad point does not stop the others and a re-run resumes where the sweep stopped."""
    from tqdm.auto import tqdm

    runs = expand_grid(grid_file)
    for r in runs:  # validate every point (parameters and run names) before spending time on any
        check_params(resolve(r["notebook"]), load_params(r["params"], r["overrides"]))
        config_name(r["params"], r["overrides"])
    done, failures = [], []
    for r in tqdm(runs, desc=Path(grid_file).stem, disable=not progress, unit="run"):
        try:
            done.append(run_notebook(r["notebook"], r["params"], r["overrides"], runs_dir=runs_dir, force=force))
        except RunError as err:
            failures.append(str(err))
    if failures:
        raise RunError(f"{len(failures)} of {len(runs)} runs failed; first: {failures[0]}")
    return done
