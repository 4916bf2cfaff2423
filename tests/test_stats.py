"""fairbook.stats against scipy and hand-worked values (Demšar 2006 tables)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from scipy import stats as st

from fairbook import stats as S
from fairbook.stats import NBSP

# per-seed AUCs of two methods; differences .02 .03 .01 .01 .03
A = [0.70, 0.72, 0.69, 0.71, 0.73]
B = [0.68, 0.69, 0.68, 0.70, 0.70]


def test_paired_ttest_hand_and_scipy():
    res = S.paired_ttest(A, B)
    # mean diff .02; deviations 0 .01 -.01 -.01 .01 -> var (ddof 1) = 4e-4 / 4 = 1e-4, sd .01
    assert res["mean_diff"] == pytest.approx(0.02) and res["sd_diff"] == pytest.approx(0.01)
    assert res["cohen_dz"] == pytest.approx(2.0)  # .02 / .01
    assert res["t"] == pytest.approx(2 * math.sqrt(5))  # .02 / (.01 / sqrt 5) = d_z sqrt(n)
    ref = st.ttest_rel(A, B)
    assert res["t"] == pytest.approx(ref.statistic) and res["p"] == pytest.approx(ref.pvalue)
    assert res["p"] == pytest.approx(0.01106, abs=1e-4) and res["df"] == 4
    # 95% CI: .02 +- t_{.975,4} (2.776) * .01 / sqrt 5
    assert res["ci_low"] == pytest.approx(0.02 - 2.7764 * 0.01 / math.sqrt(5), abs=1e-5)


def test_cohens_dz_is_paired_not_pooled():
    a, b = np.array(A), np.array(B)
    d = a - b
    assert S.cohens_dz(A, B) == pytest.approx(d.mean() / d.std(ddof=1))
    pooled = (a.mean() - b.mean()) / math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    assert S.cohens_dz(A, B) != pytest.approx(pooled)
    assert math.isnan(S.cohens_dz([1, 2, 3], [0, 1, 2]))  # constant difference: sd 0


def test_paired_input_errors():
    with pytest.raises(S.StatsInputError, match="differ in length"):
        S.paired_ttest([1, 2, 3], [1, 2])
    with pytest.raises(S.StatsInputError, match="at least two seeds"):
        S.paired_ttest([1], [2])


def test_mean_std_table_strings_and_numbers():
    results = pd.DataFrame({"method": ["clip"] * 3 + ["fair"] * 3, "seed": [0, 1, 2] * 2,
                            "auc": [0.68, 0.70, 0.69, 0.71, 0.71, 0.71], "dpd": [0.05, 0.07, 0.06, 0.02, 0.03, 0.04]})
    table = S.mean_std_table(results, "method")
    # clip AUC: mean .69, sd of (.68, .70, .69) = .01 -> "69.0 ± 1.0"; fair: sd 0
    assert table.loc["clip", "auc"] == f"69.0{NBSP}±{NBSP}1.0" and table.loc["fair", "auc"] == f"71.0{NBSP}±{NBSP}0.0"
    assert table.loc["clip", "dpd"] == f"6.0{NBSP}±{NBSP}1.0" and list(table.columns) == ["auc", "dpd"]
    numbers = S.mean_std_table(results, "method", ["auc"], strings=False)
    assert numbers.loc["clip", ("auc", "mean")] == pytest.approx(69.0)
    assert numbers.loc["clip", ("auc", "n")] == 3
    single = S.mean_std_table(results[results.seed == 0], "method", ["auc"], decimals=2)
    assert single.loc["clip", "auc"] == "68.00"  # one seed: no std


def test_compare_to_baseline_pairs_by_seed():
    results = pd.DataFrame({"method": ["base"] * 5 + ["new"] * 5, "seed": list(range(5)) + list(range(4, -1, -1)),
                            "auc": B + A[::-1]})
    out = S.compare_to_baseline(results, "method", "base", ["auc"])
    assert out.loc[0, "mean_diff"] == pytest.approx(0.02) and out.loc[0, "cohen_dz"] == pytest.approx(2.0)
    with pytest.raises(S.StatsInputError, match="baseline 'nope'"):
        S.compare_to_baseline(results, "method", "nope", ["auc"])


def test_critical_difference_demsar_values():
    # Demšar (2006) Table 5(a), Nemenyi q_0.05 for k = 2..10
    table = [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164]
    for k, q in zip(range(2, 11), table):
        assert S.critical_difference(k, 6, 0.05) / math.sqrt(k * (k + 1) / 36) == pytest.approx(q, abs=1.5e-3)
    # Demšar's worked example: k = 4 methods, N = 14 data sets -> CD = 2.569 sqrt(20 / 84) = 1.25
    assert S.critical_difference(4, 14) == pytest.approx(2.569 * math.sqrt(20 / 84), abs=1e-3)


def test_friedman_against_scipy_and_formula():
    rng = np.random.default_rng(0)
    scores = pd.DataFrame(rng.random((10, 4)) + [0.3, 0.2, 0.0, 0.1], columns=list("abcd"))
    res = S.friedman_nemenyi(scores)
    ref = st.friedmanchisquare(*scores.to_numpy().T)
    assert res["statistic"] == pytest.approx(ref.statistic) and res["p"] == pytest.approx(ref.pvalue)
    # no ties: chi2_F = 12 N / (k (k+1)) * (sum R_j^2 - k (k+1)^2 / 4)
    r = res["avg_ranks"].to_numpy()
    assert res["statistic"] == pytest.approx(12 * 10 / 20 * ((r ** 2).sum() - 4 * 25 / 4))
    assert res["avg_ranks"].sum() == pytest.approx(4 * 5 / 2)  # each row's ranks 1..4 sum to 10
    assert res["cd"] == pytest.approx(S.critical_difference(4, 10))


def test_friedman_ranks_hand():
    scores = pd.DataFrame({"a": [0.9, 0.8, 0.7], "b": [0.8, 0.8, 0.6], "c": [0.1, 0.2, 0.3]})
    # rows: a1 b2 c3 / a1.5 b1.5 c3 / a1 b2 c3 -> a 3.5/3, b 5.5/3, c 3
    ranks = S.friedman_nemenyi(scores)["avg_ranks"]
    assert ranks.to_dict() == pytest.approx({"a": 3.5 / 3, "b": 5.5 / 3, "c": 3.0})
    lower = S.friedman_nemenyi(scores, higher_is_better=False)["avg_ranks"]
    assert lower["c"] == 1.0
    with pytest.raises(S.StatsInputError, match="at least 3 methods"):
        S.friedman_nemenyi(scores[["a", "b"]])


def test_nemenyi_from_the_library_agrees_with_the_critical_difference():
    """scikit-posthocs' pairwise Nemenyi p-values against Demšar's critical difference: a pair differs at alpha
    exactly when its average ranks differ by more than CD, and one p-value by the studentized-range formula."""
    rng = np.random.default_rng(3)
    scores = pd.DataFrame(rng.random((24, 5)) + np.linspace(0, 0.8, 5), columns=list("abcde"))
    res = S.friedman_nemenyi(scores)
    ranks, p = res["avg_ranks"], res["pairwise_p"]
    pairs = [(i, j) for i in "abcde" for j in "abcde" if i < j]
    assert {(i, j): p.loc[i, j] < 0.05 for i, j in pairs} == {
        (i, j): abs(ranks[i] - ranks[j]) > res["cd"] for i, j in pairs}
    assert any(p.loc[i, j] < 0.05 for i, j in pairs) and any(p.loc[i, j] > 0.05 for i, j in pairs)
    q = abs(ranks["a"] - ranks["e"]) / math.sqrt(5 * 6 / (6 * 24)) * math.sqrt(2)
    assert p.loc["a", "e"] == pytest.approx(st.studentized_range.sf(q, 5, np.inf), abs=1e-6)
    fig = S.cd_diagram(res)
    assert isinstance(fig, Figure)
    assert f"CD = {res['cd']:.2f}" in fig.axes[0].get_title()

def test_estimate_is_one_unbreakable_cell():
    assert S.estimate(77.1734, 0.4321) == f"77.17{NBSP}±{NBSP}0.43"
    assert S.estimate(77.17, lo=76.1, hi=78.25, decimals=1) == f"77.2{NBSP}[76.1,{NBSP}78.2]"
    assert S.estimate(0.5, 0.1, -0.2, 1.3, signed=True) == f"+0.50{NBSP}±{NBSP}0.10{NBSP}[-0.20,{NBSP}+1.30]"
    assert S.estimate(float("nan"), 1.0) == "–" and S.estimate(1.0, float("nan")) == "1.00"
    assert S.estimate(1.0, lo=float("nan"), hi=2.0) == "1.00" and S.interval(0.1, float("inf")) == "–"
    assert " " not in S.estimate(-1.0, 2.0, -3.0, 4.0)  # nothing for a browser to break the line at
