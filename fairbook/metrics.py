"""Group fairness metrics for binary classifiers, with validation-chosen thresholds and bootstrap CIs.

Every quantity has one unambiguous key; :data:`METRICS` gives its definition and the papers that report it
(chapter 02 walks through them). Conventions used throughout:

* ``y`` are 0/1 labels, ``p`` positive-class probabilities, ``yhat = p >= t`` (positive when the score reaches
  the threshold, as in :func:`sklearn.metrics.roc_curve`). ``t`` is chosen on VALIDATION predictions
  (:func:`choose_threshold`) and applied unchanged to test; without validation data it is 0.5 and the report
  says so.
* Per-group values come from fairlearn's :class:`~fairlearn.metrics.MetricFrame` and scikit-learn, fed with
  thresholded predictions only (fairlearn counts a raw score equal to 1.0 as selected). Their pitfalls are
  guarded: a group with one class has AUC NaN (not a warning), a group without positives has TPR NaN and one
  without negatives FPR NaN (fairlearn returns 0), and these groups are listed under ``undefined``.
* A declared category without samples (e.g. a code of
  :data:`fairbook.data.attributes.ATTRIBUTES` absent from the test set) is kept with count 0 and listed under
  ``empty``; it is never dropped silently.
* A between-group summary (gap, ES-AUC, worst group, ...) uses the groups where its per-group metric is defined,
  reports how many under ``n_groups`` and is NaN with fewer than two. Standard deviations over groups are
  population standard deviations (``ddof=0``, as ``np.std`` in the FairCLIP and FairMedFM code).
* Bootstrap CIs are percentile intervals (the ``(1-level)/2`` and ``(1+level)/2`` quantiles of the resampled
  values) from a bootstrap stratified by group: each resample draws, with replacement, as many samples from each
  group as it has, so group sizes are fixed. The threshold stays fixed (its own uncertainty is not included).
  All resamples are evaluated at once on a ``(B, n)`` index matrix, turned into per-sample multiplicities.
  A resampled gap (max - min over groups) is biased upwards, so the interval of a small gap can lie above its
  point estimate: read it as the range of plausible gap sizes, not as a test of "no gap".
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame, count, false_positive_rate, selection_rate, true_positive_rate
from numpy.typing import ArrayLike
from sklearn.metrics import accuracy_score, precision_recall_curve, roc_auc_score, roc_curve

from fairbook.data.attributes import ATTRIBUTES
from fairbook.files import to_jsonable
from fairbook.stats import estimate

__all__ = [
    "METRICS", "GROUP_METRICS", "THRESHOLD_METHODS", "MetricsInputError", "choose_threshold",
    "intersectional_groups", "expected_calibration_error", "bootstrap_indices", "resampled_auc",
    "fairness_report", "paired_bootstrap", "report_from_csv", "summary_table", "group_table", "threshold_curve",
    "equity_scaled_sum", "equity_scaled_std", "equity_scaled_group_mean", "ci_table",
]

#: Per-group metrics (keys ``group_<name>`` in a report).
GROUP_METRICS: dict[str, str] = {
    "count": "number of samples in the group",
    "prevalence": "fraction of positive labels, P(y=1 | g)",
    "auc": "ROC AUC within the group (scikit-learn); NaN when the group has one class",
    "acc": "accuracy of yhat within the group",
    "tpr": "true positive rate P(yhat=1 | y=1, g) (fairlearn); NaN without positives",
    "fpr": "false positive rate P(yhat=1 | y=0, g) (fairlearn); NaN without negatives",
    "selection_rate": "P(yhat=1 | g) (fairlearn selection_rate on thresholded predictions)",
    "ece": "expected calibration error within the group, see expected_calibration_error",
}

#: Scalar metrics of a report: definition and who reports it. ``gap(M)`` is ``max_g M_g - min_g M_g``.
METRICS: dict[str, str] = {
    "auc": "ROC AUC over all samples (scikit-learn roc_auc_score); every paper",
    "acc": "accuracy of yhat = (score >= threshold) over all samples",
    "ece": "expected calibration error over all samples (Guo et al. 2017; FairMedFM, MEDFAIR)",
    "es_auc": "AUC / (1 + sum_g |AUC - AUC_g|), groups unweighted; FairCLIP code, Fair-MoE Tables 1-4",
    "es_auc_std": "AUC / (1 + std_g AUC_g), std with ddof=0; FairMedFM's AUC_ES as its code computes it (Table 2)",
    "es_auc_group_mean": "mean_g AUC_g / (1 + std_g AUC_g), ddof=0; the mean-of-groups reading of AUC_ES",
    "es_acc": "ACC / (1 + sum_g |ACC - ACC_g|); FairCLIP code",
    "dpd": "gap(selection rate) = fairlearn demographic_parity_difference; FairCLIP, Fair-MoE "
           "(FairMed-VLM's parity gap DPG is the same quantity)",
    "eod": "max(gap(TPR), gap(FPR)) = fairlearn equalized_odds_difference (agg='worst_case'); FairCLIP, Fair-MoE",
    "eod_mean": "(gap(TPR) + gap(FPR)) / 2 = fairlearn equalized_odds_difference(agg='mean')",
    "eop": "gap(TPR) = fairlearn equal_opportunity_difference",
    "eq_odds": "1 - (gap(TPR) + gap(FPR)) / 2, higher is fairer; FairMedFM and MEDFAIR 'EqOdds'",
    "auc_delta": "gap(AUC); FairMedFM AUC_Delta",
    "acc_delta": "gap(ACC); FairMedFM ACC_Delta",
    "max_acc_gap": "gap(ACC), the same quantity as acc_delta; fairness-aware LoRA paper MaxAccGap",
    "worst_auc": "min_g AUC_g; FairMedFM worst-group AUC",
    "worst_acc": "min_g ACC_g",
    "ece_delta": "gap(ECE); FairMedFM ECE_Delta",
    "auc_std_ratio": "std_g AUC_g / AUC (ddof=0); FairCLIP between-group disparity",
    "auc_range_ratio": "gap(AUC) / AUC; FairCLIP between-group disparity",
}

#: Which per-group coverage each summary needs (``odds``: both TPR and FPR defined).
_BASIS = {
    "es_auc": "auc", "es_auc_std": "auc", "es_auc_group_mean": "auc", "es_acc": "acc",
    "dpd": "selection_rate", "eod": "odds",
    "eod_mean": "odds", "eop": "tpr", "eq_odds": "odds", "auc_delta": "auc", "acc_delta": "acc",
    "max_acc_gap": "acc", "worst_auc": "auc", "worst_acc": "acc", "ece_delta": "ece", "auc_std_ratio": "auc",
    "auc_range_ratio": "auc",
}

THRESHOLD_METHODS = ("fixed", "youden", "f1", "prevalence")
BINNINGS = ("unit", "observed")
_NAN = float("nan")


class MetricsInputError(ValueError):
    """Bad input to a metrics function; the message names the problem and the fix in one line."""


# --------------------------------------------------------------------------------------------- thresholds

def choose_threshold(y_val: ArrayLike, p_val: ArrayLike, method: str = "youden") -> float:
    """Decision threshold chosen on validation predictions; apply it to test as ``yhat = p >= t``.

    * ``"fixed"``: 0.5.
    * ``"youden"``: maximises Youden's J = TPR - FPR over the ROC thresholds (Youden 1950).
    * ``"f1"``: maximises F1 over the precision-recall thresholds (the rule FairMedFM and MEDFAIR apply, but on
      test predictions; here on validation).
    * ``"prevalence"``: the k-th largest validation score with ``k = round(n * mean(y_val))`` (at least 1), so
      about as many validation samples are predicted positive as are positive.

    Ties in J or F1 go to the highest threshold (fewest positive predictions).
    """
    if method not in THRESHOLD_METHODS:
        raise MetricsInputError(f"unknown threshold method {method!r}; choose one of {', '.join(THRESHOLD_METHODS)}")
    y, p = _check_arrays(y_val, p_val, "validation")
    if method == "fixed":
        return 0.5
    if method == "prevalence":
        k = min(max(int(round(len(y) * y.mean())), 1), len(y))
        return float(np.sort(p)[::-1][k - 1])
    if y.min() == y.max():
        raise MetricsInputError(f"validation labels contain one class only; method {method!r} needs both, "
                                "use 'fixed' or 'prevalence' or a larger validation set")
    if method == "youden":
        fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
        j = (tpr - fpr)[1:]  # the first point (threshold +inf) predicts nothing positive
        best = np.flatnonzero(j >= j.max() - 1e-12)  # equal up to rounding counts as a tie
        return float(thr[1:][best[0]])  # thresholds decrease: the first maximum is the highest
    precision, recall, thr = precision_recall_curve(y, p)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    return float(thr[best[-1]])  # thresholds increase: the last maximum is the highest


# --------------------------------------------------------------------------------------------- groups

def intersectional_groups(columns: Mapping[str, ArrayLike]) -> pd.Categorical:
    """Intersectional group labels such as ``"race=Black & gender=Female"`` from several attribute columns.

    The declared categories are every combination of the columns' categories (a column's declared categories
    when it is a pandas Categorical, else its observed values), so combinations without samples are reported
    as empty groups rather than skipped.
    """
    if len(columns) < 2:
        raise MetricsInputError("intersectional_groups needs at least two attribute columns; pass a dict of them")
    cats = {name: _as_categorical(name, values) for name, values in columns.items()}
    lengths = {len(c) for c in cats.values()}
    if len(lengths) != 1:
        raise MetricsInputError(f"attribute columns have different lengths {sorted(lengths)}; pass aligned columns")
    parts = [[f"{name}={v}" for v in np.asarray(c, dtype=object)] for name, c in cats.items()]
    labels = [" & ".join(row) for row in zip(*parts)]
    declared = [" & ".join(combo) for combo in itertools.product(
        *[[f"{name}={v}" for v in c.categories] for name, c in cats.items()])]
    return pd.Categorical(labels, categories=declared)


def _as_categorical(name: str, values: Any) -> pd.Categorical:
    """Group labels as a Categorical of strings; declared categories kept, missing values rejected."""
    if isinstance(values, pd.Series):
        values = values.array if isinstance(values.dtype, pd.CategoricalDtype) else values.to_numpy()
    if isinstance(values, pd.Categorical):
        if values.isna().any():
            raise MetricsInputError(f"attribute {name!r} has {int(values.isna().sum())} missing values; "
                                    "fill them (e.g. 'Unknown') or drop those rows")
        return pd.Categorical([_label(v) for v in values], categories=[_label(c) for c in values.categories])
    arr = np.asarray(values, dtype=object).ravel()
    missing = pd.isna(arr)
    if missing.any():
        raise MetricsInputError(f"attribute {name!r} has {int(missing.sum())} missing values; "
                                "fill them (e.g. 'Unknown') or drop those rows")
    uniq = list(dict.fromkeys(arr.tolist()))
    try:
        uniq.sort()  # numeric codes in numeric order
    except TypeError:
        uniq.sort(key=str)
    labels = [_label(v) for v in arr]
    return pd.Categorical(labels, categories=list(dict.fromkeys(_label(v) for v in uniq)))


def _label(v: Any) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _encode(name: str, values: Any, declared: Sequence[Any] | None) -> tuple[np.ndarray, list[str]]:
    """Integer codes (n,) into the group labels; declared labels first, then any other observed ones."""
    cat = _as_categorical(name, values)
    labels = list(cat.categories)
    if declared is not None:
        labels = list(dict.fromkeys([_label(d) for d in declared] + labels))
    lookup = {label: i for i, label in enumerate(labels)}
    codes = np.fromiter((lookup[v] for v in np.asarray(cat, dtype=object)), dtype=np.int64, count=len(cat))
    return codes, labels


# --------------------------------------------------------------------------------------------- inputs

def _check_arrays(y_true: ArrayLike, y_score: ArrayLike, where: str = "input") -> tuple[np.ndarray, np.ndarray]:
    """0/1 labels and probabilities as float arrays, or a one-line MetricsInputError."""
    y_raw = np.asarray(y_true).ravel()
    p = np.asarray(y_score, dtype=np.float64).ravel() if np.asarray(y_score).dtype.kind in "biuf" else None
    if p is None:
        raise MetricsInputError(f"{where}: y_score is not numeric; pass positive-class probabilities in [0, 1]")
    if len(y_raw) != len(p):
        raise MetricsInputError(f"{where}: y_true has {len(y_raw)} values but y_score {len(p)}; pass aligned arrays")
    if len(p) == 0:
        raise MetricsInputError(f"{where}: no samples; pass at least one prediction")
    bad = pd.isna(pd.Series(y_raw)).to_numpy() | ~np.isin(y_raw.astype(object), [0, 1, True, False])
    if bad.any():
        found = sorted({str(v) for v in y_raw[bad]})[:5]
        raise MetricsInputError(f"{where}: labels are not binary (found {', '.join(found)}); "
                                "pass y_true as 0/1 with 1 = positive class")
    nan = np.isnan(p)
    if nan.any():
        rows = ", ".join(str(i) for i in np.flatnonzero(nan)[:5])
        raise MetricsInputError(f"{where}: y_score has {int(nan.sum())} NaN values (rows {rows}); "
                                "drop or recompute those predictions")
    if p.min() < 0 or p.max() > 1:
        raise MetricsInputError(f"{where}: y_score has values outside [0, 1] (min {p.min():.4g}, max {p.max():.4g});"
                                " pass probabilities, e.g. apply a sigmoid to logits")
    return y_raw.astype(np.float64), p


# --------------------------------------------------------------------------------------------- vectorised core

def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """Multiplicity of each sample in each resample: (B, n) float matrix from a (B, n) index matrix."""
    b = idx.shape[0]
    flat = (idx + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _weighted_auc(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of sample weights ``w`` (B, n): the Mann-Whitney statistic with ties counted 1/2.

    ``AUC = sum_{i pos} w_i (W_neg(p < p_i) + W_neg(p = p_i) / 2) / (W_pos W_neg)``, with the negative weight
    below and at each positive score read from one cumulative sum over the sorted negatives. With integer
    weights (bootstrap multiplicities) this is exactly scikit-learn's AUC on the resample; NaN where a row has
    no positive or no negative weight.
    """
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    order = neg[np.argsort(p[neg], kind="stable")]
    scores = p[order]
    cum = np.zeros((w.shape[0], len(order) + 1))
    np.cumsum(w[:, order], axis=1, out=cum[:, 1:])
    below = np.searchsorted(scores, p[pos], side="left")
    upto = np.searchsorted(scores, p[pos], side="right")
    wp = w[:, pos]
    num = (wp * (cum[:, below] + cum[:, upto])).sum(axis=1) / 2
    den = wp.sum(axis=1) * cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _bin_index(p: np.ndarray, lo: Any, hi: Any, n_bins: int) -> np.ndarray:
    """Bin of each score among ``n_bins`` equal-width right-closed bins on [lo, hi] (the first includes lo)."""
    idx = np.zeros(np.broadcast(p, lo, hi).shape, dtype=np.int64)
    for k in range(1, n_bins):
        idx += p > lo + (hi - lo) * k / n_bins
    return idx


