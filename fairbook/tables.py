"""Comparison tables: every saved model scored the same way, and the layouts of the papers' tables.

:func:`evaluate` scores every model of :func:`fairbook.results.collect` on every attribute with a threshold chosen on
its own validation predictions, and the table functions print Fair-MoE's Table 1 layout: mean ± std over seeds,
plus bootstrap intervals of the seed mean.

Intervals of a seed mean: every model is scored on the same group-stratified bootstrap resamples of the test set
(same ``boot_seed``; see ``keep_boot`` in :func:`fairbook.metrics.fairness_report`). Averaging the replicates over
seeds gives replicates of the seed mean; subtracting two methods' replicates gives a paired interval of their
difference. These intervals cover test-set sampling for fixed trained models; the ± std covers seed-to-seed
training variation. Both are shown.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from fairbook.data.attributes import BINARY_ATTRIBUTES, FILTER_ATTRIBUTES, binarise, source_attribute
from fairbook.metrics import fairness_report, intersectional_groups
from fairbook.results import ALL, ResultsError, read_predictions
from fairbook.segmentation.metrics import SUMMARY as SEGMENTATION_SUMMARY
from fairbook.segmentation.metrics import segmentation_report
from fairbook.stats import estimate, paired_ttest

__all__ = ["BETTER", "LEADERBOARD", "SEGMENTATION_TABLE2", "TABLE1", "TABLE2", "attribute_order", "ci_table",
           "claim_verdicts", "claims", "evaluate", "evaluate_segmentation", "group_auc_table", "group_differences",
           "group_means", "leaderboard", "paired_table", "rank_agreement", "seed_means", "table", "table2",
           "wide_points"]

#: Column names of Fair-MoE's Table 1, in its order.
TABLE1 = {"es_auc": "ES-AUC", "auc": "AUC", "dpd": "DPD", "eod": "EOD"}

#: FairMedFM's Table 2 columns after the group AUCs (Jin et al., NeurIPS 2024 D&B): AUC_Δ, EqOdds printed as
#: 1 - gap (higher is better), ECE_Δ, AUC_ES in FairMedFM's std form; fairbook adds DPD.
TABLE2 = {"auc_delta": "AUC_Δ ↓", "eq_odds": "EqOdds ↑", "ece_delta": "ECE_Δ ↓", "es_auc_std": "AUC_ES ↑",
          "dpd": "DPD ↓"}

#: The segmentation rows of FairMedFM's Table 2 after the group Dice: DSC_Δ, DSC_STD, DSC_Skew and DSC_ES
#: (:mod:`fairbook.segmentation.metrics`); fairbook adds FairSeg's equity-scaled Dice (sample std).
SEGMENTATION_TABLE2 = {"dsc_delta": "DSC_Δ ↓", "dsc_std": "DSC_STD ↓", "dsc_skew": "DSC_Skew ↓",
                       "dsc_es": "DSC_ES ↑", "dsc_es_fairseg": "DSC_ES (FairSeg) ↑"}


def evaluate(runs: pd.DataFrame, attributes: Sequence[str] = FILTER_ATTRIBUTES, n_boot: int = 1000,
             threshold: str | float = "youden", boot_seed: int = 0, threshold_from: str = "validation"
             ) -> pd.DataFrame:
    """Score every model of ``runs`` (from :func:`collect`) on its test predictions, for each attribute.

    An attribute ``"race&gender"`` is the intersection: its groups are the race x gender cells
    (:func:`fairbook.metrics.intersectional_groups`).

    The threshold is chosen on the model's own validation predictions (``threshold`` method of
    :func:`fairbook.metrics.choose_threshold`). ``threshold_from="test"`` fits it on the test predictions
    themselves instead: FairMedFM's evaluation as coded (best F1 on test), offered only to measure how much that
    flatters the threshold-dependent metrics, never for a reported number.

    One row per (model, evaluated attribute): the identifying columns of ``runs`` plus ``eval_attribute``,
    ``threshold_from``, every scalar metric of the report, ``group_auc`` ({group: AUC}), ``ci`` (the report's
    intervals for this seed) and ``boot`` (the resampled values, see the module docstring).
    """
    if threshold_from not in ("validation", "test"):
        raise ResultsError(f"threshold_from={threshold_from!r}: fit thresholds on 'validation' (the protocol) or "
                           "'test' (FairMedFM's as-coded evaluation, to measure its optimism)")
    rows = []
    for run in runs.to_dict("records"):
        test = read_predictions(run["folder"], "test")
        fit_on = read_predictions(run["folder"], threshold_from)
        report = fairness_report(test["y_true"], test["y_score"], {a: _groups(test, a) for a in attributes},
                                 threshold=threshold, validation=(fit_on["y_true"], fit_on["y_score"]),
                                 n_boot=n_boot, seed=boot_seed, keep_boot=n_boot > 0)
        for attr, entry in report["attributes"].items():
            scalars = {k: v for k, v in entry.items() if isinstance(v, float)}
            rows.append({**run, "eval_attribute": attr, "threshold": report["threshold"],
                         "threshold_from": threshold_from, **scalars,
                         "groups": entry["groups"], "group_auc": entry["group_auc"],
                         "group_count": entry["group_count"], "ci": entry.get("ci", {}),
                         "boot": entry.get("boot", {})})
    return pd.DataFrame(rows)


def evaluate_segmentation(runs: pd.DataFrame, attributes: Sequence[str] = FILTER_ATTRIBUTES, n_boot: int = 1000,
                          boot_seed: int = 0) -> pd.DataFrame:
    """Score every segmentation model of ``runs`` (``collect(run_dir, kind=SEGMENTATION)``) on its test cases, for
    each attribute: :func:`fairbook.segmentation.segmentation_report` of the per-case Dice, every model on the same
    group-stratified resamples, so that :func:`seed_means`, :func:`ci_table`, :func:`paired_table` and
    :func:`table2` read these rows as they read :func:`evaluate`'s.

    One row per (model, evaluated attribute): the columns of ``runs``, ``eval_attribute``, the summary numbers
    (``dsc``, ``dsc_delta``, ``dsc_std``, ``dsc_skew``, ``dsc_es``, ``dsc_es_fairseg``) and ``iou``, ``groups``,
    ``group_dsc`` ({group: mean Dice}), ``group_count``, ``ci`` and ``boot``."""
    rows = []
    for run in runs.to_dict("records"):
        test = read_predictions(run["folder"], "test")
        for attr in attributes:
            groups = np.asarray(_groups(test, attr)).astype(str)
            report = segmentation_report({"dsc": test["dice"], "iou": test["iou"]}, groups, n_boot, seed=boot_seed,
                                         keep_boot=n_boot > 0)
            names = list(report["groups"])
            rows.append({**run, "eval_attribute": attr, **{k: report[k] for k in SEGMENTATION_SUMMARY},
                         "iou": float(test["iou"].mean()), "groups": names,
                         "group_dsc": {g: report["groups"][g]["dsc"] for g in names},
                         "group_count": {g: report["groups"][g]["n"] for g in names},
                         "ci": report["ci"], "boot": report.get("boot", {})})
    return pd.DataFrame(rows)


def _groups(predictions: pd.DataFrame, attribute: str):
    """The group label of every row for ``attribute``, a binary attribute (``"sex"``, :func:`binarise`) or an
    intersection such as ``"race&gender"``."""
    parts = attribute.split("&")
    if len(parts) == 1 and attribute in BINARY_ATTRIBUTES:
        if source_attribute(attribute) not in predictions:
            raise ResultsError(f"these predictions carry no {source_attribute(attribute)} (saved by an older "
                               f"fairbook): run the chapter again to evaluate {attribute!r}")
        return binarise(attribute, predictions[source_attribute(attribute)])
    if len(parts) == 1:
        return predictions[attribute]
    return intersectional_groups({part: predictions[part] for part in parts})


def _matched(evals: pd.DataFrame) -> pd.DataFrame:
    """Rows where a model is evaluated on the attribute it trained on, or on any attribute when it used none. Under
    an intersection (``"race&gender"``) a method trained per attribute is represented by its model trained on the
    first attribute of the intersection (race); under a binary attribute (``"sex"``), by its model trained on the
    attribute it is made from (gender)."""
    first = evals["eval_attribute"].str.split("&").str[0].map(source_attribute)
    keep = (evals["attribute"] == ALL) | (evals["attribute"] == first)
    return evals[keep]


def attribute_order(names) -> list[str]:
    """The distinct attribute names of ``names`` (missing values dropped) in the tables' order: the four
    FairVLMed attributes first, in their order, then the others (intersections) as first seen."""
    present = list(dict.fromkeys(n for n in names if isinstance(n, str)))
    return [a for a in FILTER_ATTRIBUTES if a in present] + [a for a in present if a not in FILTER_ATTRIBUTES]


def _label(frame: pd.DataFrame, methods: Sequence[str] | None) -> pd.DataFrame:
    order = list(methods) if methods is not None else list(dict.fromkeys(frame["method"]))
    frame = frame[frame["method"].isin(order)].copy()
    frame["method"] = pd.Categorical(frame["method"], order, ordered=True)
    attributes = attribute_order(frame["eval_attribute"])
    frame["eval_attribute"] = pd.Categorical(frame["eval_attribute"], attributes, ordered=True)
    return frame


def table(evals: pd.DataFrame, metrics: Mapping[str, str] = TABLE1, methods: Sequence[str] | None = None,
          scale: float = 100, decimals: int = 2) -> pd.DataFrame:
    """Fair-MoE's Table 1: rows (Attr., Model), columns ES-AUC, AUC, DPD, EOD as ``mean ± std`` over seeds (sample
    std), in percent. A model trained on one attribute appears only under that attribute."""
    frame = _label(_matched(evals), methods)
    grouped = frame.groupby(["eval_attribute", "method"], observed=True)
    mean, std = grouped[list(metrics)].mean() * scale, grouped[list(metrics)].std(ddof=1) * scale
    out = pd.DataFrame({label: [estimate(m, s, decimals=decimals) for m, s in zip(mean[k], std[k])]
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


def seed_means(evals: pd.DataFrame, metrics: Sequence[str], methods: Sequence[str] | None = None,
               level: float = 0.95) -> pd.DataFrame:
    """Long table of seed means with their intervals: one row per (attribute, method, metric) with ``mean``,
    ``lo``, ``hi`` (a percentile interval over test-set resamples of the seed mean, every seed scored on the same
    resamples; see the module docstring) and ``seeds``."""
    frame = _label(_matched(evals), methods)
    rows = []
    for (attr, method), rows_am in frame.groupby(["eval_attribute", "method"], observed=True):
        for k in metrics:
            lo, hi = _interval(_replicates(rows_am, k), level)
            rows.append({"attribute": attr, "method": method, "metric": k, "mean": float(rows_am[k].mean()),
                         "lo": lo, "hi": hi, "seeds": len(rows_am)})
    return pd.DataFrame(rows)


def _cell(row, scale: float, decimals: int) -> str:
    return estimate(scale * row["mean"], lo=scale * row["lo"], hi=scale * row["hi"], decimals=decimals)


def ci_table(evals: pd.DataFrame, metrics: Mapping[str, str] = TABLE1, methods: Sequence[str] | None = None,
             scale: float = 100, decimals: int = 1, level: float = 0.95) -> pd.DataFrame:
    """Like :func:`table`, with cells ``seed mean [lo, hi]`` (:func:`seed_means`)."""
    long = seed_means(evals, list(metrics), methods, level)
    long["cell"] = [_cell(row, scale, decimals) for row in long.to_dict("records")]
    out = long.pivot_table(index=["attribute", "method"], columns="metric", values="cell", aggfunc="first",
                           observed=True)
    rows = pd.MultiIndex.from_frame(long[["attribute", "method"]].drop_duplicates())  # the methods' order
    out = out.reindex(rows)[list(metrics)].rename(columns=metrics)
    out.columns.name = None
    out.index.names = ["Attr.", "Model"]
    return out


def group_auc_table(evals: pd.DataFrame, attribute: str, methods: Sequence[str] | None = None,
                    scale: float = 100, decimals: int = 1, level: float = 0.95) -> pd.DataFrame:
    """Group AUCs of each model on one attribute: ``mean ± std`` over seeds and the interval of the seed mean."""
    long = group_means(evals, attribute, methods, level)
    long["cell"] = [estimate(scale * r["mean"], scale * r["std"], scale * r["lo"], scale * r["hi"], decimals)
                    for r in long.to_dict("records")]
    long["column"] = [f"{r['group']} (n={r['n']})" for r in long.to_dict("records")]
    table_ = long.pivot(index="method", columns="column", values="cell")
    table_ = table_[list(dict.fromkeys(long["column"]))].reindex(list(dict.fromkeys(long["method"])))
    table_.columns.name = None
    table_.index.name = f"{attribute}: Model"
    return table_


def table2(evals: pd.DataFrame, attribute: str = "sex", methods: Sequence[str] | None = None,
           intervals: bool = False, scale: float = 100, decimals: int = 2, level: float = 0.95) -> pd.DataFrame:
    """FairMedFM's Table 2 for one attribute: a row per model with AUC, the AUC of each group (``AUC_Female``,
    ``AUC_Male`` for sex), then :data:`TABLE2`'s columns, in percent. For segmentation evaluations
    (:func:`evaluate_segmentation`) it is the table's segmentation part: DSC, the DSC of each group, then
    :data:`SEGMENTATION_TABLE2`'s columns (the skew is a ratio, printed as it is).

    Cells are ``mean ± std`` over seeds as the paper prints them, or with ``intervals`` the seed mean and its
    bootstrap interval (``mean [lo, hi]``, :func:`seed_means`). The ``seeds`` column counts the seeds."""
    frame = _label(_matched(evals[evals["eval_attribute"] == attribute]), methods)
    if frame.empty:
        raise ResultsError(f"no evaluation on attribute {attribute!r}; evaluate with attributes including it")
    head, columns = (("dsc", SEGMENTATION_TABLE2) if "dsc" in frame else ("auc", TABLE2))
    groups = group_means(evals, attribute, methods, level, intervals, key=f"group_{head}")

    def cell(mean, std, lo, hi, metric=head):
        k = 1 if metric == "dsc_skew" else scale
        return estimate(k * mean, lo=k * lo, hi=k * hi, decimals=decimals) if intervals else \
            estimate(k * mean, k * std, decimals=decimals)

    rows = {}
    for method, at in frame.groupby("method", observed=True):
        cells = {}
        for key, label in {head: f"{head.upper()} ↑", **columns}.items():
            values = at[key].to_numpy(float)
            lo, hi = _interval(_replicates(at, key), level) if intervals else (np.nan, np.nan)
            cells[label] = cell(values.mean(), values.std(ddof=1) if len(values) > 1 else np.nan, lo, hi, key)
            if key == head:  # the group values follow the overall one, as in the paper
                for r in groups[groups["method"] == method].to_dict("records"):
                    cells[f"{head.upper()}_{r['group']}"] = cell(r["mean"], r["std"], r["lo"], r["hi"])
        rows[method] = {**cells, "seeds": len(at)}
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = f"{attribute}: Model"
    return out


def group_means(evals: pd.DataFrame, attribute: str, methods: Sequence[str] | None = None,
                level: float = 0.95, intervals: bool = True, key: str = "group_auc") -> pd.DataFrame:
    """Long table of group AUCs on one attribute: one row per (method, group) with the group's size ``n``, the
    seed ``mean``, ``std``, the bootstrap interval of the seed mean (``lo``, ``hi``; NaN without ``intervals``,
    e.g. for an evaluation without resamples) and ``seeds``. Behind :func:`group_auc_table`, :func:`table2` and
    plots such as FairMedFM's Fig. 5 (one group's AUC against the other's). ``key="group_dsc"``: the group Dice
    of a segmentation evaluation."""
    frame = _label(_matched(evals[evals["eval_attribute"] == attribute]), methods)
    if frame.empty:
        raise ResultsError(f"no evaluation on attribute {attribute!r}; evaluate with attributes including it")
    rows = []
    for method, at in frame.groupby("method", observed=True):
        for g in at["groups"].iloc[0]:
            values = np.array([r[g] for r in at[key]], float)
            lo, hi = _interval(_replicates(at, key, g), level) if intervals else (np.nan, np.nan)
            rows.append({"method": method, "group": g, "n": int(at["group_count"].iloc[0][g]),
                         "mean": values.mean(), "lo": lo, "hi": hi,
                         "std": values.std(ddof=1) if len(values) > 1 else float("nan"), "seeds": len(values)})
    return pd.DataFrame(rows)


def wide_points(long: pd.DataFrame, index: str | Sequence[str], columns: str, scale: float = 100) -> pd.DataFrame:
    """A long table of means with intervals (:func:`seed_means`, :func:`group_means`) as one row per ``index``
    value, with each value ``v`` of ``columns`` as ``v``, ``v_lo`` and ``v_hi``, times ``scale``: the points of
    :func:`fairbook.plots.tradeoff` (e.g. AUC against AUC_Δ, or one group's AUC against another's)."""
    wide = long.pivot_table(index=index, columns=columns, values=["mean", "lo", "hi"], observed=True)
    out = wide.index.to_frame(index=False)
    for stat, key in wide.columns:
        out[key if stat == "mean" else f"{key}_{stat}"] = scale * wide[(stat, key)].to_numpy()
    return out


def paired_table(evals: pd.DataFrame, baseline: str, metrics: Sequence[str] = tuple(TABLE1),
                 level: float = 0.95) -> pd.DataFrame:
    """Every method against ``baseline``, per evaluated attribute and metric, paired on seed.

    Columns: ``attribute``, ``method``, ``baseline``, ``metric``, ``diff`` (mean over seeds of method - baseline),
    ``boot_lo``/``boot_hi`` (paired bootstrap interval of that mean difference over test resamples), and the paired
    t-test across seeds (``t``, ``p``, ``cohen_dz``, ``n`` seeds; :func:`fairbook.stats.paired_ttest`). With 3 seeds
    the t-test has 2 degrees of freedom and little power: read ``p`` together with the interval and the per-seed
    values.
    """
    frame = _matched(evals)
    if baseline not in set(frame["method"]):
        raise ResultsError(f"baseline {baseline!r} has no results; choose one of {sorted(set(frame['method']))}")
    rows = []
    for attr in attribute_order(frame["eval_attribute"]):
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
                rows.append({"attribute": attr, "method": method, "baseline": baseline, "metric": k,
                             "diff": test["mean_diff"],
                             "boot_lo": lo, "boot_hi": hi, "t": test["t"], "p": test["p"],
                             "cohen_dz": test["cohen_dz"], "n": test["n"]})
    return pd.DataFrame(rows)


def rank_agreement(runs: pd.DataFrame, baseline: str, split: str = "test") -> pd.DataFrame:
    """How alike each model ranks the cases of ``split`` to ``baseline`` at the same seed: the Spearman correlation
    of their scores (1: the same order, hence the same AUC in every group, whatever the scores' scale). ``runs``:
    results-store rows (:func:`fairbook.results.collect`) with one ``baseline`` model per seed; every model of one
    seed scores the same cases in the same order. One row per method and training attribute: ``spearman`` (mean
    over the seeds it shares with the baseline), ``min`` and ``seeds``."""
    base = runs[runs["method"] == baseline]
    if base.empty:
        raise ResultsError(f"baseline {baseline!r} has no results; choose one of {sorted(set(runs['method']))}")
    if base["seed"].duplicated().any():
        raise ResultsError(f"baseline {baseline!r} has several models per seed: pass the rows of one training "
                           "attribute")
    reference = {row.seed: read_predictions(row.folder, split)["y_score"] for row in base.itertuples()}
    rows = []
    for (method, attribute), models in runs[runs["method"] != baseline].groupby(["method", "attribute"],
                                                                                 sort=False):
        rho = [read_predictions(row.folder, split)["y_score"].corr(reference[row.seed], method="spearman")
               for row in models.itertuples() if row.seed in reference]
        if rho:
            rows.append({"method": method, "attribute": attribute, "spearman": float(np.mean(rho)),
                         "min": float(np.min(rho)), "seeds": len(rho)})
    return pd.DataFrame(rows, columns=["method", "attribute", "spearman", "min", "seeds"])


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


#: Direction in which each metric improves (+1: higher is better).
BETTER = {"es_auc": 1, "auc": 1, "dpd": -1, "eod": -1, "worst_auc": 1, "es_auc_std": 1, "auc_delta": -1,
          "eq_odds": 1, "ece_delta": -1, "dsc": 1, "dsc_delta": -1, "dsc_std": -1, "dsc_skew": -1, "dsc_es": 1,
          "dsc_es_fairseg": 1}

#: The leaderboard's metrics, with ↑ (higher is better) or ↓.
LEADERBOARD = {"es_auc": "ES-AUC ↑", "auc": "AUC ↑", "dpd": "DPD ↓", "eod": "EOD ↓", "worst_auc": "worst AUC ↑"}


def leaderboard(evals: pd.DataFrame, metrics: Mapping[str, str] = LEADERBOARD, methods: Sequence[str] | None = None,
                scale: float = 100, decimals: int = 1, level: float = 0.95) -> pd.DataFrame:
    """Every method on one table: a row per method, for each evaluated attribute (intersections included) the
    ``metrics`` as ``seed mean [lo, hi]`` (:func:`seed_means`), and ``mean rank``: the method's rank among the
    methods in each (attribute, metric) column, best = 1 (direction from :data:`BETTER`), averaged over the columns
    where it appears (their number is ``columns``: a method trained on one attribute is ranked in fewer columns
    and against fewer rivals, so compare mean ranks of methods with the same count). Rows are sorted by mean
    rank."""
    long = seed_means(evals, list(metrics), methods, level)
    direction = long["metric"].map(BETTER)
    if direction.isna().any():
        raise ResultsError(f"no direction for metric(s) {sorted(set(long['metric'][direction.isna()]))}; "
                           f"rank only {', '.join(BETTER)}")
    long["rank"] = (long["mean"] * -direction).groupby([long["attribute"], long["metric"]],
                                                      observed=True).rank(method="average")
    long["cell"] = [_cell(row, scale, decimals) for row in long.to_dict("records")]
    wide = long.pivot_table(index="method", columns=["attribute", "metric"], values="cell", aggfunc="first",
                            observed=True)
    wide = wide.reindex(columns=pd.MultiIndex.from_tuples(
        [(a, m) for a in dict.fromkeys(long["attribute"]) for m in metrics if (a, m) in wide.columns]))
    wide.columns = pd.MultiIndex.from_tuples([(a, metrics[m]) for a, m in wide.columns], names=["Attr.", ""])
    wide = wide.fillna("–")
    ranks = long.groupby("method", observed=True)["rank"].agg(["mean", "count"])
    wide.insert(0, ("", "columns"), ranks["count"].reindex(wide.index))
    wide.insert(0, ("", "mean rank"), ranks["mean"].reindex(wide.index).round(2))
    wide.index = wide.index.astype(str)
    wide.index.name = "Model"
    return wide.sort_values(("", "mean rank"))


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


def claim_verdicts(paper_claims: Sequence, paired: pd.DataFrame) -> pd.DataFrame:
    """Whether each paper claim (:class:`fairbook.methods.Claim`) held, from the paired comparisons of the chapters'
    runs: ``paired`` holds :func:`paired_table` rows with a ``chapter`` column (the run's notebook stem).

    One row per claim and evaluated attribute: the claim's fields, ``attribute``, ``diff``, ``boot_lo``,
    ``boot_hi``, the :func:`claims` ``verdict`` and ``held`` (the verdict is the expected one; ``"not worse"``
    holds unless the verdict is ``worse``). A claim whose comparison is missing from ``paired`` (its chapter has
    not run, or ran without that method) has one row with ``verdict`` "not run" and ``held`` None.
    """
    columns = ["chapter", "method", "baseline", "metric", "attribute", "diff", "boot_lo", "boot_hi"]
    judged = claims(paired) if len(paired) else pd.DataFrame(columns=[*columns, "verdict"])
    rows = []
    for claim in paper_claims:
        fields = dataclasses.asdict(claim)
        match = judged[(judged["chapter"] == claim.chapter) & (judged["method"] == claim.method)
                       & (judged["baseline"] == claim.baseline) & (judged["metric"] == claim.metric)]
        if match.empty:
            rows.append({**fields, "attribute": None, "verdict": "not run", "held": None})
        for row in match.to_dict("records"):
            held = row["verdict"] != "worse" if claim.expected == "not worse" else row["verdict"] == claim.expected
            rows.append({**fields, **{k: row[k] for k in ("attribute", "diff", "boot_lo", "boot_hi", "verdict")},
                         "held": held})
    return pd.DataFrame(rows)
