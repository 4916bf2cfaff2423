"""fairbook.cases: per-case verdicts, agreement tables, McNemar tests and the case gallery, on hand-worked cases."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from scipy import stats  # noqa: E402

from fairbook import cases, results  # noqa: E402
from fairbook.data import FairVLMed, describe, load_metadata  # noqa: E402


def tiny(rights: dict[str, list[int]], race: list[str]) -> pd.DataFrame:
    """A case frame with only what the agreement functions read: groups and majority verdicts."""
    frame = pd.DataFrame({"race": race})
    for m, r in rights.items():
        frame[f"{m} right"] = np.array(r, bool)
    return frame


#           A  B  C per case; White cases 0-5, Black cases 6-9
RIGHTS = {"A": [1, 1, 1, 0, 0, 1, 1, 0, 0, 1],
          "B": [1, 1, 0, 1, 0, 0, 1, 0, 1, 1],
          "C": [1, 0, 0, 0, 0, 1, 0, 0, 1, 1]}
RACE = ["White"] * 6 + ["Black"] * 4


def test_agreement_table_counts_each_pattern_per_group_by_hand():
    table = cases.agreement_table(tiny(RIGHTS, RACE), "race").set_index(["group", "pattern"])
    # White: ABC, AB, A, B, none, AC -> all right 1, only C wrong 1, only A right 1, only B right 1, all wrong 1,
    # only B wrong 1. Black: AB, none, BC, ABC -> only C wrong 1, all wrong 1, only A wrong 1, all right 1.
    white = table.loc["White", "count"]
    assert white.to_dict() == {"all right": 1, "only A wrong": 0, "only B wrong": 1, "only C wrong": 1,
                               "only A right": 1, "only B right": 1, "only C right": 0, "all wrong": 1,
                               "models disagree": 4}
    black = table.loc["Black", "count"]
    assert (black["all right"], black["only A wrong"], black["only C wrong"], black["all wrong"]) == (1, 1, 1, 1)
    assert black["models disagree"] == 2
    assert table.loc[("all", "all right"), "count"] == 2 and table.loc[("all", "all right"), "n"] == 10
    assert table.loc[("Black", "all wrong"), "share"] == pytest.approx(0.25)
    # the patterns partition each group
    partition = table.drop(index="models disagree", level="pattern")
    assert partition.groupby(level="group")["count"].sum().to_dict() == {"all": 10, "White": 6, "Black": 4}


def test_agreement_shares_have_wilson_intervals():
    row = cases.agreement_table(tiny(RIGHTS, RACE), "race").set_index(["group", "pattern"]).loc[("all", "all wrong")]
    ci = stats.binomtest(2, 10).proportion_ci(confidence_level=0.95, method="wilson")
    assert (row["share"], row["lo"], row["hi"]) == pytest.approx((0.2, ci.low, ci.high))


def test_patterns_name_two_models_only_x_right():
    frame = tiny({"A": [1, 1, 0, 0], "B": [1, 0, 1, 0]}, ["White"] * 4)
    assert cases.patterns(frame).tolist() == ["all right", "only A right", "only B right", "all wrong"]


def test_accuracy_table_majority_and_seed_mean():
    frame = tiny({"A": [1, 1, 0, 0]}, ["White"] * 4).assign(**{"A right seeds": [3, 2, 1, 0], "A seeds": 3})
    row = cases.accuracy_table(frame, "race").iloc[0]
    rate = np.array([1, 2 / 3, 1 / 3, 0])
    half = stats.t.ppf(0.975, 3) * rate.std(ddof=1) / 2
    assert (row["right"], row["accuracy"], row["seed_accuracy"]) == (2, 0.5, pytest.approx(0.5))
    assert (row["seed_lo"], row["seed_hi"]) == pytest.approx((0.5 - half, 0.5 + half))


def test_mcnemar_p_by_hand_and_against_scipy():
    assert cases.mcnemar_p(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)  # 2 P(X <= 1), X ~ Bin(10, 1/2)
    assert cases.mcnemar_p(0, 0) == 1.0
    for b, c in [(1, 9), (9, 1), (5, 5), (0, 7), (12, 30), (40, 21)]:
        assert cases.mcnemar_p(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue)


def test_clopper_pearson_matches_scipy_exact_interval():
    for k, n in [(0, 5), (3, 10), (10, 10), (27, 60)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert cases.clopper_pearson(k, n) == pytest.approx((ci.low, ci.high))


def test_mcnemar_table_counts_discordant_cases_per_group():
    table = cases.mcnemar(tiny(RIGHTS, RACE), "race", "A", "C").set_index("group")
    # A vs C, all cases: A only right on 1, 2, 6 (3); C only right on 8 (1)
    row = table.loc["all"]
    assert (row["a_only"], row["b_only"], row["discordant"], row["n"]) == (3, 1, 4, 10)
    assert row["a_wins"] == 0.75 and row["p"] == pytest.approx(stats.binomtest(3, 4).pvalue)
    assert row["diff"] == pytest.approx(0.2)
    assert (row["diff_lo"], row["diff_hi"]) == pytest.approx(cases.paired_difference_ci((3, 3, 1, 3)))
    assert row["diff_lo"] < 0 < 0.2 < row["diff_hi"]
    assert (row["a_wins_lo"], row["a_wins_hi"]) == pytest.approx(cases.clopper_pearson(3, 4))
    assert (table.loc["White", "a_only"], table.loc["White", "b_only"]) == (2, 0)


def test_paired_difference_interval_covers_the_true_difference():
    """Designed case: cells (both right, only A, only B, both wrong) with probabilities .5, .2, .1, .2, so the true
    accuracy difference is 0.1; over 400 simulated test sets of 60 cases the 95% interval should contain it about
    95% of the time (Newcombe reports coverage close to nominal for his method 10)."""
    rng = np.random.default_rng(1)
    hits = [cases.paired_difference_ci(rng.multinomial(60, [0.5, 0.2, 0.1, 0.2])) for _ in range(400)]
    coverage = np.mean([lo <= 0.1 <= hi for lo, hi in hits])
    assert 0.92 <= coverage <= 0.99


def test_paired_difference_interval_is_wald_for_large_n_and_symmetric():
    a, b, c, d = 40_000, 20_000, 10_000, 30_000
    n, diff = 100_000, 0.1
    half = stats.norm.ppf(0.975) * np.sqrt((b + c) / n - diff**2) / np.sqrt(n)  # Wald, paired
    assert cases.paired_difference_ci((a, b, c, d)) == pytest.approx((diff - half, diff + half), abs=2e-4)
    lo, hi = cases.paired_difference_ci((8, 1, 3, 4))
    assert cases.paired_difference_ci((8, 3, 1, 4)) == pytest.approx((-hi, -lo))  # swapping the models
    lo, hi = cases.paired_difference_ci((12, 0, 0, 4))  # no discordant case: still an interval around 0
    assert lo == pytest.approx(-hi) and 0.05 < hi < 0.3


def test_gallery_takes_disagreements_round_robin_and_deterministically():
    frame = tiny({"A": [1, 1, 1, 0, 1, 0], "B": [0, 0, 0, 1, 1, 0]}, ["White"] * 6)
    picks = cases.gallery_cases(frame, "race", per_group=2, seed=3)
    assert sorted(picks["pattern"]) == ["only A right", "only B right"]
    assert picks.index.tolist() == [0, 1] and set(picks["group"]) == {"White"}
    again = cases.gallery_cases(frame, "race", per_group=2, seed=3)
    pd.testing.assert_frame_equal(picks, again)
    assert len(cases.gallery_cases(frame, "race", per_group=10)) == 4  # never an agreeing case


def test_interval_table_formats_value_and_interval():
    frame = pd.DataFrame({"group": ["all", "all", "x"], "pattern": ["p", "q", "p"], "share": [0.25, 0.5, 0.1],
                          "lo": [0.1, 0.4, 0.0], "hi": [0.4, 0.6, 0.3]})
    wide = cases.interval_table(frame, "pattern", "group", "share")
    assert wide.loc["p", "all"] == "25.0\u00a0[10.0,\u00a040.0]" and wide.loc["q", "x"] != wide.loc["q", "x"]  # NaN
    assert wide.columns.tolist() == ["all", "x"] and wide.index.tolist() == ["p", "q"]


# ---------------------------------------------------------------------------------------- saved predictions
def _codes(meta: pd.DataFrame) -> np.ndarray:
    return meta[list(FairVLMed.attribute_names)].to_numpy()


def _save(run_dir, smoke_data, seed, val_score, test_score, test_rows=None, method="CLIP"):
    val, test = load_metadata(smoke_data, "Validation"), load_metadata(smoke_data, "Test")
    test = test if test_rows is None else test.iloc[test_rows]
    scores = {"validation": (val["glaucoma"], val_score(val["glaucoma"].to_numpy()), _codes(val)),
              "test": (test["glaucoma"], test_score(test["glaucoma"].to_numpy()), _codes(test))}
    results.save(run_dir, method, seed, scores, data=describe(smoke_data))


def test_threshold_is_chosen_on_validation_not_test(tmp_path, smoke_data):
    # validation: positives 0.8, negatives 0.3 -> Youden picks 0.8; test: positives 0.6, negatives 0.2, whose own
    # best threshold would be 0.6. At 0.8 every test case is called negative: right exactly on the negatives.
    _save(tmp_path, smoke_data, 0, lambda y: 0.3 + 0.5 * y, lambda y: 0.2 + 0.4 * y)
    runs = cases.select_models(results.collect(tmp_path), "race", ["CLIP"], [0])
    verdicts = cases.seed_verdicts(runs, smoke_data)
    y = load_metadata(smoke_data, "Test")["glaucoma"].to_numpy()
    assert verdicts["threshold"].unique().tolist() == [pytest.approx(0.8)]
    assert np.array_equal(verdicts["right"].to_numpy(), y == 0)
    from fairbook.metrics import choose_threshold
    assert choose_threshold(y, 0.2 + 0.4 * y) == pytest.approx(0.6)


def test_case_frame_majority_over_seeds_and_ties(smoke_data):
    n = len(load_metadata(smoke_data, "Test"))
    right = {0: [1, 1, 0], 1: [1, 0, 0], 2: [0, 1, 0]}  # first three cases; case 0 right 2/3, 1 right 2/3, 2 0/3
    rows = [{"method": m, "seed": s, "case": c, "score": 0.1 * s, "threshold": 0.5,
             "right": bool(right[s][c]) if c < 3 else True}
            for m, seeds in (("A", [0, 1, 2]), ("B", [0, 1])) for s in seeds for c in range(n)]
    frame = cases.case_frame(pd.DataFrame(rows), smoke_data)
    assert frame["A right seeds"].tolist()[:4] == [2, 2, 0, 3] and frame["A right"].tolist()[:4] == [1, 1, 0, 1]
    assert frame["B right"].tolist()[:3] == [True, False, False]  # B: 2/2, 1/2 (a tie is not right), 0/2
    assert frame["A score"].iloc[0] == pytest.approx(0.1) and frame["A score max"].iloc[0] == pytest.approx(0.2)
    assert frame["label"].tolist() == load_metadata(smoke_data, "Test")["glaucoma"].tolist()


def test_misordered_predictions_raise_one_line(tmp_path, smoke_data):
    n = len(load_metadata(smoke_data, "Test"))
    _save(tmp_path, smoke_data, 0, lambda y: 0.3 + 0.5 * y, lambda y: 0.5 + 0 * y, test_rows=np.arange(n)[::-1])
    runs = results.collect(tmp_path)
    with pytest.raises(cases.CasesError, match=r"not in dataset order") as err:
        cases.seed_verdicts(runs, smoke_data)
    assert "\n" not in str(err.value)


def test_select_models_requires_every_seed(tmp_path, smoke_data):
    _save(tmp_path, smoke_data, 0, lambda y: 0.3 + 0.5 * y, lambda y: 0.5 + 0 * y)
    with pytest.raises(cases.CasesError, match=r"no model for 'CLIP' \(race or all\), seed 1"):
        cases.select_models(results.collect(tmp_path), "race", ["CLIP"], [0, 1])


def test_case_gallery_draws_one_panel_per_case_with_scores(smoke_data):
    meta = load_metadata(smoke_data, "Test").head(3)
    picks = pd.DataFrame({"group": ["Black", "White", "White"], "pattern": "only A right", "path": meta["path"],
                          "note": meta["note"], "label": [1, 0, 1], "A score": [0.61, 0.2, 0.3],
                          "A score min": 0.1, "A score max": 0.9, "A right seeds": 2, "A seeds": 3})
    from fairbook import plots

    fig = plots.case_gallery(picks, ["A"])
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(fig.axes) == 4 and len(shown) == 3  # two rows (Black, White) of two columns, one left empty
    assert shown[0].get_xlabel() == "A: 0.610 [0.100, 0.900] · right 2/3"
    assert shown[0].get_title(loc="left").startswith("Black · glaucoma · only A right")
    plt.close(fig)
