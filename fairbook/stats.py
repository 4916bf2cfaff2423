"""Statistics over seeds and datasets, as the papers report them.

* :func:`estimate`: the one way a number with its spread is written in a table cell, ``77.17 ± 0.43``,
  ``77.2 [76.1, 78.3]``, with non-breaking spaces so that a cell never wraps inside it.
* :func:`mean_std_table`: mean ± std over seeds (Fair-MoE, FairCLIP, MEDFAIR tables), metrics x100.
* :func:`paired_ttest`, :func:`cohens_dz`, :func:`compare_to_baseline`: paired two-sided t-tests on per-seed
  metrics with Cohen's d for paired data (FairMed-VLM).
* :func:`friedman_nemenyi`, :func:`critical_difference`, :func:`cd_diagram`: average ranks, Friedman test and
  the Nemenyi critical difference with its diagram (Demšar 2006, JMLR 7:1-30; used by FairMedFM).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from scipy import stats as st

__all__ = ["NBSP", "StatsInputError", "estimate", "interval", "mean_std_table", "cohens_dz", "paired_ttest",
           "compare_to_baseline", "critical_difference", "friedman_nemenyi", "cd_diagram"]


class StatsInputError(ValueError):
    """Bad input to a statistics function; the message names the problem and the fix in one line."""


#: Joins the parts of :func:`estimate`: a browser never breaks a line at a non-breaking space.
NBSP = "\u00a0"


def _finite(value) -> bool:
    return value is not None and not pd.isna(value) and math.isfinite(float(value))


def estimate(value: float, std: float | None = None, lo: float | None = None, hi: float | None = None,
             decimals: int = 2, signed: bool = False) -> str:
    """``value``, then ``± std`` and ``[lo, hi]`` when given and finite, as one unbreakable table cell
    (``"77.17 ± 0.43"``, ``"77.2 [76.1, 78.3]"``, ``"+0.51 [-0.20, +1.30]"`` with ``signed``); "–" for a value
    that is missing or not finite. Scale the numbers before (e.g. x100 for percent)."""
    if not _finite(value):
        return "–"
    parts = [f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"]
    if _finite(std):
        parts += ["±", f"{std:.{decimals}f}"]
    if _finite(lo) and _finite(hi):
        parts.append(interval(lo, hi, decimals, signed))
    return NBSP.join(parts)


def interval(lo: float, hi: float, decimals: int = 2, signed: bool = False) -> str:
    """``"[lo, hi]"`` as one unbreakable cell (see :func:`estimate`); "–" when either end is not finite."""
    if not (_finite(lo) and _finite(hi)):
        return "–"
    spec = f"+.{decimals}f" if signed else f".{decimals}f"
    return f"[{lo:{spec}},{NBSP}{hi:{spec}}]"


def _columns(frame: pd.DataFrame, names: Sequence[str]) -> None:
    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise StatsInputError(f"columns {missing} not found; available columns: {', '.join(map(str, frame.columns))}")


def mean_std_table(results: pd.DataFrame, by: str | Sequence[str], metrics: Sequence[str] | None = None,
                   scale: float = 100.0, decimals: int = 1, strings: bool = True) -> pd.DataFrame:
    """Mean ± standard deviation of each metric over the rows (seeds) of each ``by`` group.

    ``results`` has one row per run (e.g. method, seed) and one column per metric. Values are multiplied by
    ``scale`` (100: AUC 0.69 shows as 69.0, as in the papers' tables). The std is the sample standard deviation
    over seeds (``ddof=1``); with a single seed it is undefined and only the mean is shown.

    Returns strings such as ``"69.0 ± 1.2"`` (``strings=True``, for display; :func:`estimate`), or numbers with columns
    ``(metric, "mean" | "std" | "n")`` (``strings=False``).
    """
    by = [by] if isinstance(by, str) else list(by)
    if metrics is None:
        metrics = [c for c in results.columns if c not in by and c != "seed"
                   and pd.api.types.is_numeric_dtype(results[c])]
    _columns(results, [*by, *metrics])
    grouped = results.groupby(by, sort=False)[list(metrics)]
    mean, std, n = grouped.mean() * scale, grouped.std(ddof=1) * scale, grouped.count()
    if not strings:
        return pd.concat({"mean": mean, "std": std, "n": n}, axis=1).swaplevel(axis=1)[list(metrics)]

    return pd.DataFrame({c: [estimate(m, s, decimals=decimals) for m, s in zip(mean[c], std[c])] for c in metrics},
                        index=mean.index)


def _paired(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if len(a) != len(b):
        raise StatsInputError(f"paired samples differ in length ({len(a)} vs {len(b)}); pass one value per seed "
                              "for both, in the same seed order")
    if len(a) < 2:
        raise StatsInputError("a paired comparison needs at least two seeds; run more seeds")
    return a - b


def cohens_dz(a: ArrayLike, b: ArrayLike) -> float:
    """Cohen's d for paired samples, ``d_z = mean(a - b) / sd(a - b)`` with the sample sd (``ddof=1``).

    This is the effect size matching the paired t-test (``t = d_z * sqrt(n)``; Cohen 1988, Lakens 2013), not
    the pooled-sd d of two independent groups. NaN when all differences are equal.
    """
    d = _paired(a, b)
    sd = d.std(ddof=1)
    return float(d.mean() / sd) if sd > 0 else math.nan


def paired_ttest(a: ArrayLike, b: ArrayLike, level: float = 0.95) -> dict[str, float]:
    """Two-sided paired t-test of per-seed metrics ``a`` vs ``b`` (``scipy.stats.ttest_rel``), as FairMed-VLM.

    Returns ``n``, ``mean_diff`` (a - b), ``sd_diff``, ``t``, ``df``, ``p``, ``cohen_dz`` and the t-based
    ``ci_low``/``ci_high`` of the mean difference at ``level``.
    """
    d = _paired(a, b)
    n, mean, sd = len(d), float(d.mean()), float(d.std(ddof=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero variance: scipy returns NaN
        res = st.ttest_rel(a, b)
    half = st.t.ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean_diff": mean, "sd_diff": sd, "t": float(res.statistic), "df": n - 1,
            "p": float(res.pvalue), "cohen_dz": cohens_dz(a, b), "ci_low": mean - half, "ci_high": mean + half}


def compare_to_baseline(results: pd.DataFrame, method_col: str, baseline: str, metrics: Sequence[str],
                        seed_col: str = "seed") -> pd.DataFrame:
    """Paired t-test and d_z of every method against ``baseline`` for each metric, paired on ``seed_col``.

    Only seeds present for both methods are used (``n`` says how many). One row per (method, metric).
    """
    _columns(results, [method_col, seed_col, *metrics])
    if baseline not in set(results[method_col]):
        raise StatsInputError(f"baseline {baseline!r} not in column {method_col!r}; choose one of "
                              f"{sorted(map(str, results[method_col].unique()))}")
    base = results.loc[results[method_col] == baseline, [seed_col, *metrics]]
    rows = []
    for method, frame in results[results[method_col] != baseline].groupby(method_col, sort=False):
        joined = frame.merge(base, on=seed_col, suffixes=("", "__base"))
        for m in metrics:
            rows.append({method_col: method, "metric": m, **paired_ttest(joined[m], joined[f"{m}__base"])})
    return pd.DataFrame(rows)


def critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of average ranks, ``CD = q_alpha sqrt(k (k + 1) / (6 N))`` (Demšar 2006, eq. 5).

    ``q_alpha`` is the studentized range quantile for ``k`` groups and infinite degrees of freedom divided by
    sqrt(2) (``q_0.05 = 2.569`` for k = 4), ``N`` the number of datasets (blocks).
    """
    if k < 2 or n < 1:
        raise StatsInputError(f"critical difference needs k >= 2 methods and n >= 1 datasets, got k={k}, n={n}")
    q = st.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(k * (k + 1) / (6 * n)))


