"""The results store: every trained model's predictions, per seed, with the record of how it was trained.

A fine-tuning chapter saves one folder per (method, training attribute, seed) in its run folder::

    runs/<chapter>/<config>/predictions/<method>/<attribute>/seed-<k>/   (method percent-encoded: "w%2Fo FOL")
        validation.csv, test.csv    y_true, y_score and the four attributes (save_predictions)
        info.json                   training record (chosen epoch, validation AUC, method, ...); written last

``attribute`` is the attribute a fairness method trained on (FairCLIP on race, ...) or ``all`` for a method that
uses none (CLIP). :func:`collect` finds the folders; :mod:`fairbook.tables` scores and compares them.

A segmentation model (:func:`fairbook.protocol.train_segmentation`) is saved the same way under
``run_dir/segmentation/`` (:data:`SEGMENTATION`) by :func:`save_segmentation`: its CSVs hold the per-case ``dice``
and ``iou`` with the attributes, and ``collect(run_dir, kind=SEGMENTATION)`` finds them.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pandas as pd

from fairbook.data.attributes import FILTER_ATTRIBUTES, ITEM_ATTRIBUTES, decode
from fairbook.files import atomic_write_text, resolve, to_jsonable

__all__ = ["ALL", "PREDICTIONS", "SEGMENTATION", "ResultsError", "collect", "compare_runs", "model_folder",
           "read_predictions", "same_data", "save", "save_predictions", "save_segmentation"]

PREDICTIONS = "predictions"
#: Folder of a run's segmentation models (per-case Dice instead of scores).
SEGMENTATION = "segmentation"
#: Training attribute of a method that uses no sensitive attribute (CLIP).
ALL = "all"


class ResultsError(ValueError):
    """Missing or inconsistent saved results."""


def model_folder(run_dir: str | os.PathLike, method: str, attribute: str, seed: int, kind: str = PREDICTIONS) -> Path:
    """``run_dir/<kind>/<method>/<attribute>/seed-<k>``: where a model's predictions (or, with
    ``kind="checkpoints"``, its weights) live; the method name is percent-encoded, so "w/o" stays one folder."""
    if not method.strip():
        raise ResultsError("method name is empty; name the method, e.g. 'CLIP'")
    return Path(run_dir) / kind / quote(method, safe=" ") / attribute / f"seed-{int(seed)}"


def save_predictions(path: str | os.PathLike, y_true, y_score, attributes_codes, split: str,
                     attribute_names: Sequence[str] | None = None) -> Path:
    """Write a predictions CSV atomically: ``y_true, y_score, race, gender, ethnicity, language, age, split``.

    Attribute codes (columns in ``attribute_names`` order; by default the items' own,
    :data:`~fairbook.data.attributes.ITEM_ATTRIBUTES`: the four codes then the age, or the four codes alone) are
    decoded to names with :func:`fairbook.data.attributes.decode`. The file is what ``fairbook metrics`` reads
    (:func:`fairbook.metrics.report_from_csv`); scores are written at full precision.
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    codes = np.asarray(attributes_codes)
    if attribute_names is None:
        width = codes.shape[1] if codes.ndim == 2 else 0
        attribute_names = ITEM_ATTRIBUTES if width == len(ITEM_ATTRIBUTES) else FILTER_ATTRIBUTES
    if codes.ndim != 2 or codes.shape != (len(y_true), len(attribute_names)) or len(y_score) != len(y_true):
        raise ResultsError(f"save_predictions needs {len(y_true)} labels, as many scores (got {len(y_score)}) and an "
                         f"n x {len(attribute_names)} code matrix (got shape {codes.shape}); pass the arrays of "
                         "one split")
    frame = pd.DataFrame({"y_true": y_true, "y_score": y_score})
    for j, name in enumerate(attribute_names):
        frame[name] = [decode(name, code) for code in codes[:, j]]
    frame["split"] = split
    path = Path(path)
    atomic_write_text(path, frame.to_csv(index=False))
    return path


