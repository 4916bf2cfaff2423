"""fairbook.metrics against fairlearn / scikit-learn and hand-worked examples."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equal_opportunity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score, roc_auc_score

from fairbook import metrics as M

# --------------------------------------------------------------------------- hand-worked example
# Three groups, threshold 0.5 (yhat = p >= 0.5):
#   A: y = 1 1 0 0  p = .9 .4 .6 .2   yhat = 1 0 1 0
#   B: y = 1 0 0 0  p = .8 .3 .1 .7   yhat = 1 0 0 1
#   C: y = 1 0      p = .3 .2         yhat = 0 0
HAND_Y = [1, 1, 0, 0, 1, 0, 0, 0, 1, 0]
HAND_P = [0.9, 0.4, 0.6, 0.2, 0.8, 0.3, 0.1, 0.7, 0.3, 0.2]
HAND_G = ["A"] * 4 + ["B"] * 4 + ["C"] * 2


@pytest.fixture(scope="module")
def hand():
    return M.fairness_report(HAND_Y, HAND_P, {"g": HAND_G})["attributes"]["g"]


def test_hand_group_metrics(hand):
    # AUC_A: positive .9 beats both negatives, .4 beats .2 only -> 3/4. AUC_B: .8 beats all 3 -> 1. AUC_C: .3 > .2 -> 1.
    assert hand["group_auc"] == {"A": 0.75, "B": 1.0, "C": 1.0}
    # correct: A 1 0 0 1, B 1 1 1 0, C 0 1
    assert hand["group_acc"] == {"A": 0.5, "B": 0.75, "C": 0.5}
    assert hand["group_tpr"] == {"A": 0.5, "B": 1.0, "C": 0.0}
    assert hand["group_fpr"] == pytest.approx({"A": 0.5, "B": 1 / 3, "C": 0.0})
    assert hand["group_selection_rate"] == {"A": 0.5, "B": 0.5, "C": 0.0}
    assert hand["group_count"] == {"A": 4, "B": 4, "C": 2}
    assert hand["group_prevalence"] == {"A": 0.5, "B": 0.25, "C": 0.5}


def test_hand_overall_auc_with_tie_and_acc(hand):
    # positives .9 .8 .4 .3, negatives .6 .2 .3 .1 .7 .2 (4 x 6 = 24 pairs)
    # negatives below each positive: .9 -> 6, .8 -> 6, .4 -> 4, .3 -> 3 + 1/2 (tie with the negative .3)
    assert hand["auc"] == pytest.approx(19.5 / 24)  # 0.8125
    assert hand["acc"] == pytest.approx(6 / 10)


def test_hand_equity_scaled(hand):
    auc = 19.5 / 24
    # sum |AUC - AUC_g| = .0625 + .1875 + .1875 = .4375 -> 0.8125 / 1.4375 = 13/23
    assert hand["es_auc"] == pytest.approx(13 / 23)
    # mean AUC_g = 11/12; population std of (3/4, 1, 1) = sqrt(((1/6)^2 + 2 (1/12)^2) / 3) = sqrt(1/72)
    assert hand["es_auc_std"] == pytest.approx(auc / (1 + math.sqrt(1 / 72)))  # FairMedFM: the overall AUC
    assert hand["es_auc_group_mean"] == pytest.approx((11 / 12) / (1 + math.sqrt(1 / 72)))
    # sum |ACC - ACC_g| = .1 + .15 + .1 = .35 -> .6 / 1.35 = 4/9
    assert hand["es_acc"] == pytest.approx(4 / 9)
    assert hand["auc_std_ratio"] == pytest.approx(math.sqrt(1 / 72) / auc)
    assert hand["auc_range_ratio"] == pytest.approx(0.25 / auc)  # 4/13


def test_hand_gaps(hand):
    assert hand["dpd"] == pytest.approx(0.5)  # selection .5 .5 0
    # TPR gap = 1 - 0 = 1; FPR gap = .5 - 0 = .5
    assert hand["eod"] == pytest.approx(1.0)
    assert hand["eod_mean"] == pytest.approx(0.75)
    assert hand["eop"] == pytest.approx(1.0)
    assert hand["eq_odds"] == pytest.approx(0.25)
    assert hand["auc_delta"] == pytest.approx(0.25)
    assert hand["acc_delta"] == hand["max_acc_gap"] == pytest.approx(0.25)
    assert hand["worst_auc"] == 0.75 and hand["worst_acc"] == 0.5
    assert set(hand["n_groups"].values()) == {3}


def test_hand_ece(hand):
    # unit bins, right-closed: .1->b0; .2 .2->b1; .3 .3->b2 (0.3 is an edge: lower bin); .4->b3; .6->b5; .7->b6;
    # .8->b7; .9->b8. |sum (p - y)| per bin: .1 .4 |.3-.7|=.4 .6 .6 .7 .2 .1 -> 3.1 / 10
    assert hand["ece"] == pytest.approx(0.31)
    # A: |-.1| + |-.6| + .6 + .2 = 1.5 / 4; B: .2 + .3 + .1 + .7 = 1.3 / 4; C: .7 + .2 = .9 / 2
    assert hand["group_ece"] == pytest.approx({"A": 0.375, "B": 0.325, "C": 0.45})
    assert hand["ece_delta"] == pytest.approx(0.125)


def test_ece_binnings_hand():
    y, p = [0, 1, 0, 1], [0.50, 0.525, 0.575, 0.60]
    # unit: .5 -> (.4, .5]: .5; the others -> (.5, .6]: -.475 + .575 - .4 = -.3 -> (.5 + .3) / 4
    assert M.expected_calibration_error(y, p) == pytest.approx(0.2)
    # observed: bins of width .01 on [.5, .6], one sample each -> mean |p - y| = (.5 + .475 + .575 + .4) / 4
    assert M.expected_calibration_error(y, p, binning="observed") == pytest.approx(0.4875)
    assert M.expected_calibration_error([1, 0], [0.0, 1.0]) == pytest.approx(1.0)  # 0 in bin 0, 1 in bin 9
    with pytest.raises(M.MetricsInputError):
        M.expected_calibration_error(y, p, binning="quantile")


def _ece_pandas_cut(y, p, n_bins=10):
    # the FairMedFM / MEDFAIR estimator: pandas.cut over the observed range, sample-weighted |mean p - mean y|
    frame = pd.DataFrame({"p": p, "y": y, "b": pd.cut(p, n_bins, labels=False)})
    agg = frame.groupby("b").agg(p=("p", "mean"), y=("y", "mean"), n=("p", "size"))
    return float(np.average((agg.p - agg.y).abs(), weights=agg.n))


def _ece_unit_reference(y, p, n_bins=10):
    # scikit-learn's calibration_curve binning (np.searchsorted on linspace edges), weighted by bin counts
    from sklearn.calibration import calibration_curve
    true, pred = calibration_curve(y, p, n_bins=n_bins)
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], p), minlength=n_bins)
    return float(np.sum(counts[counts > 0] * np.abs(true - pred)) / len(p))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_reference_estimators(seed):
    rng = np.random.default_rng(seed)
    p = rng.beta(2, 3, 500)
    y = (rng.random(500) < p ** 0.7).astype(int)
    assert M.expected_calibration_error(y, p, binning="observed") == pytest.approx(_ece_pandas_cut(y, p), abs=1e-12)
    assert M.expected_calibration_error(y, p) == pytest.approx(_ece_unit_reference(y, p), abs=1e-12)


# --------------------------------------------------------------------------- thresholds

def test_thresholds_hand():
    y = [0, 0, 1, 0, 1, 1, 1]
    p = [0.1, 0.3, 0.35, 0.6, 0.7, 0.8, 0.9]
    # J = TPR - FPR at t = .9 .8 .7 .6 .35 .3 .1: .25 .5 .75 .417 .667 .333 0 -> .7
    assert M.choose_threshold(y, p, "youden") == 0.7
    # F1 at the same t: .4 .667 .857 .75 .889 .8 .727 -> .35
    assert M.choose_threshold(y, p, "f1") == 0.35
    # prevalence 4/7 of 7 -> k = 4 -> 4th largest score
    assert M.choose_threshold(y, p, "prevalence") == 0.6
    assert M.choose_threshold(y, p, "fixed") == 0.5


def test_threshold_ties_go_to_highest():
    # J = .667 at both t = .7 and t = .35
    assert M.choose_threshold([0, 0, 1, 0, 1, 1], [0.1, 0.3, 0.35, 0.6, 0.7, 0.9], "youden") == 0.7
    # F1 = 2/3 at t = .8 (TP 1, FP 0, FN 1) and at t = .2 (TP 2, FP 2)
    assert M.choose_threshold([1, 0, 0, 1], [0.8, 0.6, 0.4, 0.2], "f1") == 0.8


def test_threshold_errors():
    with pytest.raises(M.MetricsInputError, match="one class"):
        M.choose_threshold([1, 1], [0.2, 0.9], "youden")
    with pytest.raises(M.MetricsInputError, match="unknown threshold method"):
        M.choose_threshold([0, 1], [0.2, 0.9], "otsu")


def test_report_threshold_from_validation_only():
    y, p = np.array(HAND_Y), np.array(HAND_P)
    report = M.fairness_report(y, p, {"g": HAND_G}, threshold="youden",
                               validation=([0, 0, 1, 0, 1, 1, 1], [0.1, 0.3, 0.35, 0.6, 0.7, 0.8, 0.9]))
    assert report["threshold"] == 0.7 and report["threshold_method"] == "youden"
    assert report["attributes"]["g"]["acc"] == accuracy_score(y, p >= 0.7)
    fallback = M.fairness_report(y, p, {"g": HAND_G}, threshold="youden")
    assert fallback["threshold"] == 0.5 and fallback["threshold_method"] == "fixed"
    assert "no validation" in fallback["threshold_note"]


# --------------------------------------------------------------------------- fairlearn / scikit-learn

def _random_data(seed, n=400):
    rng = np.random.default_rng(seed)
    g = rng.choice(["w", "x", "y", "z"], n, p=[0.55, 0.25, 0.15, 0.05])
    base = {"w": 0.3, "x": 0.5, "y": 0.4, "z": 0.6}
    y = (rng.random(n) < np.vectorize(base.get)(g)).astype(int)
    p = np.clip(0.25 * y + 0.75 * rng.random(n) + 0.1 * (g == "x"), 0, 1)
    return y, p, g


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_fairlearn_and_sklearn(seed):
    y, p, g = _random_data(seed)
    t = 0.55
    yhat = (p >= t).astype(int)
    entry = M.fairness_report(y, p, {"g": g}, threshold=t)["attributes"]["g"]
    assert entry["n_groups"]["eod"] == 4  # every group has both classes
    assert entry["dpd"] == pytest.approx(demographic_parity_difference(y, yhat, sensitive_features=g))
    assert entry["eod"] == pytest.approx(equalized_odds_difference(y, yhat, sensitive_features=g))
    assert entry["eod_mean"] == pytest.approx(equalized_odds_difference(y, yhat, sensitive_features=g, agg="mean"))
    assert entry["eq_odds"] == pytest.approx(1 - equalized_odds_difference(y, yhat, sensitive_features=g, agg="mean"))
    assert entry["eop"] == pytest.approx(equal_opportunity_difference(y, yhat, sensitive_features=g))
    frame = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate, "sel": selection_rate,
                                 "acc": accuracy_score}, y_true=y, y_pred=yhat, sensitive_features=g).by_group
    for ours, theirs in [("tpr", "tpr"), ("fpr", "fpr"), ("selection_rate", "sel"), ("acc", "acc")]:
        assert entry[f"group_{ours}"] == pytest.approx(frame[theirs].to_dict())
    assert entry["auc"] == pytest.approx(roc_auc_score(y, p))
    assert entry["acc"] == pytest.approx(accuracy_score(y, yhat))
    assert entry["group_auc"] == pytest.approx({k: roc_auc_score(y[g == k], p[g == k]) for k in "wxyz"})
    assert entry["group_count"] == {k: int((g == k).sum()) for k in "wxyz"}


# --------------------------------------------------------------------------- edge cases

def test_one_class_group_is_reported_not_hidden():
    # group D has positives only: AUC and FPR undefined; fairlearn would give FPR 0 and count it in the gap
    y = np.array(HAND_Y + [1, 1])
    p = np.array(HAND_P + [0.95, 0.05])
    g = HAND_G + ["D", "D"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UndefinedMetricWarning leaks out
        entry = M.fairness_report(y, p, {"g": g})["attributes"]["g"]
    assert math.isnan(entry["group_auc"]["D"]) and math.isnan(entry["group_fpr"]["D"])
    assert entry["undefined"] == {"auc": ["D"], "tpr": [], "fpr": ["D"]}
    assert entry["n_groups"]["es_auc"] == 3 and entry["n_groups"]["eod"] == 3 and entry["n_groups"]["dpd"] == 4
    auc = roc_auc_score(y, p)
    assert entry["es_auc"] == pytest.approx(auc / (1 + abs(auc - 0.75) + 2 * abs(auc - 1.0)))
    assert entry["eod"] == pytest.approx(1.0)  # TPR gap over A, B, C; D's TPR is 1/2 but it is not covered
    assert entry["eop"] == pytest.approx(1.0)  # TPR is defined for D (.5) and within [0, 1]
    assert entry["worst_auc"] == 0.75


def test_group_without_negatives_does_not_shrink_fpr_gap_to_fairlearns_zero():
    # groups A, B of the hand example plus D (positives only, yhat = 1 0): FPR_A = 1/2, FPR_B = 1/3, D undefined.
    # TPR gap over A, B = 1 - 1/2; FPR gap = 1/2 - 1/3 -> mean form (1/2 + 1/6) / 2 = 1/3.
    # fairlearn sets FPR_D = 0 and gets an FPR gap of 1/2, mean form 1/2 (and TPR_D = 1/2 joins its TPR gap).
    y = np.array(HAND_Y[:8] + [1, 1])
    p = np.array(HAND_P[:8] + [0.95, 0.05])
    g = HAND_G[:8] + ["D", "D"]
    entry = M.fairness_report(y, p, {"g": g})["attributes"]["g"]
    assert entry["eod_mean"] == pytest.approx(1 / 3) and entry["n_groups"]["eod_mean"] == 2
    yhat = (p >= 0.5).astype(int)
    assert equalized_odds_difference(y, yhat, sensitive_features=g, agg="mean") == pytest.approx(0.5)


def test_empty_declared_group_is_listed():
    report = M.fairness_report(HAND_Y, HAND_P, {"g": HAND_G}, categories={"g": ["A", "B", "C", "E"]})
    entry = report["attributes"]["g"]
    assert entry["empty"] == ["E"] and entry["groups"] == ["A", "B", "C", "E"]
    assert entry["group_count"]["E"] == 0 and math.isnan(entry["group_auc"]["E"])
    assert entry["n_groups"]["dpd"] == 3 and entry["dpd"] == pytest.approx(0.5)
    table = M.group_table(report)
    assert table.loc[table.group == "E", "count"].item() == 0


def test_gap_needs_two_groups():
    entry = M.fairness_report([0, 1, 0, 1], [0.1, 0.9, 0.4, 0.6], {"g": ["A"] * 4})["attributes"]["g"]
    assert math.isnan(entry["dpd"]) and math.isnan(entry["es_auc"]) and entry["n_groups"]["dpd"] == 1
    assert entry["auc"] == 1.0


def test_tied_scores_auc_like_sklearn():
    y, p = [0, 0, 1, 1], [0.2, 0.6, 0.6, 0.9]
    # pairs: .6 vs .2 wins, .6 vs .6 ties (1/2), .9 wins twice -> 3.5 / 4
    assert M.resampled_auc(y, p, np.arange(4)[None])[0] == pytest.approx(0.875) == roc_auc_score(y, p)
    assert M.resampled_auc([0, 1, 0, 1], [0.5] * 4, np.arange(4)[None])[0] == 0.5
    assert M.fairness_report(y, p, {"g": ["a", "b", "a", "b"]})["attributes"]["g"]["auc"] == pytest.approx(0.875)


def test_intersectional_groups():
    race = pd.Categorical(["Black", "White", "Black"], categories=["Asian", "Black", "White"])
    labels = M.intersectional_groups({"race": race, "gender": ["Female", "Male", "Male"]})
    assert list(labels) == ["race=Black & gender=Female", "race=White & gender=Male", "race=Black & gender=Male"]
    assert len(labels.categories) == 6 and "race=Asian & gender=Female" in labels.categories


# --------------------------------------------------------------------------- bootstrap

def test_bootstrap_indices_are_stratified():
    g = np.array(list("aabbbc"))
    idx = M.bootstrap_indices(g, 50, seed=1)
    assert idx.shape == (50, 6) and (g[idx] == g[None, :]).all()


def test_resampled_auc_equals_sklearn_per_resample():
    y, p, g = _random_data(5, n=300)
    p = np.round(p, 2)  # many ties
    idx = M.bootstrap_indices(g, 5, seed=3)
    assert M.resampled_auc(y, p, idx) == pytest.approx([roc_auc_score(y[i], p[i]) for i in idx], abs=1e-12)


@pytest.mark.parametrize("binning", ["unit", "observed"])
def test_resampled_metrics_equal_point_estimates_on_each_resample(binning):
    # every vectorised resampled value equals the fairlearn/sklearn point path run on the resampled data
    y, p, g = _random_data(7, n=300)
    yf = y.astype(float)
    attr = M._Attribute("g", g, None, yf)
    idx = M._stratified_indices(attr.codes, 3, np.random.default_rng(0))
    yhat = (p >= 0.5).astype(float)
    summary, group = attr.resampled(M._counts(idx, len(y)), yf, p, yhat, 10, binning)
    for b, i in enumerate(idx):
        entry = M.fairness_report(y[i], p[i], {"g": g[i]}, binning=binning)["attributes"]["g"]
        for k in M.METRICS:
            assert summary[k][b] == pytest.approx(entry[k], abs=1e-12), k
        for name in M.GROUP_METRICS:
            assert group[name][b] == pytest.approx(list(entry[f"group_{name}"].values()), abs=1e-12), name


def test_ci_contains_estimate_and_shrinks_with_n():
    widths = []
    for n in (400, 3200):
        y, p, g = _random_data(11, n=n)
        entry = M.fairness_report(y, p, {"g": g}, n_boot=300, seed=0)["attributes"]["g"]
        for k in ("auc", "acc", "es_auc", "ece"):
            lo, hi = entry["ci"][k]
            assert lo <= entry[k] <= hi, k
        for grp, (lo, hi) in entry["ci"]["group_auc"].items():
            assert lo <= entry["group_auc"][grp] <= hi
        widths.append(entry["ci"]["auc"][1] - entry["ci"]["auc"][0])
    assert widths[1] < 0.6 * widths[0]  # about 1/sqrt(8) = 0.35 expected


def test_paired_bootstrap_self_is_zero_and_detects_a_better_model():
    y, p, g = _random_data(3, n=500)
    same = M.paired_bootstrap(y, p, p, {"g": g}, n_boot=200)["attributes"]["g"]
    for k, v in same.items():
        assert v["diff"] == 0 and v["ci"] == [0.0, 0.0], k
    better = np.clip(p + 0.3 * (y - 0.5), 0, 1)
    diff = M.paired_bootstrap(y, better, p, {"g": g}, n_boot=200)["attributes"]["g"]["auc"]
    assert diff["diff"] == pytest.approx(roc_auc_score(y, better) - roc_auc_score(y, p))
    assert 0 < diff["ci"][0] <= diff["diff"] <= diff["ci"][1]


def test_bootstrap_is_reproducible():
    y, p, g = _random_data(2, n=200)
    a = M.fairness_report(y, p, {"g": g}, n_boot=50, seed=4)["attributes"]["g"]["ci"]
    b = M.fairness_report(y, p, {"g": g}, n_boot=50, seed=4)["attributes"]["g"]["ci"]
    assert a == b


# --------------------------------------------------------------------------- CSV backend

@pytest.fixture()
def csv_files(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    race = rng.choice([1, 2], n)  # no Asian (code 0) in this test set
    gender = rng.integers(0, 2, n)
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    test = pd.DataFrame({"y_true": y, "y_score": p, "race": race, "gender": gender,
                         "site": rng.choice(["s1", "s2"], n)})
    val = test.sample(120, random_state=1)[["y_true", "y_score"]]
    test.to_csv(tmp_path / "test.csv", index=False)
    val.to_csv(tmp_path / "val.csv", index=False)
    return tmp_path, test


def test_report_from_csv(csv_files):
    path, test = csv_files
    report = M.report_from_csv(path / "test.csv", ["race", "gender", "race&gender", "site"],
                               val_path=path / "val.csv", n_boot=100)
    json.dumps(report, allow_nan=False)  # JSON-serialisable, NaN -> None
    assert report["threshold_method"] == "youden"
    race = report["attributes"]["race"]
    assert race["groups"] == ["Asian", "Black", "White"] and race["empty"] == ["Asian"]
    assert race["group_auc"]["Asian"] is None and race["threshold"] == report["threshold"]
    assert {"auc", "es_auc", "dpd", "eod", "group_auc", "threshold", "ci"} <= set(race)
    assert race["ci"]["auc"][0] <= race["auc"] <= race["ci"]["auc"][1]
    inter = report["attributes"]["race&gender"]
    assert len(inter["groups"]) == 6 and "race=Asian & gender=Female" in inter["empty"]
    assert report["attributes"]["gender"]["groups"] == ["Female", "Male"]
    assert report["attributes"]["site"]["groups"] == ["s1", "s2"]
    fixed = M.report_from_csv(path / "test.csv", ["race"], val_path=path / "val.csv", n_boot=0, threshold="0.3")
    assert fixed["threshold"] == 0.3 and fixed["threshold_method"] == "fixed"
    with pytest.raises(M.MetricsInputError, match="unknown threshold method 'otsu'"):
        M.report_from_csv(path / "test.csv", ["race"], n_boot=0, threshold="otsu")
    no_val = M.report_from_csv(path / "test.csv", "race,gender", n_boot=0)
    assert no_val["threshold"] == 0.5 and "no validation" in no_val["threshold_note"]
    assert M.summary_table(no_val).shape == (2 * len(M.METRICS), 6)


def _write(path, frame):
    frame.to_csv(path, index=False)
    return path


def test_csv_missing_column(csv_files):
    path, _ = csv_files
    with pytest.raises(M.MetricsInputError, match="column 'ethnicity' not found.*available columns: y_true"):
        M.report_from_csv(path / "test.csv", ["ethnicity"], n_boot=0)


def test_csv_labels_not_binary(csv_files):
    path, test = csv_files
    bad = _write(path / "bad.csv", test.assign(y_true=test.y_true.replace({1: 2})))
    with pytest.raises(M.MetricsInputError, match="labels are not binary"):
        M.report_from_csv(bad, ["race"], n_boot=0)


def test_csv_scores_outside_unit_interval(csv_files):
    path, test = csv_files
    bad = _write(path / "bad.csv", test.assign(y_score=test.y_score * 4 - 2))
    with pytest.raises(M.MetricsInputError, match=r"outside \[0, 1\].*sigmoid"):
        M.report_from_csv(bad, ["race"], n_boot=0)


def test_csv_nan_scores(csv_files):
    path, test = csv_files
    bad = _write(path / "bad.csv", test.assign(y_score=test.y_score.where(test.index % 50 != 3)))
    with pytest.raises(M.MetricsInputError, match="6 NaN values"):
        M.report_from_csv(bad, ["race"], n_boot=0)


def test_csv_invalid_attribute_codes(csv_files):
    path, test = csv_files
    bad = _write(path / "bad.csv", test.assign(race=test.race.replace({2: 7})))
    with pytest.raises(M.MetricsInputError, match="not race codes"):
        M.report_from_csv(bad, ["race"], n_boot=0)


def test_errors_are_one_line():
    with pytest.raises(M.MetricsInputError) as err:
        M.fairness_report([0, 1], [0.2, float("nan")], {"g": ["a", "b"]})
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_equity_scaled_forms_can_rank_two_models_differently():
    # Model A: overall 0.85, groups (0.85, 0.85, 0.70): sum = 0.85 / 1.15 = 0.7391; std 0.070711:
    #   std form 0.85 / 1.070711 = 0.7939; group-mean form: mean 0.80 / 1.070711 = 0.7472
    # Model B: overall 0.80, groups (0.88, 0.72, 0.80): sum = 0.80 / 1.16 = 0.6897; std 0.065320:
    #   std form 0.80 / 1.065320 = 0.7510; group-mean form: mean 0.80 / 1.065320 = 0.7510
    from fairbook.metrics import equity_scaled_group_mean, equity_scaled_std, equity_scaled_sum

    a_sum, b_sum = equity_scaled_sum(0.85, [0.85, 0.85, 0.70]), equity_scaled_sum(0.80, [0.88, 0.72, 0.80])
    a_std, b_std = equity_scaled_std(0.85, [0.85, 0.85, 0.70]), equity_scaled_std(0.80, [0.88, 0.72, 0.80])
    a_mean = equity_scaled_group_mean([0.85, 0.85, 0.70])
    b_mean = equity_scaled_group_mean([0.88, 0.72, 0.80])
    assert a_sum == pytest.approx(0.85 / 1.15) and b_sum == pytest.approx(0.80 / 1.16)
    assert a_std == pytest.approx(0.7939, abs=1e-4) and b_std == pytest.approx(0.7510, abs=1e-4)
    assert a_mean == pytest.approx(0.7472, abs=1e-4) and b_mean == pytest.approx(0.7510, abs=1e-4)
    assert a_sum > b_sum and a_std > b_std and a_mean < b_mean


# FairMedFM Table 2 (percent): AUC, AUC_F, AUC_M and the printed AUC_ES. LoRA+Resampling is left out: its printed
# AUC_ES (83.04) does not follow from its own columns (they give 82.50), a typo in the paper.
FAIRMEDFM_TABLE2 = {
    "LP": (76.07, 75.51, 76.04, 75.87), "LP+GroupDRO": (75.70, 75.15, 75.68, 75.50),
    "LP+Resampling": (75.66, 76.01, 75.45, 75.45), "LP+LAFTR": (75.80, 76.15, 75.69, 75.63),
    "LoRA": (82.52, 83.25, 81.30, 81.72), "LoRA+GroupDRO": (79.54, 79.95, 78.73, 79.06),
    "LoRA+LAFTR": (80.50, 80.08, 80.70, 80.25),
}


@pytest.mark.parametrize("row", FAIRMEDFM_TABLE2, ids=list(FAIRMEDFM_TABLE2))
def test_the_std_form_reproduces_fairmedfm_table_2(row):
    from fairbook.metrics import equity_scaled_group_mean, equity_scaled_std

    auc, female, male, printed = (v / 100 for v in FAIRMEDFM_TABLE2[row])
    assert round(100 * float(equity_scaled_std(auc, [female, male])), 2) == pytest.approx(100 * printed, abs=0.011)
    if row in ("LoRA", "LoRA+GroupDRO"):  # where the groups' mean is far from the overall AUC, the other form misses
        assert abs(100 * float(equity_scaled_group_mean([female, male])) - 100 * printed) > 0.15


def test_threshold_curve_matches_hand_counts():
    from fairbook.metrics import threshold_curve

    y = np.array([1, 0, 1, 0, 1, 1])
    p = np.array([0.9, 0.6, 0.4, 0.2, 0.7, 0.3])
    g = np.array(["a", "a", "a", "b", "b", "b"])
    curve = threshold_curve(y, p, g, [0.5]).set_index("group")
    # a: yhat (1,1,0) -> selection 2/3, TPR 1/2, FPR 1/1; b: yhat (0,1,0) -> selection 1/3, TPR 1/2, FPR 0/1
    assert curve.loc["a", "selection_rate"] == pytest.approx(2 / 3)
    assert curve.loc["b", "selection_rate"] == pytest.approx(1 / 3)
    assert curve.loc["a", "fpr"] == 1.0 and curve.loc["b", "fpr"] == 0.0
    assert curve["dpd"].iloc[0] == pytest.approx(1 / 3) and curve["eod"].iloc[0] == pytest.approx(1.0)


def test_ci_table_formats_percent_with_intervals():
    from fairbook.metrics import ci_table

    report = {"attributes": {"race": {"n_groups": {"auc": 3}, "ci": {"auc": [0.801, 0.9]},
                                      **{k: 0.0 for k in M.METRICS}, "auc": 0.8512}}}
    assert ci_table(report, ["auc"]).loc["race", "auc"] == "85.1\u00a0[80.1,\u00a090.0]"
    assert ci_table(report, ["dpd"]).loc["race", "dpd"] == "0.0"


def test_kept_replicates_give_the_intervals_and_are_shared_by_two_models():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    groups = {"g": rng.integers(0, 3, 300)}
    p1, p2 = rng.random(300), np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    r1 = M.fairness_report(y, p1, groups, n_boot=200, seed=3, keep_boot=True)["attributes"]["g"]
    r2 = M.fairness_report(y, p2, groups, n_boot=200, seed=3, keep_boot=True)["attributes"]["g"]
    assert r1["boot"]["auc"].shape == (200,) and r1["boot"]["group_auc"].shape == (200, 3)
    np.testing.assert_allclose(np.percentile(r1["boot"]["auc"], [2.5, 97.5]), r1["ci"]["auc"])
    # the same seed draws the same resamples for both models (and for paired_bootstrap), so the difference of
    # the kept replicates reproduces the paired interval
    paired = M.paired_bootstrap(y, p2, p1, groups, n_boot=200, seed=3)["attributes"]["g"]["auc"]
    np.testing.assert_allclose(np.percentile(r2["boot"]["auc"] - r1["boot"]["auc"], [2.5, 97.5]), paired["ci"])
    assert "boot" not in M.fairness_report(y, p1, groups, n_boot=10)["attributes"]["g"]