def friedman_nemenyi(scores: pd.DataFrame, higher_is_better: bool = True, alpha: float = 0.05) -> dict[str, Any]:
    """Friedman test over methods (columns) across blocks (rows: datasets, or attribute x seed) and the Nemenyi
    post-hoc test (Demšar 2006), as FairMedFM's Fig. 15 uses them.

    Ranks are taken within each row, 1 = best, ties averaged; ``avg_ranks`` is their column mean, sorted.
    The Friedman statistic and p-value are ``scipy.stats.friedmanchisquare`` (with its tie correction); the
    pairwise Nemenyi p-values come from scikit-posthocs (``posthoc_nemenyi_friedman``), the maintained
    replacement of the Orange call MEDFAIR and FairMedFM used. Two methods differ at ``alpha`` exactly when their
    average ranks differ by more than the critical difference ``cd`` (:func:`critical_difference`).
    Returns ``statistic``, ``p``, ``avg_ranks`` (Series), ``pairwise_p`` (DataFrame), ``k``, ``n``, ``alpha``
    and ``cd``.
    """
    import scikit_posthocs

    if scores.shape[1] < 3:
        raise StatsInputError(f"the Friedman test needs at least 3 methods (columns), got {scores.shape[1]}; "
                              "compare two methods with paired_ttest instead")
    if scores.isna().any().any():
        raise StatsInputError("scores contain NaN; drop the datasets (rows) or methods (columns) with missing values")
    values = scores.to_numpy(dtype=np.float64)
    ranks = st.rankdata(-values if higher_is_better else values, axis=1)
    avg = pd.Series(ranks.mean(axis=0), index=scores.columns, name="avg_rank").sort_values()
    res = st.friedmanchisquare(*values.T)
    pairwise = scikit_posthocs.posthoc_nemenyi_friedman(pd.DataFrame(ranks, columns=scores.columns))
    k, n = values.shape[1], values.shape[0]
    return {"statistic": float(res.statistic), "p": float(res.pvalue), "avg_ranks": avg, "pairwise_p": pairwise,
            "k": k, "n": n, "alpha": alpha, "cd": critical_difference(k, n, alpha)}


def cd_diagram(result: Mapping[str, Any], width: float = 6.0) -> Figure:
    """Critical-difference diagram (Demšar 2006, Fig. 1) of a :func:`friedman_nemenyi` result, drawn by
    scikit-posthocs: methods on the average-rank axis (1 = best), crossbars joining those the Nemenyi test cannot
    tell apart at the result's ``alpha``. The title gives the Friedman p-value and the critical difference.
    Returns a matplotlib Figure (no pyplot state)."""
    import scikit_posthocs

    ranks = result["avg_ranks"]
    fig = Figure(figsize=(width, 1.0 + 0.25 * len(ranks)))
    ax = fig.add_axes((0.3, 0.1, 0.4, 0.7))
    scikit_posthocs.critical_difference_diagram(ranks, result["pairwise_p"], alpha=result["alpha"], ax=ax,
                                               label_props={"fontsize": 8})
    ax.set_title(f"Friedman p = {result['p']:.3g}, CD = {result['cd']:.2f} (N = {result['n']})", fontsize=8)
    return fig