def save(run_dir: str | os.PathLike, method: str, seed: int, scores: Mapping[str, tuple], data: str,
         info: Mapping | None = None, attribute: str = ALL) -> Path:
    """Save one trained model's validation and test predictions (``scores`` as :func:`fairbook.train.fit_and_score`
    returns them), the label of its data (:func:`fairbook.data.describe`) and its training record; returns the
    folder. ``info.json`` is written last, so a folder without it is an interrupted save and :func:`collect`
    ignores it. A model trained only to choose a setting on validation is saved without test predictions
    (``scores`` without ``"test"``: the test split was never scored)."""
    _check_training_attribute(attribute)
    if "validation" not in scores or not set(scores) <= {"validation", "test"}:
        raise ResultsError(f"scores hold the splits {sorted(scores)}: pass validation, and test unless the model "
                           "only serves a choice on validation")
    folder = model_folder(run_dir, method, attribute, seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, (y, p, codes) in scores.items():
        save_predictions(folder / f"{split}.csv", y, p, codes, split)
    return _write_info(folder, data, info)


def save_segmentation(run_dir: str | os.PathLike, method: str, seed: int, scores: Mapping[str, tuple], data: str,
                      info: Mapping | None = None, attribute: str = ALL) -> Path:
    """:func:`save` for a segmentation model: ``scores`` maps each split to ``(dice, iou, codes)`` per case
    (:meth:`fairbook.segmentation.training.Segmentation.scores`), written as ``dice, iou, race, gender, ethnicity,
    language, age, split`` under ``run_dir/segmentation/``; ``info.json`` last."""
    _check_training_attribute(attribute)
    folder = model_folder(run_dir, method, attribute, seed, kind=SEGMENTATION)
    folder.mkdir(parents=True, exist_ok=True)
    for split, (dsc, jaccard, codes) in scores.items():
        codes = np.asarray(codes)
        frame = pd.DataFrame({"dice": np.asarray(dsc, float), "iou": np.asarray(jaccard, float)})
        for j, name in enumerate(ITEM_ATTRIBUTES[:codes.shape[1]]):
            frame[name] = [decode(name, code) for code in codes[:, j]]
        frame["split"] = split
        atomic_write_text(folder / f"{split}.csv", frame.to_csv(index=False))
    return _write_info(folder, data, info)


def _check_training_attribute(attribute: str) -> None:
    if attribute != ALL and attribute not in FILTER_ATTRIBUTES:
        raise ResultsError(f"unknown training attribute {attribute!r}; use one of {', '.join(FILTER_ATTRIBUTES)} "
                           f"or {ALL!r}")


def _write_info(folder: Path, data: str, info: Mapping | None) -> Path:
    """The model's ``info.json`` (its data label and training record), written last: it marks the save complete."""
    record = {"data": data, **{k: v for k, v in (info or {}).items() if k != "scores"}}
    atomic_write_text(folder / "info.json", json.dumps(to_jsonable(record), indent=1) + "\n")
    return folder


def collect(*run_dirs: str | os.PathLike, kind: str = PREDICTIONS) -> pd.DataFrame:
    """One row per saved model in the ``predictions`` folder of each run folder (e.g. ``fb.runs.output_dir()`` or
    ``runs/12-fairclip/default``), or in its ``segmentation`` folder with ``kind=SEGMENTATION``: chapter (the run
    folder's parent's name), method, attribute (the training attribute), seed, data (the label saved with it) and
    folder. Folders without a complete save are skipped."""
    rows = []
    for run_dir in map(resolve, run_dirs):
        for info in sorted((run_dir / kind).glob("*/*/seed-*/info.json")):
            folder = info.parent
            rows.append({"chapter": run_dir.parent.name, "method": unquote(folder.parent.parent.name),
                         "attribute": folder.parent.name, "seed": int(folder.name.removeprefix("seed-")),
                         "data": json.loads(info.read_text()).get("data"), "folder": folder})
    if not rows:
        raise ResultsError(f"no saved predictions in {', '.join(map(str, run_dirs)) or 'no folder'}: run the "
                           "fine-tuning chapters with that configuration first (make book runs them all)")
    return pd.DataFrame(rows)


def same_data(runs: pd.DataFrame, data: str) -> pd.DataFrame:
    """``runs`` unchanged when every model was trained on ``data``; otherwise a one-line :class:`ResultsError`.
    Comparing methods trained on different data (synthetic against real, biased against control) is meaningless."""
    other = sorted(set(runs["data"]) - {data}, key=str)
    if other:
        raise ResultsError(f"some saved runs were trained on {other[0]!r}, not on {data!r}: point the chapter at runs "
                           "made on the same data (same data_root and configuration)")
    return runs


def read_predictions(folder: Path, split: str) -> pd.DataFrame:
    path = folder / f"{split}.csv"
    if not path.is_file():
        raise ResultsError(f"{path} is missing: the saved run is incomplete; run its chapter again")
    return pd.read_csv(path, keep_default_na=False)


def compare_runs(first: str | os.PathLike, second: str | os.PathLike) -> pd.DataFrame:
    """Saved predictions of two run folders side by side, to check that a change left results unchanged.

    One row per (method, attribute, seed, split) saved in either folder: ``identical`` (the CSV files are equal byte
    for byte), ``max_abs_diff`` (largest difference of ``y_score``; NaN when the rows or labels do not match) and
    ``only_in`` (the folder that has it, when the other does not).
    """
    runs = {name: collect(folder).set_index(["method", "attribute", "seed"])["folder"]
            for name, folder in (("first", first), ("second", second))}
    rows = []
    for key in sorted(set(runs["first"].index) | set(runs["second"].index), key=str):
        folders = {name: runs[name].get(key) for name in runs}
        for split in ("validation", "test"):
            row = dict(zip(("method", "attribute", "seed"), key), split=split, identical=False,
                       max_abs_diff=np.nan, only_in=None)
            if folders["first"] is None or folders["second"] is None:
                row["only_in"] = "first" if folders["second"] is None else "second"
            else:
                a, b = (read_predictions(folders[name], split) for name in ("first", "second"))
                row["identical"] = ((folders["first"] / f"{split}.csv").read_bytes()
                                    == (folders["second"] / f"{split}.csv").read_bytes())
                if len(a) == len(b) and a["y_true"].equals(b["y_true"]):
                    row["max_abs_diff"] = float((a["y_score"] - b["y_score"]).abs().max())
            rows.append(row)
    return pd.DataFrame(rows)
