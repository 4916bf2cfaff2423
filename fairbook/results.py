"""The results store: every trained model's predictions, per seed, and the tables that compare methods.

A fine-tuning chapter saves one folder per (method, training attribute, seed) in its run folder::

    runs/<chapter>/<config>/predictions/<method>/<attribute>/seed-<k>/   (method percent-encoded: "w%2Fo FOL")
        validation.csv, test.csv    y_true, y_score and the four attributes (fairbook.train.save_predictions)
        info.json                   training record (chosen epoch, validation AUC, ...); written last

``attribute`` is the attribute a fairness method trained on (FairCLIP on race, ...) or ``all`` for a method that
uses none (CLIP). :func:`collect` finds the folders, :func:`evaluate` scores every model on every attribute with a
threshold chosen on its own validation predictions, and the table functions print Fair-MoE's Table 1 layout:
mean ± std over seeds, plus bootstrap intervals of the seed mean.

Intervals of a seed mean: every model is scored on the same group-stratified bootstrap resamples of the test set
(same ``boot_seed``; see ``keep_boot`` in :func:`fairbook.metrics.fairness_report`). Averaging the replicates over
seeds gives replicates of the seed mean; subtracting two methods' replicates gives a paired interval of their
difference. These intervals cover test-set sampling for fixed trained models; the ± std covers seed-to-seed
training variation. Both are shown.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pandas as pd

from fairbook.data.attributes import FILTER_ATTRIBUTES
from fairbook.metrics import fairness_report
from fairbook.runs import atomic_write_text, resolve, to_jsonable
from fairbook.stats import paired_ttest

__all__ = ["ALL", "PREDICTIONS", "ResultsError", "model_folder", "save", "load_model", "read_predictions", "collect", "same_data", "evaluate", "table", "ci_table",
           "group_auc_table", "paired_table", "group_differences", "claims", "BETTER"]

PREDICTIONS = "predictions"
#: Training attribute of a method that uses no sensitive attribute (CLIP).
ALL = "all"
#: Column names of Fair-MoE's Table 1, in its order.
TABLE1 = {"es_auc": "ES-AUC", "auc": "AUC", "dpd": "DPD", "eod": "EOD"}


class ResultsError(ValueError):
    """Missing or inconsistent saved results."""


def model_folder(run_dir: str | os.PathLike, method: str, attribute: str, seed: int, kind: str = PREDICTIONS) -> Path:
    """``run_dir/<kind>/<method>/<attribute>/seed-<k>``: where a model's predictions (or, with
    ``kind="checkpoints"``, its weights) live; the method name is percent-encoded, so "w/o" stays one folder."""
    if not method.strip():
        raise ResultsError("method name is empty; name the method, e.g. 'CLIP'")
    return Path(run_dir) / kind / quote(method, safe=" ") / attribute / f"seed-{int(seed)}"


def save(run_dir: str | os.PathLike, method: str, seed: int, scores: Mapping[str, tuple], data: str,
         info: Mapping | None = None, attribute: str = ALL) -> Path:
    """Save one trained model's validation and test predictions (``scores`` as :func:`fairbook.train.fit_and_score`
    returns them), the label of its data (:func:`fairbook.data.describe`) and its training record; returns the
    folder. ``info.json`` is written last, so a folder without it is an interrupted save and :func:`collect`
    ignores it."""
    from fairbook.train import save_predictions

    if attribute != ALL and attribute not in FILTER_ATTRIBUTES:
        raise ResultsError(f"unknown training attribute {attribute!r}; use one of {', '.join(FILTER_ATTRIBUTES)} "
                           f"or {ALL!r}")
    missing = {"validation", "test"} - set(scores)
    if missing:
        raise ResultsError(f"scores lack the {', '.join(sorted(missing))} split; pass both validation and test")
    folder = model_folder(run_dir, method, attribute, seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, (y, p, codes) in scores.items():
        save_predictions(folder / f"{split}.csv", y, p, codes, split)
    record = {"data": data, **{k: v for k, v in (info or {}).items() if k != "scores"}}
    atomic_write_text(folder / "info.json", json.dumps(to_jsonable(record), indent=1) + "\n")
    return folder


def load_model(run_dir: str | os.PathLike, method: str, attribute: str, seed: int):
    """Rebuild a model that :func:`fairbook.train.train_and_save` trained and load its kept epoch; returns
    ``(model, preprocess_val, tokenizer)``, the model in eval mode.

    The architecture comes from the model's ``info.json`` (``model``, ``pretrained`` and the
    :func:`fairbook.moe.add_fo_moe` arguments ``moe``), the weights from its ``best.pt``."""
    from fairbook.models import create_clip
    from fairbook.moe import add_fo_moe
    from fairbook.train import load_checkpoint

    run_dir = resolve(run_dir)
    info_path = model_folder(run_dir, method, attribute, seed) / "info.json"
    if not info_path.is_file():
        raise ResultsError(f"no saved model {method!r} ({attribute}, seed {seed}) in {run_dir}: run the chapter "
                           "that trains it first, or pick a method, attribute and seed from fb.results.collect")
    info = json.loads(info_path.read_text())
    if "model" not in info:
        raise ResultsError(f"{info_path} does not record the architecture (saved by an older fairbook): run that "
                           "chapter again")
    net, _, preprocess_val, tokenizer = create_clip(info["model"], info["pretrained"])
    if info.get("moe") is not None:
        add_fo_moe(net, **info["moe"])
    load_checkpoint(model_folder(run_dir, method, attribute, seed, kind="checkpoints") / "best.pt", net)
    return net.eval(), preprocess_val, tokenizer


def collect(*run_dirs: str | os.PathLike) -> pd.DataFrame:
    """One row per saved model in the ``predictions`` folder of each run folder (e.g. ``fb.runs.output_dir()`` or
    ``runs/12-fairclip/default``): chapter (the run folder's parent's name), method, attribute (the training
    attribute), seed, data (the label saved with it) and folder. Folders without a complete save are skipped."""
    rows = []
    for run_dir in map(resolve, run_dirs):
        for info in sorted((run_dir / PREDICTIONS).glob("*/*/seed-*/info.json")):
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


def evaluate(runs: pd.DataFrame, attributes: Sequence[str] = FILTER_ATTRIBUTES, n_boot: int = 1000,
             threshold: str | float = "youden", boot_seed: int = 0) -> pd.DataFrame:
    """Score every model of ``runs`` (from :func:`collect`) on its test predictions, for each attribute.

    The threshold is chosen on the model's own validation predictions (``threshold`` method of
    :func:`fairbook.metrics.choose_threshold`). One row per (model, evaluated attribute): the identifying columns
    of ``runs`` plus ``eval_attribute``, every scalar metric of the report, ``group_auc`` ({group: AUC}), ``ci``
    (the report's intervals for this seed) and ``boot`` (the resampled values, see the module docstring).
    """
    rows = []
    for run in runs.to_dict("records"):
        test, val = read_predictions(run["folder"], "test"), read_predictions(run["folder"], "validation")
        report = fairness_report(test["y_true"], test["y_score"], {a: test[a] for a in attributes},
                                 threshold=threshold, validation=(val["y_true"], val["y_score"]),
                                 n_boot=n_boot, seed=boot_seed, keep_boot=n_boot > 0)
        for attr, entry in report["attributes"].items():
            scalars = {k: v for k, v in entry.items() if isinstance(v, float)}
            rows.append({**run, "eval_attribute": attr, "threshold": report["threshold"], **scalars,
                         "groups": entry["groups"], "group_auc": entry["group_auc"],
                         "group_count": entry["group_count"], "ci": entry.get("ci", {}),
                         "boot": entry.get("boot", {})})
    return pd.DataFrame(rows)


def _matched(evals: pd.DataFrame) -> pd.DataFrame:
    """Rows where a model is evaluated on the attribute it trained on, or on any attribute when it used none."""
    keep = (evals["attribute"] == ALL) | (evals["attribute"] == evals["eval_attribute"])
    return evals[keep]


def _label(frame: pd.DataFrame, methods: Sequence[str] | None) -> pd.DataFrame:
    order = list(methods) if methods is not None else list(dict.fromkeys(frame["method"]))
    frame = frame[frame["method"].isin(order)].copy()
    frame["method"] = pd.Categorical(frame["method"], order, ordered=True)
    frame["eval_attribute"] = pd.Categorical(frame["eval_attribute"],
                                             [a for a in FILTER_ATTRIBUTES if a in set(frame["eval_attribute"])],
                                             ordered=True)
    return frame


def _fmt(mean: float, std: float, decimals: int) -> str:
    if np.isnan(mean):
        return "–"
    return f"{mean:.{decimals}f}" if np.isnan(std) else f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def table(evals: pd.DataFrame, metrics: Mapping[str, str] = TABLE1, methods: Sequence[str] | None = None,
          scale: float = 100, decimals: int = 2) -> pd.DataFrame:
    """Fair-MoE's Table 1: rows (Attr., Model), columns ES-AUC, AUC, DPD, EOD as ``mean ± std`` over seeds (sample
    std), in percent. A model trained on one attribute appears only under that attribute."""
    frame = _label(_matched(evals), methods)
    grouped = frame.groupby(["eval_attribute", "method"], observed=True)
    mean, std = grouped[list(metrics)].mean() * scale, grouped[list(metrics)].std(ddof=1) * scale
    out = pd.DataFrame({label: [_fmt(m, s, decimals) for m, s in zip(mean[k], std[k])]
                        for k, label in metrics.items()}, index=mean.index)
    out["seeds"] = grouped.size().to_numpy()
    out.index.names = ["Attr.", "Model"]
    return out


def _replicates(rows: pd.DataFrame, key: str, group: str | None = None) -> np.ndarray:
    """Seed-mean bootstrap replicates of a metric (or of one group's value) over ``rows``."""
    reps = []
    for row in rows.to_dict("records"):
        if key not in row["boot"]:
            raise ResultsError("the evaluation has no bootstrap replicates: call evaluate(..., n_boot=1000)")
        values = row["boot"][key]
        reps.append(values if group is None else values[:, row["groups"].index(group)])
    return np.mean(reps, axis=0)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def ci_table(evals: pd.DataFrame, metrics: Mapping[str, str] = TABLE1, methods: Sequence[str] | None = None,
             scale: float = 100, decimals: int = 1, level: float = 0.95) -> pd.DataFrame:
    """Like :func:`table`, with cells ``seed mean [lo, hi]``: a percentile interval over test-set resamples of the
    seed mean (every seed scored on the same resamples; see the module docstring)."""
    frame = _label(_matched(evals), methods)
    rows = {}
    for (attr, method), rows_am in frame.groupby(["eval_attribute", "method"], observed=True):
        cells = {}
        for k, label in metrics.items():
            lo, hi = _interval(_replicates(rows_am, k), level)
            cells[label] = f"{scale * rows_am[k].mean():.{decimals}f} [{scale * lo:.{decimals}f}, {scale * hi:.{decimals}f}]"
        rows[(attr, method)] = cells
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.names = ["Attr.", "Model"]
    return out


def group_auc_table(evals: pd.DataFrame, attribute: str, methods: Sequence[str] | None = None,
                    scale: float = 100, decimals: int = 1, level: float = 0.95) -> pd.DataFrame:
    """Group AUCs of each model on one attribute: ``mean ± std`` over seeds and the interval of the seed mean."""
    frame = _label(_matched(evals[evals["eval_attribute"] == attribute]), methods)
    if frame.empty:
        raise ResultsError(f"no evaluation on attribute {attribute!r}; evaluate with attributes including it")
    out = {}
    for method, rows_m in frame.groupby("method", observed=True):
        cells = {}
        for g in rows_m["groups"].iloc[0]:
            values = np.array([r[g] for r in rows_m["group_auc"]], dtype=float)
            lo, hi = _interval(_replicates(rows_m, "group_auc", g), level)
            n = int(rows_m["group_count"].iloc[0][g])
            std = values.std(ddof=1) if len(values) > 1 else float("nan")
            cells[f"{g} (n={n})"] = (f"{_fmt(scale * values.mean(), scale * std, decimals)} "
                                     f"[{scale * lo:.{decimals}f}, {scale * hi:.{decimals}f}]")
        out[method] = cells
    table_ = pd.DataFrame.from_dict(out, orient="index")
    table_.index.name = f"{attribute}: Model"
    return table_


def paired_table(evals: pd.DataFrame, baseline: str, metrics: Sequence[str] = tuple(TABLE1),
                 level: float = 0.95) -> pd.DataFrame:
    """Every method against ``baseline``, per evaluated attribute and metric, paired on seed.

    Columns: ``diff`` (mean over seeds of method - baseline), ``boot_lo``/``boot_hi`` (paired bootstrap interval of
    that mean difference over test resamples), and the paired t-test across seeds (``t``, ``p``, ``cohen_dz``,
    ``n`` seeds; :func:`fairbook.stats.paired_ttest`). With 3 seeds the t-test has 2 degrees of freedom and little
    power: read ``p`` together with the interval and the per-seed values.
    """
    frame = _matched(evals)
    if baseline not in set(frame["method"]):
        raise ResultsError(f"baseline {baseline!r} has no results; choose one of {sorted(set(frame['method']))}")
    rows = []
    for attr in [a for a in FILTER_ATTRIBUTES if a in set(frame["eval_attribute"])]:
        at = frame[frame["eval_attribute"] == attr]
        base = at[at["method"] == baseline].set_index("seed")
        for method in [m for m in dict.fromkeys(at["method"]) if m != baseline]:
            other = at[at["method"] == method].set_index("seed")
            seeds = sorted(set(base.index) & set(other.index))
            if len(seeds) < 2:
                continue
            for k in metrics:
                test = paired_ttest(other.loc[seeds, k], base.loc[seeds, k], level)
                diff = _replicates(other.loc[seeds].reset_index(), k) - _replicates(base.loc[seeds].reset_index(), k)
                lo, hi = _interval(diff, level)
                rows.append({"attribute": attr, "method": method, "metric": k, "diff": test["mean_diff"],
                             "boot_lo": lo, "boot_hi": hi, "t": test["t"], "p": test["p"],
                             "cohen_dz": test["cohen_dz"], "n": test["n"]})
    return pd.DataFrame(rows)


def group_differences(evals: pd.DataFrame, method: str, level: float = 0.95) -> pd.DataFrame:
    """Signed differences of group AUCs, ``AUC_a - AUC_b`` for every pair of groups of every attribute, averaged
    over seeds, with the bootstrap interval of the seed mean.

    Unlike the gap ``max - min`` (never negative, so its interval can never contain 0), a signed difference has
    an interval that straddles 0 when the two groups are served equally well: the check of the no-bias control.
    ``ci_contains_0`` is None when a group's AUC is undefined (one class in the group).
    """
    frame = _matched(evals[evals["method"] == method])
    rows = []
    for attr, at in frame.groupby("eval_attribute", sort=False):
        groups = at["groups"].iloc[0]
        for i, a in enumerate(groups):
            for b in groups[i + 1:]:
                values = np.array([r[a] - r[b] for r in at["group_auc"]], dtype=float)
                lo, hi = _interval(_replicates(at, "group_auc", a) - _replicates(at, "group_auc", b), level)
                rows.append({"attribute": attr, "groups": f"{a} − {b}", "diff": values.mean(),
                             "std": values.std(ddof=1) if len(values) > 1 else float("nan"), "ci_lo": lo,
                             "ci_hi": hi, "ci_contains_0": bool(lo <= 0 <= hi) if np.isfinite(lo) else None})
    return pd.DataFrame(rows)


#: Direction in which each Table 1 metric improves (+1: higher is better).
BETTER = {"es_auc": 1, "auc": 1, "dpd": -1, "eod": -1}


def claims(paired: pd.DataFrame) -> pd.DataFrame:
    """Verdict on each row of :func:`paired_table` ("method beats baseline on metric under attribute"):
    ``better`` when the paired bootstrap interval excludes zero in the improving direction (:data:`BETTER`),
    ``worse`` when it excludes zero in the other, ``no clear difference`` otherwise."""
    direction = paired["metric"].map(BETTER)
    if direction.isna().any():
        raise ResultsError(f"no direction for metric(s) {sorted(set(paired['metric'][direction.isna()]))}; "
                           f"claims know {', '.join(BETTER)}")
    lo, hi = paired["boot_lo"] * direction, paired["boot_hi"] * direction
    low = pd.concat([lo, hi], axis=1).min(axis=1)
    high = pd.concat([lo, hi], axis=1).max(axis=1)
    verdict = pd.Series("no clear difference", index=paired.index)
    verdict[low > 0] = "better"
    verdict[high < 0] = "worse"
    return paired.assign(verdict=verdict)