def _weighted_ece(w: np.ndarray, y: np.ndarray, p: np.ndarray, n_bins: int, binning: str) -> np.ndarray:
    """ECE of each row of weights: ``sum_b |sum_{i in b} w_i (p_i - y_i)| / sum_i w_i``."""
    b = w.shape[0]
    if binning == "unit":  # the same bins for every row: one matrix product
        resid = w @ ((p - y)[:, None] * (_bin_index(p, 0.0, 1.0, n_bins)[:, None] == np.arange(n_bins)))
    else:
        present = w > 0
        lo = np.where(present, p, np.inf).min(axis=1, keepdims=True)
        hi = np.where(present, p, -np.inf).max(axis=1, keepdims=True)
        flat = (_bin_index(p, lo, hi, n_bins) + n_bins * np.arange(b)[:, None]).ravel()
        resid = np.bincount(flat, weights=(w * (p - y)).ravel(), minlength=b * n_bins).reshape(b, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(resid).sum(axis=1) / w.sum(axis=1)


def expected_calibration_error(y_true: ArrayLike, y_score: ArrayLike, n_bins: int = 10,
                               binning: str = "unit") -> float:
    """Expected calibration error of the positive-class probability (Naeini et al. 2015; Guo et al. 2017).

    ``ECE = sum_b (n_b / n) |mean_b(p) - mean_b(y)|`` over ``n_bins`` equal-width bins, right-closed
    ``(e_k, e_{k+1}]`` with the first bin closed (the convention of scikit-learn's ``calibration_curve``).

    * ``binning="unit"`` (default): bins on [0, 1], comparable across models and groups.
    * ``binning="observed"``: bins on [min p, max p] of the samples given, i.e. of each group separately when
      computed per group; this is ``pandas.cut(p, n_bins)`` as in the FairMedFM and MEDFAIR code.

    This is the binary (positive-class) ECE used by FairMedFM and MEDFAIR, not the top-label ECE.
    """
    if binning not in BINNINGS:
        raise MetricsInputError(f"unknown ECE binning {binning!r}; choose 'unit' ([0, 1]) or 'observed'")
    y, p = np.asarray(y_true, dtype=np.float64).ravel(), np.asarray(y_score, dtype=np.float64).ravel()
    if len(y) == 0:
        return _NAN
    return float(_weighted_ece(np.ones((1, len(y))), y, p, n_bins, binning)[0])


def bootstrap_indices(strata: ArrayLike, n_boot: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """A (n_boot, n) matrix of resample indices, stratified: column ``i`` always holds a member of ``i``'s group.

    Each row is a bootstrap resample of the data that keeps every group's size.
    """
    rng = np.random.default_rng(seed)
    _, codes = np.unique(np.asarray(strata, dtype=object).astype(str), return_inverse=True)
    return _stratified_indices(codes.ravel(), int(n_boot), rng)


def _stratified_indices(codes: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    idx = np.empty((n_boot, len(codes)), dtype=np.int64)
    for g in np.unique(codes):
        members = np.flatnonzero(codes == g)
        idx[:, members] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
    return idx


def resampled_auc(y_true: ArrayLike, y_score: ArrayLike, idx: np.ndarray) -> np.ndarray:
    """AUC of every resample ``y_true[idx[b]], y_score[idx[b]]`` at once (vectorised Mann-Whitney, ties 1/2)."""
    y, p = np.asarray(y_true, dtype=np.float64).ravel(), np.asarray(y_score, dtype=np.float64).ravel()
    return _weighted_auc(_counts(np.atleast_2d(idx), len(y)), y, p)


# --------------------------------------------------------------------------------------------- per-attribute

def _auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """scikit-learn ROC AUC, NaN (without a warning) when only one class is present."""
    y = np.asarray(y_true)
    return float(roc_auc_score(y, y_score)) if len(np.unique(y)) == 2 else _NAN


def _coverage(y: np.ndarray, codes: np.ndarray, n_groups: int) -> dict[str, np.ndarray]:
    """Which groups each per-group metric is defined for (depends on labels only, not on scores)."""
    n = np.bincount(codes, minlength=n_groups)
    pos = np.bincount(codes, weights=y, minlength=n_groups)
    neg = n - pos
    return {"acc": n > 0, "selection_rate": n > 0, "ece": n > 0, "tpr": pos > 0, "fpr": neg > 0,
            "auc": (pos > 0) & (neg > 0), "odds": (pos > 0) & (neg > 0)}


def _group_point(y: np.ndarray, p: np.ndarray, yhat: np.ndarray, codes: np.ndarray, n_groups: int,
                 n_bins: int, binning: str) -> dict[str, np.ndarray]:
    """Per-group metrics as (G,) arrays: thresholded ones from fairlearn's MetricFrame, AUC from scikit-learn."""
    out = {name: np.full(n_groups, np.nan) for name in GROUP_METRICS}
    frame = MetricFrame(metrics={"acc": accuracy_score, "tpr": true_positive_rate, "fpr": false_positive_rate,
                                 "selection_rate": selection_rate, "count": count},
                        y_true=y.astype(int), y_pred=yhat.astype(int), sensitive_features=codes)
    table = frame.by_group
    for name in table.columns:
        out[name][table.index.to_numpy(dtype=np.int64)] = table[name].to_numpy(dtype=np.float64)
    out["count"] = np.nan_to_num(out["count"])
    for g in np.unique(codes):
        m = codes == g
        out["auc"][g] = _auc(y[m], p[m])
        out["prevalence"][g] = y[m].mean()
        out["ece"][g] = expected_calibration_error(y[m], p[m], n_bins, binning)
    covered = _coverage(y, codes, n_groups)
    out["tpr"][~covered["tpr"]] = np.nan  # fairlearn gives 0
    out["fpr"][~covered["fpr"]] = np.nan  # fairlearn gives 0
    return out


def _group_resampled(w: np.ndarray, y: np.ndarray, p: np.ndarray, yhat: np.ndarray, codes: np.ndarray,
                     n_groups: int, n_bins: int, binning: str) -> dict[str, np.ndarray]:
    """Per-group metrics for every row of weights ``w`` (B, n); (B, G) arrays."""
    b = w.shape[0]
    out = {name: np.full((b, n_groups), np.nan) for name in GROUP_METRICS}
    columns = np.column_stack([np.ones_like(y), y, yhat, y * yhat, (1 - y) * yhat, (y == yhat)])
    for g in range(n_groups):
        m = np.flatnonzero(codes == g)
        if m.size == 0:
            out["count"][:, g] = 0
            continue
        wg = w[:, m]
        n, pos, sel, tp, fp, correct = (wg @ columns[m]).T
        with np.errstate(invalid="ignore", divide="ignore"):
            out["count"][:, g] = n
            out["prevalence"][:, g] = pos / n
            out["acc"][:, g] = correct / n
            out["selection_rate"][:, g] = sel / n
            out["tpr"][:, g] = np.where(pos > 0, tp / pos, np.nan)
            out["fpr"][:, g] = np.where(n - pos > 0, fp / (n - pos), np.nan)
        out["auc"][:, g] = _weighted_auc(wg, y[m], p[m])
        out["ece"][:, g] = _weighted_ece(wg, y[m], p[m], n_bins, binning)
    return out


def equity_scaled_sum(overall: ArrayLike, group_values: ArrayLike) -> np.ndarray:
    """Equity-scaled metric, sum form: ``M / (1 + sum_g |M - M_g|)`` (FairCLIP code; Fair-MoE Tables 1-4 ES-AUC).

    ``overall`` has shape ``(...)`` and ``group_values`` ``(..., G)``: works for one model or B resamples at once.
    """
    m, g = np.asarray(overall, float), np.asarray(group_values, float)
    return m / (1 + np.abs(g - m[..., None]).sum(axis=-1))


def equity_scaled_std(overall: ArrayLike, group_values: ArrayLike) -> np.ndarray:
    """Equity-scaled metric, std form: ``M / (1 + std_g M_g)``, population std (ddof=0): FairMedFM's AUC_ES as its
    code computes it (Jin et al., NeurIPS 2024 D&B). Its Table 2 rows follow from their own columns this way, e.g.
    LP: 76.07 / (1 + 0.53 / 2 / 100) = 75.87 (with two groups the population std is half the gap).

    Unlike the sum form it does not compare groups with the pooled score, only with each other, so the two forms can
    rank the same two models differently. :func:`equity_scaled_group_mean` is the mean-of-groups reading.
    """
    m, g = np.asarray(overall, float), np.asarray(group_values, float)
    return m / (1 + g.std(axis=-1))


def equity_scaled_group_mean(group_values: ArrayLike) -> np.ndarray:
    """Equity-scaled metric, mean-of-groups form: ``mean_g M_g / (1 + std_g M_g)``, ddof=0: a reading of FairMedFM's
    AUC_ES that its Table 2 does not follow (see :func:`equity_scaled_std`); it ignores the overall metric
    altogether."""
    g = np.asarray(group_values, float)
    return g.mean(axis=-1) / (1 + g.std(axis=-1))


def _summarise(overall: Mapping[str, np.ndarray], group: Mapping[str, np.ndarray],
               covered: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Between-group summaries (:data:`METRICS`) for B rows at once; NaN with fewer than two covered groups.

    A group covered in the point estimate but undefined in a resample makes that resample's value NaN
    (the summary is never computed over fewer groups than the point estimate).
    """
    b = len(overall["auc"])
    nan = np.full(b, np.nan)

    def cols(name: str, basis: str) -> np.ndarray | None:
        mask = covered[basis]
        return group[name][:, mask] if mask.sum() >= 2 else None

    def gap(x: np.ndarray | None) -> np.ndarray:
        return nan if x is None else x.max(axis=1) - x.min(axis=1)

    auc, acc = overall["auc"], overall["acc"]
    a, c = cols("auc", "auc"), cols("acc", "acc")
    tpr, tpr_o, fpr_o = cols("tpr", "tpr"), cols("tpr", "odds"), cols("fpr", "odds")
    out = dict(overall)
    out["es_auc"] = nan if a is None else equity_scaled_sum(auc, a)
    out["es_auc_std"] = nan if a is None else equity_scaled_std(auc, a)
    out["es_auc_group_mean"] = nan if a is None else equity_scaled_group_mean(a)
    out["es_acc"] = nan if c is None else equity_scaled_sum(acc, c)
    out["dpd"] = gap(cols("selection_rate", "selection_rate"))
    tpr_gap, fpr_gap = gap(tpr_o), gap(fpr_o)
    out["eod"] = np.maximum(tpr_gap, fpr_gap)
    out["eod_mean"] = (tpr_gap + fpr_gap) / 2
    out["eop"] = gap(tpr)
    out["eq_odds"] = 1 - out["eod_mean"]
    out["auc_delta"] = gap(a)
    out["acc_delta"] = gap(c)
    out["max_acc_gap"] = out["acc_delta"]
    out["worst_auc"] = nan if a is None else a.min(axis=1)
    out["worst_acc"] = nan if c is None else c.min(axis=1)
    out["ece_delta"] = gap(cols("ece", "ece"))
    with np.errstate(invalid="ignore", divide="ignore"):
        out["auc_std_ratio"] = nan if a is None else a.std(axis=1) / auc
        out["auc_range_ratio"] = out["auc_delta"] / auc
    return out


def _percentile_ci(values: np.ndarray, level: float) -> np.ndarray:
    """Percentile interval over the finite resampled values, along axis 0; shape (2, ...)."""
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN
        return np.nanpercentile(values, q, axis=0)


class _Attribute:
    """One attribute's group codes and labels, its point estimates and (optionally) resampled values."""

    def __init__(self, name: str, values: Any, declared: Sequence[Any] | None, y: np.ndarray):
        if len(values) != len(y):
            raise MetricsInputError(f"attribute {name!r} has {len(values)} values but y_true {len(y)}; "
                                    "pass one group value per sample")
        self.name = name
        self.codes, self.labels = _encode(name, values, declared)
        self.covered = _coverage(y, self.codes, len(self.labels))

    def point(self, y, p, yhat, n_bins, binning) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        overall = {"auc": np.array([_auc(y, p)]), "acc": np.array([accuracy_score(y, yhat)]),
                   "ece": np.array([expected_calibration_error(y, p, n_bins, binning)])}
        group = _group_point(y, p, yhat, self.codes, len(self.labels), n_bins, binning)
        summary = _summarise(overall, {k: v[None, :] for k, v in group.items()}, self.covered)
        return {k: float(v[0]) for k, v in summary.items()}, group

    def resampled(self, w, y, p, yhat, n_bins, binning) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        overall = {"auc": _weighted_auc(w, y, p), "acc": (w @ (y == yhat).astype(np.float64)) / w.sum(axis=1),
                   "ece": _weighted_ece(w, y, p, n_bins, binning)}
        group = _group_resampled(w, y, p, yhat, self.codes, len(self.labels), n_bins, binning)
        return _summarise(overall, group, self.covered), group


def _prepare(y_true, y_score, groups, categories) -> tuple[np.ndarray, np.ndarray, list[_Attribute]]:
    y, p = _check_arrays(y_true, y_score)
    if not groups:
        raise MetricsInputError("no sensitive attributes given; pass groups={'race': array, ...}")
    categories = categories or {}
    attrs = [_Attribute(name, values, categories.get(name), y) for name, values in groups.items()]
    return y, p, attrs


def _resolve_threshold(threshold: float | str, validation) -> tuple[float, str, str]:
    if isinstance(threshold, str) and threshold not in THRESHOLD_METHODS:
        try:
            threshold = float(threshold)  # "0.5" from a command line
        except ValueError:
            raise MetricsInputError(f"unknown threshold method {threshold!r}; choose one of "
                                    f"{', '.join(THRESHOLD_METHODS)} or pass a number") from None
    if not isinstance(threshold, str):
        t = float(threshold)
        if not 0 <= t <= 1:
            raise MetricsInputError(f"threshold {t} is outside [0, 1]; pass a probability threshold or a method name")
        return t, "fixed", f"fixed threshold {t:g} given by the caller"
    if validation is None:
        note = "fixed 0.5: no validation predictions were given" + (
            f" (requested {threshold!r})" if threshold != "fixed" else "")
        return 0.5, "fixed", note
    y_val, p_val = validation
    t = choose_threshold(y_val, p_val, threshold)
    return t, threshold, f"{threshold} threshold chosen on {len(np.ravel(y_val))} validation predictions"


def fairness_report(y_true: ArrayLike, y_score: ArrayLike, groups: Mapping[str, ArrayLike], *,
                    threshold: float | str = 0.5, validation: tuple[ArrayLike, ArrayLike] | None = None,
                    n_boot: int = 0, seed: int = 0, categories: Mapping[str, Sequence[Any]] | None = None,
                    n_bins: int = 10, binning: str = "unit", ci_level: float = 0.95,
                    keep_boot: bool = False) -> dict[str, Any]:
    """All metrics of :data:`METRICS` and :data:`GROUP_METRICS` for each sensitive attribute, with bootstrap CIs.

    Args:
        y_true, y_score: test labels (0/1) and positive-class probabilities.
        groups: attribute name -> one group value per sample (codes or names). Use
            :func:`intersectional_groups` for intersections. A pandas Categorical declares its categories.
        threshold: a number in [0, 1], or a method of :func:`choose_threshold` applied to ``validation``
            (``(y_val, p_val)``); with a method but no validation the threshold is 0.5 and ``threshold_note``
            says so. The test predictions are never used to choose it.
        n_boot: bootstrap resamples (0: no CIs), stratified by the attribute's groups; ``seed`` fixes them.
        categories: attribute -> declared group values; those without samples are reported as ``empty``.
        n_bins, binning: ECE bins, see :func:`expected_calibration_error`.
        ci_level: coverage of the percentile intervals.
        keep_boot: also keep the resampled values, ``boot`` = {metric: (n_boot,) array, ``group_<m>``:
            (n_boot, n_groups) array}. The resamples depend only on ``seed`` and the attribute's groups, so two
            models scored on the same test set with the same ``seed`` share them: their replicates can be
            averaged or subtracted (:mod:`fairbook.results` does this across seeds).

    Returns:
        A dict with ``threshold``, ``threshold_method``, ``threshold_note``, ``n``, ``n_boot``... and
        ``attributes[name]`` holding: every key of :data:`METRICS`; ``group_<m>`` = {group: value} for every
        key of :data:`GROUP_METRICS`; ``groups``, ``empty`` (declared groups without samples), ``undefined``
        (``{"auc": [...], "tpr": [...], "fpr": [...]}`` non-empty groups where the metric is undefined),
        ``n_groups`` (groups each summary covers); with ``n_boot > 0``, ``ci`` = {metric: [lo, hi]} and
        ``ci["group_<m>"]`` = {group: [lo, hi]}, plus ``boot_undefined`` = {metric: resamples where it was
        undefined} when any. Missing values are NaN (see :func:`report_from_csv` for JSON).
    """
    if binning not in BINNINGS:
        raise MetricsInputError(f"unknown ECE binning {binning!r}; choose 'unit' ([0, 1]) or 'observed'")
    y, p, attrs = _prepare(y_true, y_score, groups, categories)
    t, method, note = _resolve_threshold(threshold, validation)
    yhat = (p >= t).astype(np.float64)
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {
        "n": len(y), "prevalence": float(y.mean()), "threshold": t, "threshold_method": method,
        "threshold_note": note, "n_boot": int(n_boot), "seed": seed, "ci_level": ci_level,
        "ci_method": "percentile bootstrap, resampled within each group of the attribute (group sizes fixed)",
        "ece_binning": f"{n_bins} equal-width bins on "
                       + ("[0, 1]" if binning == "unit" else "each subset's [min, max]"),
        "attributes": {},
    }
    for attr in attrs:
        summary, group = attr.point(y, p, yhat, n_bins, binning)
        entry = _attribute_entry(attr, t, summary, group)
        if n_boot > 0:
            w = _counts(_stratified_indices(attr.codes, int(n_boot), rng), len(y))
            b_summary, b_group = attr.resampled(w, y, p, yhat, n_bins, binning)
            entry["ci"], entry["boot_undefined"] = _intervals(attr, summary, b_summary, b_group, ci_level)
            if keep_boot:
                entry["boot"] = {**{k: b_summary[k] for k in METRICS},
                                 **{f"group_{m}": b_group[m] for m in GROUP_METRICS if m != "count"}}
        report["attributes"][attr.name] = entry
    return report


def _attribute_entry(attr: _Attribute, t: float, summary: dict[str, float], group: dict[str, np.ndarray]) -> dict:
    labels = attr.labels
    counts = group["count"]
    entry: dict[str, Any] = {"threshold": t, "groups": list(labels),
                             "empty": [g for g, c in zip(labels, counts) if c == 0],
                             "undefined": {m: [g for g, c, ok in zip(labels, counts, attr.covered[m])
                                               if c > 0 and not ok] for m in ("auc", "tpr", "fpr")}}
    entry.update({k: summary[k] for k in METRICS})
    for name in GROUP_METRICS:
        values = group[name]
        entry[f"group_{name}"] = {g: (int(v) if name == "count" else float(v)) for g, v in zip(labels, values)}
    entry["n_groups"] = {k: int(attr.covered[basis].sum()) for k, basis in _BASIS.items()}
    return entry


def _intervals(attr: _Attribute, point: dict[str, float], b_summary: dict[str, np.ndarray],
               b_group: dict[str, np.ndarray], level: float) -> tuple[dict, dict]:
    ci: dict[str, Any] = {}
    undefined: dict[str, int] = {}
    for k in METRICS:
        lo, hi = _percentile_ci(b_summary[k], level)
        ci[k] = [float(lo), float(hi)]
        bad = int(np.isnan(b_summary[k]).sum())
        if bad and not math.isnan(point[k]):
            undefined[k] = bad
    for name in GROUP_METRICS:
        if name == "count":
            continue
        lo, hi = _percentile_ci(b_group[name], level)
        ci[f"group_{name}"] = {g: [float(a), float(b)] for g, a, b in zip(attr.labels, lo, hi)}
    return ci, undefined


def paired_bootstrap(y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike, groups: Mapping[str, ArrayLike], *,
                     threshold_a: float = 0.5, threshold_b: float = 0.5, n_boot: int = 1000, seed: int = 0,
                     categories: Mapping[str, Sequence[Any]] | None = None, n_bins: int = 10,
                     binning: str = "unit", ci_level: float = 0.95) -> dict[str, Any]:
    """Paired bootstrap CI of ``metric(model a) - metric(model b)`` for two models scored on the same test set.

    Both models are evaluated on the same resample indices (stratified by group as in
    :func:`fairness_report`), so the interval reflects the difference, not two independent uncertainties.
    Thresholds are fixed numbers chosen beforehand on validation (:func:`choose_threshold`).
    Returns ``{"attributes": {name: {metric: {"a", "b", "diff", "ci": [lo, hi]}}}, ...}``.
    """
    y, pa, attrs = _prepare(y_true, score_a, groups, categories)
    _, pb = _check_arrays(y_true, score_b, "score_b")
    ya, yb = (pa >= threshold_a).astype(np.float64), (pb >= threshold_b).astype(np.float64)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"n": len(y), "n_boot": int(n_boot), "seed": seed, "ci_level": ci_level,
                           "threshold_a": threshold_a, "threshold_b": threshold_b, "attributes": {}}
    for attr in attrs:
        point_a, _ = attr.point(y, pa, ya, n_bins, binning)
        point_b, _ = attr.point(y, pb, yb, n_bins, binning)
        w = _counts(_stratified_indices(attr.codes, int(n_boot), rng), len(y))
        boot_a, _ = attr.resampled(w, y, pa, ya, n_bins, binning)
        boot_b, _ = attr.resampled(w, y, pb, yb, n_bins, binning)
        out["attributes"][attr.name] = {
            k: {"a": point_a[k], "b": point_b[k], "diff": point_a[k] - point_b[k],
                "ci": [float(v) for v in _percentile_ci(boot_a[k] - boot_b[k], ci_level)]}
            for k in METRICS}
    return out


# --------------------------------------------------------------------------------------------- CSV backend

def _read_csv(path: str | Path, role: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise MetricsInputError(f"{role} file {str(path)!r} not found; pass the path of a CSV with columns "
                                "y_true, y_score and one column per attribute") from None
    except IsADirectoryError:
        raise MetricsInputError(f"{role} file {str(path)!r} is a folder; pass the path of a CSV with columns "
                                "y_true, y_score and one column per attribute") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MetricsInputError(f"{role} file {str(path)!r} is not a readable CSV ({type(exc).__name__}); "
                                "pass a comma-separated file with a header row") from None


def _require(frame: pd.DataFrame, columns: Sequence[str], path: str | Path) -> None:
    for column in columns:
        if column not in frame.columns:
            raise MetricsInputError(f"column {column!r} not found in {str(path)!r}; available columns: "
                                    f"{', '.join(map(str, frame.columns))}; rename it or choose from these")


def _known_attribute(name: str, column: pd.Series) -> pd.Categorical:
    """A FairVLMed attribute column (codes or names) decoded to names, all names of the table declared."""
    table = ATTRIBUTES[name]
    names = list(dict.fromkeys(table.values()))
    numeric = pd.api.types.is_numeric_dtype(column)
    valid = set(table) if numeric else set(names)
    values = column.tolist()
    invalid = sorted({v for v in values if (int(v) if numeric and float(v).is_integer() else v) not in valid}, key=str)
    if invalid:
        listing = ", ".join(f"{c}={n}" for c, n in table.items())
        raise MetricsInputError(f"column {name!r} has values {invalid[:5]} that are not {name} codes or names "
                                f"({listing}); fix or drop those rows, or rename the column to use free labels")
    decoded = [table[int(v)] for v in values] if numeric else values
    return pd.Categorical(decoded, categories=names)


def _attribute_columns(frame: pd.DataFrame, attributes: Sequence[str], path: str | Path) -> dict[str, Any]:
    """Group arrays for each requested attribute; ``"race&gender"`` asks for the intersection."""
    groups: dict[str, Any] = {}
    for spec in attributes:
        parts = [a.strip() for a in spec.split("&") if a.strip()]
        _require(frame, parts, path)
        columns = {}
        for a in parts:
            if frame[a].isna().any():
                raise MetricsInputError(f"column {a!r} has {int(frame[a].isna().sum())} empty cells in "
                                        f"{str(path)!r}; fill them (e.g. -1 for unknown) or drop those rows")
            columns[a] = _known_attribute(a, frame[a]) if a in ATTRIBUTES else _as_categorical(a, frame[a])
        groups["&".join(parts)] = columns[parts[0]] if len(parts) == 1 else intersectional_groups(columns)
    return groups


def report_from_csv(path: str | Path, attributes: Sequence[str] | str, val_path: str | Path | None = None,
                    n_boot: int = 1000, threshold: str | float = "youden", seed: int = 0) -> dict[str, Any]:
    """Fairness report of a predictions CSV; the backend of ``fairbook metrics``. JSON-serialisable (NaN -> None).

    The CSV has ``y_true`` (0/1), ``y_score`` (probability of the positive class) and one column per attribute
    (FairVLMed codes or names for the attributes of :data:`fairbook.data.attributes.ATTRIBUTES`, whose every
    category is declared, so absent ones are reported as empty; any labels for other columns).
    ``attributes`` lists column names (or one comma-separated string); ``"race&gender"`` is the intersection.
    ``threshold`` is a method of :func:`choose_threshold` run on ``val_path`` (columns ``y_true``, ``y_score``)
    or a number (also as a string, e.g. ``"0.3"``); with a method but no ``val_path`` the threshold is 0.5 and
    ``threshold_note`` says so. See :func:`fairness_report` for the layout and :data:`METRICS` for the keys.
    Bad input raises :class:`MetricsInputError` with a one-line message.
    """
    if isinstance(attributes, str):
        attributes = [a for a in attributes.split(",") if a.strip()]
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise MetricsInputError(f"n_boot must be a whole number >= 0 (0: no intervals), got {n_boot!r}")
    frame = _read_csv(path, "predictions")
    _require(frame, ["y_true", "y_score"], path)
    groups = _attribute_columns(frame, attributes, path)
    validation = None
    if val_path is not None:
        val = _read_csv(val_path, "validation")
        _require(val, ["y_true", "y_score"], val_path)
        validation = _check_arrays(val["y_true"].to_numpy(), val["y_score"].to_numpy(), str(val_path))
    _check_arrays(frame["y_true"].to_numpy(), frame["y_score"].to_numpy(), str(path))
    report = fairness_report(frame["y_true"].to_numpy(), frame["y_score"].to_numpy(), groups,
                             threshold=threshold, validation=validation, n_boot=n_boot, seed=seed)
    report["input"] = {"path": str(path), "val_path": None if val_path is None else str(val_path)}
    return to_jsonable(report)


# --------------------------------------------------------------------------------------------- tables

def _num(v: Any) -> float:
    return _NAN if v is None else float(v)


def summary_table(report: Mapping[str, Any]) -> pd.DataFrame:
    """Tidy table of a report's scalar metrics: attribute, metric, value, ci_lo, ci_hi, n_groups."""
    rows = []
    for attr, entry in report["attributes"].items():
        ci = entry.get("ci", {})
        for k in METRICS:
            lo, hi = ci.get(k, [None, None])
            rows.append({"attribute": attr, "metric": k, "value": _num(entry[k]), "ci_lo": _num(lo),
                         "ci_hi": _num(hi), "n_groups": entry["n_groups"].get(k)})
    return pd.DataFrame(rows).astype({"n_groups": "Int64"})


def group_table(report: Mapping[str, Any]) -> pd.DataFrame:
    """Tidy per-group table of a report: one row per (attribute, group), a column per :data:`GROUP_METRICS`
    key and, when the report has CIs, ``<metric>_lo`` / ``<metric>_hi`` columns."""
    rows = []
    for attr, entry in report["attributes"].items():
        ci = entry.get("ci", {})
        for g in entry["groups"]:
            row: dict[str, Any] = {"attribute": attr, "group": g}
            for m in GROUP_METRICS:
                row[m] = _num(entry[f"group_{m}"][g])
                if f"group_{m}" in ci:
                    row[f"{m}_lo"], row[f"{m}_hi"] = (_num(v) for v in ci[f"group_{m}"][g])
            rows.append(row)
    return pd.DataFrame(rows).astype({"count": "int64"})


def threshold_curve(y_true: ArrayLike, y_score: ArrayLike, groups: ArrayLike, thresholds: ArrayLike) -> pd.DataFrame:
    """Per-group selection rate, TPR and FPR, with DPD and EOD, as the decision threshold moves.

    One row per (threshold, group), from :func:`fairness_report` at each threshold (point estimates only).
    Shows why a threshold must be fixed on validation before any parity metric is read: DPD and EOD move with it.
    """
    rows = []
    for t in np.asarray(thresholds, float):
        entry = fairness_report(y_true, y_score, {"group": groups}, threshold=float(t))["attributes"]["group"]
        for g in entry["groups"]:
            rows.append({"threshold": t, "group": g, "selection_rate": entry["group_selection_rate"][g],
                         "tpr": entry["group_tpr"][g], "fpr": entry["group_fpr"][g],
                         "dpd": entry["dpd"], "eod": entry["eod"]})
    return pd.DataFrame(rows)


def ci_table(report: Mapping[str, Any], metrics: Sequence[str] = ("auc", "es_auc", "dpd", "eod"),
             scale: float = 100, decimals: int = 1) -> pd.DataFrame:
    """Attributes x metrics, each cell ``"value [lo, hi]"`` scaled to percent as in the papers' tables."""
    t = summary_table(report)
    t = t[t["metric"].isin(metrics)]
    cell = [estimate(scale * v, lo=scale * lo, hi=scale * hi, decimals=decimals)
            for v, lo, hi in zip(t["value"], t["ci_lo"], t["ci_hi"])]
    return t.assign(cell=cell).pivot(index="attribute", columns="metric", values="cell")[list(metrics)]
