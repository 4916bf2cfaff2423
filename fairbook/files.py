"""Files: where the checkout is, files written so that readers never see half of them, temporary folders that do
not outlive their writer, and plain JSON.

Relative paths are taken from the checkout (:func:`resolve`), so notebooks, tests and the command work from any
folder.

Everything fairbook writes for later (run folders, datasets, reports) is first written under a hidden temporary
sibling ``.<name>.tmp-<pid>`` and renamed into place when complete. A writer that is killed (SIGKILL, a lost
machine) cannot clean up after itself, so the next writer of the same name removes the temporaries whose process
is gone (:func:`temporary_sibling`). A temporary whose process is still alive is left alone, so two writers never
delete each other's work.

This module depends on nothing else in fairbook, so both the data generator and the runner use it.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np


class OutputPathError(ValueError):
    """An output path that cannot be written as asked (a folder where a file is expected, and so on)."""


def project_root() -> Path:
    """The fairbook checkout: ``$FAIRBOOK_ROOT``, else the folder above the package holding ``pyproject.toml``."""
    if os.environ.get("FAIRBOOK_ROOT"):
        return Path(os.environ["FAIRBOOK_ROOT"]).resolve()
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def resolve(path: str | os.PathLike) -> Path:
    """An absolute path; relative paths are taken from the project root, so notebooks work from any folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def to_jsonable(obj: Any) -> Any:
    """Plain Python types for ``json.dumps``: numpy scalars and arrays unwrapped, NaN and infinities as None, a
    pandas Series as ``{index: value}`` and a DataFrame as a list of row records (index included)."""
    if hasattr(obj, "to_dict") and hasattr(obj, "index"):  # pandas: Series as {index: value}, DataFrame as records
        obj = obj.to_dict() if obj.ndim == 1 else obj.reset_index().to_dict("records")
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``"Type: message"`` of an exception on one line (whitespace folded, cut at ``limit`` characters), for the
    detail part of a one-line error."""
    text = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {text[:limit]}"


def _process_alive(pid: int) -> bool:
    """True when a process with this id exists (or might: a process of another user counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def stale_siblings(path: str | os.PathLike) -> list[Path]:
    """The leftovers of killed writers of ``path``: ``.<name>.tmp-<pid>`` and ``.<name>.old-<pid>`` beside it whose
    process no longer exists."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)")
    if not path.parent.is_dir():
        return []
    return sorted(
        entry for entry in path.parent.iterdir()
        if (match := pattern.fullmatch(entry.name)) and not _process_alive(int(match.group(1)))
    )


def temporary_sibling(path: str | os.PathLike) -> Path:
    """The hidden sibling ``.<name>.tmp-<pid>`` in which this process builds ``path`` (not created here).

    Leftovers of killed writers of the same ``path`` are removed first, and so is this process's own earlier
    temporary, so a rerun starts clean.
    """
    path = Path(path)
    for leftover in stale_siblings(path):
        _remove(leftover)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    return tmp


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers never see half a file.

    A ``path`` that is a folder is refused with a one-line :class:`OutputPathError`, and no temporary file is left
    behind if the write fails.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path} is a folder: give the path of a file to write, e.g. {path / 'report.json'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move the folder ``src`` to ``dst``, replacing an older ``dst``; at no moment is a half-written ``dst``
    visible. A writer killed between the two renames leaves ``.<dst>.old-<pid>``, which the next
    :func:`temporary_sibling` of ``dst`` removes."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(dst, old)
        os.replace(src, dst)
        _remove(old)
    else:
        os.replace(src, dst)


__all__ = ["OutputPathError", "atomic_write_text", "one_line", "project_root", "replace_dir", "resolve",
           "stale_siblings", "temporary_sibling", "to_jsonable"]
