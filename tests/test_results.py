"""The results store (saved predictions) and the comparison tables built from it (fairbook.tables)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st
from sklearn.metrics import roc_auc_score

from fairbook import results, tables
from fairbook.metrics import report_from_csv
from fairbook.results import ResultsError

N = 400
DATA = "SynthFairVLMed (synthetic; test)"


def make_split(split_seed: int, score_seed: int, black_noise: float = 2.0, n: int = N):
    """Labels and (race, gender, ethnicity, language) codes fixed by ``split_seed`` (the same test set for every
    model), scores drawn with ``score_seed``; race group 1 ("Black") gets noisier scores."""
    rng = np.random.default_rng(split_seed)
    codes = np.column_stack([rng.integers(0, 3, n), rng.integers(0, 2, n), rng.integers(0, 2, n),
                             rng.integers(0, 3, n)])
    y = rng.integers(0, 2, n)
    noise = np.where(codes[:, 0] == 1, black_noise, 0.7)
    p = 1 / (1 + np.exp(-(2 * y - 1 + noise * np.random.default_rng(score_seed).normal(size=n))))
    return y, p, codes


def save_model(run_dir, method, seed, attribute=results.ALL, black_noise=2.0, data=DATA):
    offset = 1000 * len(method)  # different methods draw different scores on the same splits
    scores = {"validation": make_split(1, offset + seed, black_noise),
              "test": make_split(7, offset + seed, black_noise)}
    return results.save(run_dir, method, seed, scores, data, {"best_epoch": 1, "scores": "dropped"}, attribute)


@pytest.fixture
def store(tmp_path):
    run_a, run_b = tmp_path / "11-clip-baseline" / "default", tmp_path / "12-fairclip" / "default"
    for seed in (0, 1, 2):
        save_model(run_a, "CLIP", seed)
        save_model(run_b, "FairCLIP", seed, attribute="race", black_noise=1.0)
    return run_a, run_b


def test_save_writes_both_splits_and_the_record_last(tmp_path):
    folder = save_model(tmp_path, "CLIP", 3)
    assert folder == tmp_path / "predictions" / "CLIP" / "all" / "seed-3"
    test = pd.read_csv(folder / "test.csv")
    y, p, codes = make_split(7, 4003)
    np.testing.assert_array_equal(test["y_true"], y)
    np.testing.assert_allclose(test["y_score"], p)
    assert set(test["race"]) == {"Asian", "Black", "White"}
    info = json.loads((folder / "info.json").read_text())
    assert info == {"data": DATA, "best_epoch": 1}  # the scores are not duplicated into the record


def test_collect_skips_an_interrupted_save_and_reads_the_data_label(store, tmp_path):
    run_a, run_b = store
    (run_a / "predictions" / "CLIP" / "all" / "seed-9").mkdir()  # no info.json: interrupted
    runs = results.collect(run_a, run_b)
    assert len(runs) == 6
    assert sorted(runs[runs["method"] == "CLIP"]["seed"]) == [0, 1, 2]
    assert set(runs["chapter"]) == {"11-clip-baseline", "12-fairclip"}
    assert set(runs["attribute"]) == {"all", "race"} and set(runs["data"]) == {DATA}


def test_bad_inputs_give_one_line_errors(store, tmp_path):
    with pytest.raises(ResultsError, match="no saved predictions") as info:
        results.collect(tmp_path / "nothing")
    assert "\n" not in str(info.value)
    with pytest.raises(ResultsError, match="unknown training attribute 'age'"):
        save_model(tmp_path, "X", 0, attribute="age")
    with pytest.raises(ResultsError, match="pass validation, and test unless"):
        results.save(tmp_path, "X", 0, {"test": make_split(0, 0)}, DATA)
    with pytest.raises(ResultsError, match=r"the splits \['train', 'validation'\]"):
        results.save(tmp_path, "X", 0, {"validation": make_split(0, 0), "train": make_split(0, 0)}, DATA)
    runs = results.collect(*store)
    with pytest.raises(ResultsError, match="not on 'real'"):
        results.same_data(runs, "real")
    assert results.same_data(runs, DATA) is runs


def test_evaluate_matches_scikit_learn_and_uses_a_validation_threshold(store):
    runs = results.collect(store[0])
    evals = tables.evaluate(runs, n_boot=0)
    assert len(evals) == 3 * 4  # three seeds, four attributes
    row = evals[(evals["seed"] == 2) & (evals["eval_attribute"] == "race")].iloc[0]
    y, p, codes = make_split(7, 4002)
    assert row["auc"] == pytest.approx(roc_auc_score(y, p))
    black = codes[:, 0] == 1
    assert row["group_auc"]["Black"] == pytest.approx(roc_auc_score(y[black], p[black]))
    yv, pv, _ = make_split(1, 4002)
    from fairbook.metrics import choose_threshold
    assert row["threshold"] == pytest.approx(choose_threshold(yv, pv, "youden"))


@pytest.fixture
def evals(store):
    return tables.evaluate(results.collect(*store), n_boot=200)


def test_table_is_mean_and_sample_std_over_seeds_in_percent(evals):
    table = tables.table(evals, decimals=2)
    assert list(table.columns) == ["ES-AUC", "AUC", "DPD", "EOD", "seeds"]
    # FairCLIP trained on race appears under race only; CLIP under every attribute
    assert ("gender", "FairCLIP") not in table.index and ("gender", "CLIP") in table.index
    clip = evals[(evals["method"] == "CLIP") & (evals["eval_attribute"] == "race")]["auc"]
    expected = f"{100 * clip.mean():.2f}\u00a0±\u00a0{100 * clip.std(ddof=1):.2f}"  # never wraps in a cell
    assert table.loc[("race", "CLIP"), "AUC"] == expected
    assert table.loc[("race", "FairCLIP"), "seeds"] == 3


def test_interval_of_the_seed_mean_averages_replicates_over_seeds(evals):
    clip = evals[(evals["method"] == "CLIP") & (evals["eval_attribute"] == "gender")]
    mean_reps = np.mean([b["auc"] for b in clip["boot"]], axis=0)
    lo, hi = np.percentile(mean_reps, [2.5, 97.5])
    cell = tables.ci_table(evals).loc[("gender", "CLIP"), "AUC"]
    assert cell == f"{100 * clip['auc'].mean():.1f}\u00a0[{100 * lo:.1f},\u00a0{100 * hi:.1f}]"
    assert lo < clip["auc"].mean() < hi


def test_paired_table_matches_scipy_and_a_model_against_itself_gives_a_zero_interval(evals, store, tmp_path):
    paired = tables.paired_table(evals, baseline="CLIP")
    assert set(paired["attribute"]) == {"race"} and len(paired) == 4
    auc = paired[paired["metric"] == "auc"].iloc[0]
    at = evals[evals["eval_attribute"] == "race"]
    a = at[at["method"] == "FairCLIP"].sort_values("seed")["auc"].to_numpy()
    b = at[at["method"] == "CLIP"].sort_values("seed")["auc"].to_numpy()
    ref = st.ttest_rel(a, b)
    assert auc["diff"] == pytest.approx((a - b).mean())
    assert auc["t"] == pytest.approx(ref.statistic) and auc["p"] == pytest.approx(ref.pvalue)
    assert auc["boot_lo"] <= auc["diff"] <= auc["boot_hi"]
    # a copy of CLIP under another name: identical scores on identical resamples, so the interval is [0, 0]
    twin = tmp_path / "twin"
    shutil.copytree(store[0] / "predictions" / "CLIP", twin / "predictions" / "Twin")
    both = tables.evaluate(results.collect(store[0], twin), attributes=["race"], n_boot=100)
    same = tables.paired_table(both, baseline="CLIP")
    assert np.allclose(same[["diff", "boot_lo", "boot_hi"]].to_numpy(), 0)
    with pytest.raises(ResultsError, match="baseline 'GroupDRO' has no results"):
        tables.paired_table(evals, baseline="GroupDRO")


def test_group_differences_are_signed_and_flag_the_noisy_group(evals):
    diffs = tables.group_differences(evals, "CLIP")
    assert len(diffs) == 3 + 1 + 1 + 3  # group pairs of race, gender, ethnicity, language
    race = diffs[diffs["attribute"] == "race"].set_index("groups")
    # race group 1 ("Black") has noisier scores by construction: Asian - Black is clearly positive
    assert race.loc["Asian − Black", "diff"] > 0.1 and race.loc["Asian − Black", "ci_lo"] > 0
    assert not race.loc["Asian − Black", "ci_contains_0"]
    clip = evals[(evals["method"] == "CLIP") & (evals["eval_attribute"] == "race")]
    expected = np.mean([g["Black"] - g["White"] for g in clip["group_auc"]])
    assert race.loc["Black − White", "diff"] == pytest.approx(expected)
    # gender groups are exchangeable by construction: the interval contains 0
    assert bool(diffs[diffs["attribute"] == "gender"]["ci_contains_0"].iloc[0])


def test_group_auc_table_lists_group_sizes(evals):
    table = tables.group_auc_table(evals, "race")
    assert list(table.index) == ["CLIP", "FairCLIP"]
    assert all(col.split(" (n=")[0] in {"Asian", "Black", "White"} for col in table.columns)
    with pytest.raises(ResultsError, match="no evaluation on attribute 'age'"):
        tables.group_auc_table(evals, "age")


def test_method_names_with_a_slash_round_trip(tmp_path):
    folder = save_model(tmp_path, "Fair-MoE w/o FOL", 0)
    assert folder.parent.parent.name == "Fair-MoE w%2Fo FOL"
    assert list(results.collect(tmp_path)["method"]) == ["Fair-MoE w/o FOL"]
    with pytest.raises(ResultsError, match="method name is empty"):
        save_model(tmp_path, " ", 0)


def test_save_predictions_round_trips_through_fairbook_metrics(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    y = np.tile([0, 1], n // 2)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0, 1)
    codes = np.column_stack([np.arange(n) % 3, np.arange(n) % 2, np.zeros(n, int), np.full(n, -1)])
    path = results.save_predictions(tmp_path / "preds.csv", y, p, codes, "test")
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["y_true", "y_score", "race", "gender", "ethnicity", "language", "split"]
    assert frame["race"].tolist()[:3] == ["Asian", "Black", "White"] and set(frame["language"]) == {"Unknown"}
    assert np.array_equal(frame["y_score"].to_numpy(), p)                        # full precision
    report = report_from_csv(path, ["race", "gender"], n_boot=20)
    race = report["attributes"]["race"]
    assert race["auc"] == pytest.approx(roc_auc_score(y, p))
    black = codes[:, 0] == 1
    assert race["group_auc"]["Black"] == pytest.approx(roc_auc_score(y[black], p[black]))
    assert report["attributes"]["gender"]["group_count"] == {"Female": 30, "Male": 30}
    assert [f.name for f in tmp_path.iterdir()] == ["preds.csv"]
    with pytest.raises(ResultsError, match="n x 4 code matrix"):
        results.save_predictions(tmp_path / "bad.csv", y, p, codes[:, :2], "test")


def test_compare_runs_tells_identical_changed_and_missing_predictions(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for seed in (0, 1):
        save_model(first, "CLIP", seed)
        save_model(second, "CLIP", seed)
    save_model(first, "FairCLIP", 0, attribute="race")
    changed = second / "predictions" / "CLIP" / "all" / "seed-1" / "test.csv"
    frame = pd.read_csv(changed)
    frame.loc[3, "y_score"] += 1e-3
    frame.to_csv(changed, index=False)
    table = results.compare_runs(first, second).set_index(["method", "seed", "split"])
    assert table.loc[("CLIP", 0, "test"), "identical"] and table.loc[("CLIP", 0, "test"), "max_abs_diff"] == 0
    assert not table.loc[("CLIP", 1, "test"), "identical"]
    assert table.loc[("CLIP", 1, "test"), "max_abs_diff"] == pytest.approx(1e-3)
    assert table.loc[("CLIP", 1, "validation"), "identical"]
    assert table.loc[("FairCLIP", 0, "test"), "only_in"] == "first"


def test_leaderboard_ranks_methods_per_column_and_shows_intervals(store):
    runs = results.collect(*store)
    evals = tables.evaluate(runs, attributes=["race", "gender", "race&gender"], n_boot=100)
    board = tables.leaderboard(evals)
    assert list(board.index) == sorted(board.index, key=lambda m: board.loc[m, ("", "mean rank")])
    assert {a for a, _ in board.columns[2:]} == {"race", "gender", "race&gender"}
    assert board.loc["CLIP", ("", "columns")] == 15 and board.loc["FairCLIP", ("", "columns")] == 10
    # FairCLIP (trained on race) appears under race and under race & gender, not under gender
    assert board.loc["FairCLIP", ("gender", "AUC ↑")] == "–"
    long = tables.seed_means(evals, ["auc", "es_auc", "dpd", "eod", "worst_auc"])
    ranks = []
    for (attribute, metric), cell in long.groupby(["attribute", "metric"], observed=True):
        sign = tables.BETTER[metric]
        order = cell.sort_values("mean", ascending=sign < 0)["method"].tolist()  # best first
        ranks += [{"method": m, "rank": order.index(m) + 1} for m in order]
    by_hand = pd.DataFrame(ranks).groupby("method")["rank"].mean()
    for method in board.index:
        assert board.loc[method, ("", "mean rank")] == pytest.approx(by_hand[method], abs=0.01)
    # the interval cell holds the seed mean of the per-seed values, in percent
    race_auc = evals[(evals["method"] == "CLIP") & (evals["eval_attribute"] == "race")]["auc"].mean()
    assert board.loc["CLIP", ("race", "AUC ↑")].startswith(f"{100 * race_auc:.1f}\u00a0[")
    # the intersection's groups are the race x gender cells
    cells = evals[(evals["method"] == "CLIP") & (evals["eval_attribute"] == "race&gender")]["groups"].iloc[0]
    assert len(cells) == 6 and "race=Black & gender=Female" in cells


def test_claim_verdicts_follow_the_expected_direction_and_name_missing_runs():
    from fairbook.methods import Claim

    def row(attribute, metric, lo, hi, method="B", baseline="A", chapter="12-x"):
        return {"chapter": chapter, "attribute": attribute, "method": method, "baseline": baseline, "metric": metric,
                "diff": (lo + hi) / 2, "boot_lo": lo, "boot_hi": hi}

    paired = pd.DataFrame([row("race", "es_auc", 0.01, 0.03), row("gender", "es_auc", -0.01, 0.02),
                           row("race", "dpd", -0.04, -0.01), row("race", "auc", -0.03, -0.01),
                           row("race", "eod", 0.01, 0.02)])
    claims = [Claim("P", "Table 1", "B raises ES-AUC", "12-x", "B", "A", "es_auc"),
              Claim("P", "Table 1", "B lowers DPD", "12-x", "B", "A", "dpd"),  # lower DPD is "better"
              Claim("P", "Table 1", "B keeps AUC", "12-x", "B", "A", "auc", "not worse"),
              Claim("P", "Table 4", "B has a higher EOD", "12-x", "B", "A", "eod", "worse"),
              Claim("P", "Table 2", "C raises AUC", "20-y", "C", "A", "auc")]
    out = tables.claim_verdicts(claims, paired)
    got = [(r.statement, r.attribute if isinstance(r.attribute, str) else None, r.verdict, r.held)
           for r in out.itertuples()]
    assert got == [("B raises ES-AUC", "race", "better", True),
                   ("B raises ES-AUC", "gender", "no clear difference", False),
                   ("B lowers DPD", "race", "better", True),
                   ("B keeps AUC", "race", "worse", False),
                   ("B has a higher EOD", "race", "worse", True),
                   ("C raises AUC", None, "not run", None)]
    assert tables.claim_verdicts(claims[:1], pd.DataFrame())["verdict"].tolist() == ["not run"]
    with pytest.raises(ValueError, match="choose better, worse or not worse"):
        Claim("P", "T", "s", "c", "m", "b", "auc", "higher")


def test_rank_agreement_is_scipys_spearman_per_seed(tmp_path):
    for seed in (0, 1):
        save_model(tmp_path, "Zero-shot", seed)
        save_model(tmp_path, "LP", seed)
        y, p, codes = make_split(7, 1000 * len("Zero-shot") + seed)
        scaled = {"validation": (y, p, codes), "test": (y, 0.5 + 0.1 * p ** 3, codes)}  # monotone: same order
        results.save(tmp_path, "Scaled", seed, scaled, DATA, attribute="gender")
    got = tables.rank_agreement(results.collect(tmp_path), baseline="Zero-shot").set_index("method")
    expected = [st.spearmanr(make_split(7, 2000 + s)[1], make_split(7, 9000 + s)[1]).statistic for s in (0, 1)]
    assert got.loc["LP", "spearman"] == pytest.approx(np.mean(expected))
    assert got.loc["LP", "min"] == pytest.approx(min(expected))
    assert got.loc["LP", "seeds"] == 2 and got.loc["LP", "spearman"] < 0.9
    assert got.loc["Scaled", "spearman"] == pytest.approx(1.0) and got.loc["Scaled", "attribute"] == "gender"
    with pytest.raises(ResultsError, match="baseline 'CLIP' has no results"):
        tables.rank_agreement(results.collect(tmp_path), baseline="CLIP")
