"""Descriptive tables of the data chapter, checked against scipy and hand-worked counts."""
import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from fairbook.data import summary


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (50, 100), (97, 100), (1, 1)])
def test_wilson_interval_matches_scipy(k, n):
    lo, hi = summary.wilson_interval(k, n)
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)


def test_wilson_interval_of_an_empty_group_is_nan():
    lo, hi = summary.wilson_interval(0, 0)
    assert np.isnan(lo) and np.isnan(hi)


@pytest.fixture
def meta():
    # 6 samples: races White, White, White, Black, Black, (no Asian); gender F/M
    return pd.DataFrame({
        "glaucoma": [1, 0, 0, 1, 1, 0],
        "race_name": ["White", "White", "White", "Black", "Black", "White"],
        "gender_name": ["Female", "Male", "Female", "Female", "Male", "Male"],
        "note": ["a b c", "a", "a b", "a b c d", "", "x y"],
    })


def test_group_table_counts_prevalence_and_keeps_empty_groups(meta):
    t = summary.group_table(meta, "race")
    assert t.loc["White", "n"] == 4 and t.loc["White", "prevalence"] == 0.25
    assert t.loc["Black", "n"] == 2 and t.loc["Black", "prevalence"] == 1.0
    assert t.loc["Asian", "n"] == 0 and np.isnan(t.loc["Asian", "prevalence"])  # listed, not skipped
    assert t["share"].sum() == pytest.approx(1.0)


def test_intersection_table(meta):
    counts = summary.intersection_table(meta, "race", "gender")
    assert counts.loc["White", "Female"] == 2 and counts.loc["Black", "Male"] == 1
    prev = summary.intersection_table(meta, "race", "gender", values="prevalence")
    assert prev.loc["White", "Female"] == 0.5 and prev.loc["Black", "Female"] == 1.0


def test_unknown_attribute_is_a_clear_error(meta):
    with pytest.raises(ValueError, match="unknown attribute 'age_group'; choose one of: race, gender"):
        summary.group_table(meta, "age_group")


def test_vertical_cdr():
    disc = np.zeros((20, 20), np.uint8)
    cup = np.zeros_like(disc)
    disc[5:15, 4:16] = 1  # 10 rows high
    cup[8:12, 8:12] = 1  # 4 rows high
    assert summary.vertical_cdr(disc, cup) == 0.4
    assert np.isnan(summary.vertical_cdr(np.zeros_like(disc), cup))


def test_note_lengths(meta):
    by_race = summary.note_lengths(meta, by="race")
    assert by_race.loc["Black", ("words", "mean")] == 2.0  # "a b c d" -> 4, "" -> 0
    assert by_race.loc["White", ("chars", "max")] == 5
