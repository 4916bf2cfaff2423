"""Case studies: which test cases each model gets right or wrong, per group, and where models disagree.

The analogue of Fair-MoE's Fig. 3(a) (cases shown with image, note and each model's score), made quantitative.
Inputs are the saved predictions of :mod:`fairbook.results`; nothing is retrained.

Verdicts. Each model and seed decides ``y_score >= t`` with ``t`` chosen on that model's own *validation*
predictions (:func:`fairbook.metrics.choose_threshold`, Youden's J by default, as :func:`fairbook.tables.evaluate`
does); the test split never chooses a threshold. A case's verdict for a model is the majority over seeds: *right*
when the model is right in more than half of its seeds. With an even number of seeds a tie counts as *not right*
(the model is not reliably right on that case). The number of seeds right is kept next to the verdict.

Intervals (all 95% by default), each covering test-set sampling for the fixed trained models, not seed variation:

* a share of cases (an agreement pattern, an accuracy) is a binomial proportion over independent cases: Wilson
  score interval (:func:`fairbook.data.wilson_interval`);
* the share of discordant cases a model wins in McNemar's test: Clopper-Pearson (exact) interval, the interval
  that matches the exact test (it excludes 1/2 exactly when the two-sided exact p is below ``1 - level``);
* a paired difference in accuracy: Newcombe's hybrid score interval for paired proportions (his method 10),
  built from the two accuracies' Wilson intervals and the correlation of the paired verdicts. Unlike a bootstrap
  over cases it keeps a sensible width when few or no cases are discordant.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from fairbook.data.attributes import ATTRIBUTES, FILTER_ATTRIBUTES, check_attribute
from fairbook.data.fairvlmed import describe, load_metadata
from fairbook.data.summary import wilson_interval
from fairbook.files import resolve
from fairbook.metrics import choose_threshold
from fairbook.results import ALL, read_predictions, same_data
from fairbook.stats import estimate

__all__ = ["CasesError", "select_models", "aligned_predictions", "seed_verdicts", "case_frame", "patterns",
           "agreement_table", "accuracy_table", "mcnemar_p", "clopper_pearson", "mcnemar", "pairwise_mcnemar",
           "paired_difference_ci", "gallery_cases", "interval_table"]

#: Split names of the prediction files and of the dataset.
_SPLITS = {"test": "Test", "validation": "Validation"}


class CasesError(ValueError):
    """Saved predictions that cannot be matched to the dataset's cases, or a bad request."""


# ------------------------------------------------------------------------------------------------ per-case frame
def select_models(runs: pd.DataFrame, attribute: str, methods: Sequence[str], seeds: Sequence[int]) -> pd.DataFrame:
    """The rows of ``runs`` (:func:`fairbook.results.collect`) for one model per method and seed: a method trained
    on ``attribute``, or on none (training attribute ``all``, CLIP). Raises when a method lacks a seed."""
    keep = (runs["method"].isin(methods) & runs["attribute"].isin([attribute, ALL])
            & runs["seed"].isin([int(s) for s in seeds]))
    chosen = runs[keep]
    for method in methods:
        for seed in seeds:
            n = int(((chosen["method"] == method) & (chosen["seed"] == int(seed))).sum())
            if n != 1:
                found = "no model" if n == 0 else f"{n} models"
                raise CasesError(f"{found} for {method!r} ({attribute} or {ALL}), seed {seed}: run its chapter with "
                                 "these seeds, or change methods, attribute or seeds")
    order = {m: i for i, m in enumerate(methods)}
    return chosen.sort_values(["method", "seed"], key=lambda c: c.map(order) if c.name == "method" else c,
                              ignore_index=True)


def aligned_predictions(folder: str | os.PathLike, split: str, metadata: pd.DataFrame) -> pd.DataFrame:
    """A model's ``split`` predictions ("test" or "validation"), checked to be in the dataset's case order.

    Prediction files carry no case id; they follow :class:`fairbook.data.FairVLMed` item order. Labels and the four
    attributes must equal the dataset's (``metadata`` from :func:`fairbook.data.load_metadata`), row by row."""
    pred = read_predictions(folder, split)
    path = f"{folder}/{split}.csv"
    if len(pred) != len(metadata):
        raise CasesError(f"{path} has {len(pred)} rows but the dataset's {_SPLITS[split]} split has {len(metadata)} "
                         "cases: it was made on other data; point data_root at the data the model was scored on")
    checks = {"y_true": metadata["glaucoma"].to_numpy()}
    checks |= {a: metadata[f"{a}_name"].to_numpy() for a in FILTER_ATTRIBUTES}
    for column, expected in checks.items():
        bad = np.flatnonzero(pred[column].to_numpy().astype(str) != expected.astype(str))
        if len(bad):
            raise CasesError(f"{path} row {bad[0]} has {column} {pred[column].iloc[bad[0]]!r}, the dataset "
                             f"{expected[bad[0]]!r}: rows are not in dataset order; save the predictions again "
                             "with fairbook.results.save_predictions")
    return pred


def seed_verdicts(runs: pd.DataFrame, data_root: str | os.PathLike, threshold: str | float = "youden") -> pd.DataFrame:
    """One row per (model, seed, test case): ``method, seed, case, score, threshold, right``.

    ``threshold`` is chosen on the model's own validation predictions (method of
    :func:`fairbook.metrics.choose_threshold`) or is a number; ``right`` is ``(score >= threshold) == label``."""
    root = resolve(data_root)
    same_data(runs, describe(data_root))
    meta = {split: load_metadata(root, name) for split, name in _SPLITS.items()}
    frames = []
    for run in runs.to_dict("records"):
        test = aligned_predictions(run["folder"], "test", meta["test"])
        val = aligned_predictions(run["folder"], "validation", meta["validation"])
        t = float(threshold) if not isinstance(threshold, str) else choose_threshold(val["y_true"], val["y_score"],
                                                                                     threshold)
        score = test["y_score"].to_numpy(float)
        frames.append(pd.DataFrame({"method": run["method"], "seed": run["seed"], "case": np.arange(len(test)),
                                    "score": score, "threshold": t,
                                    "right": (score >= t) == test["y_true"].to_numpy().astype(bool)}))
    return pd.concat(frames, ignore_index=True)


def case_frame(verdicts: pd.DataFrame, data_root: str | os.PathLike) -> pd.DataFrame:
    """One row per test case: ``case, filename, path, note, label`` and the four attributes' group names, then per
    model ``<m> score`` (mean over seeds), ``<m> score min``/``max`` (range over seeds), ``<m> right seeds``,
    ``<m> seeds`` and ``<m> right`` (the majority verdict of the module docstring)."""
    meta = load_metadata(resolve(data_root), "Test")
    cases = pd.DataFrame({"case": np.arange(len(meta)), "filename": meta["filename"], "path": meta["path"],
                          "note": meta["note"], "label": meta["glaucoma"].astype(int)})
    for a in FILTER_ATTRIBUTES:
        cases[a] = meta[f"{a}_name"].to_numpy()
    for method, rows in verdicts.groupby("method", sort=False):
        per_case = rows.groupby("case")
        cases[f"{method} score"] = per_case["score"].mean().reindex(cases["case"]).to_numpy()
        cases[f"{method} score min"] = per_case["score"].min().reindex(cases["case"]).to_numpy()
        cases[f"{method} score max"] = per_case["score"].max().reindex(cases["case"]).to_numpy()
        right, seeds = per_case["right"].sum().reindex(cases["case"]), per_case.size().reindex(cases["case"])
        cases[f"{method} right seeds"] = right.to_numpy(int)
        cases[f"{method} seeds"] = seeds.to_numpy(int)
        cases[f"{method} right"] = 2 * right.to_numpy() > seeds.to_numpy()
    return cases


def _models(cases: pd.DataFrame, models: Sequence[str] | None) -> list[str]:
    found = [c.removesuffix(" right") for c in cases.columns if c.endswith(" right")]
    if models is None:
        return found
    missing = [m for m in models if m not in found]
    if missing:
        raise CasesError(f"no verdicts for {', '.join(map(repr, missing))} in the case frame; choose from {found}")
    return list(models)


def _groups(cases: pd.DataFrame, attribute: str) -> list[tuple[str, pd.DataFrame]]:
    """("all", every case), then each group of ``attribute`` present, in code order."""
    check_attribute(attribute)
    if attribute not in cases:
        raise CasesError(f"the case frame has no {attribute!r} column; use one of {', '.join(FILTER_ATTRIBUTES)}")
    present = set(cases[attribute])
    names = [n for n in ATTRIBUTES[attribute].values() if n in present]
    return [("all", cases)] + [(g, cases[cases[attribute] == g]) for g in names]


# ------------------------------------------------------------------------------------------------ agreement
def patterns(cases: pd.DataFrame, models: Sequence[str] | None = None) -> pd.Series:
    """Name of each case's agreement pattern: ``all right``, ``only X right``, ``only X wrong`` (three or more
    models), ``right: X, Y`` (other mixes), ``all wrong``."""
    models = _models(cases, models)
    right = cases[[f"{m} right" for m in models]].to_numpy(bool)
    return pd.Series([_pattern_name(tuple(r), models) for r in right], index=cases.index, name="pattern")


def _pattern_name(right: tuple[bool, ...], models: Sequence[str]) -> str:
    k, n_right = len(models), sum(right)
    if n_right == k:
        return "all right"
    if n_right == 0:
        return "all wrong"
    if n_right == 1:
        return f"only {models[right.index(True)]} right"
    if n_right == k - 1:
        return f"only {models[right.index(False)]} wrong"
    return "right: " + ", ".join(m for m, r in zip(models, right) if r)


def _all_patterns(models: Sequence[str]) -> list[str]:
    """Every pattern name: most models right first; within a count, in model order of the models it names."""
    k = len(models)

    def key(right: tuple[bool, ...]) -> tuple:
        named = [i for i, r in enumerate(right) if r != (sum(right) == k - 1 and k > 2)]
        return -sum(right), named

    combos = sorted(itertools.product([True, False], repeat=k), key=key)
    return [_pattern_name(r, models) for r in combos]


def agreement_table(cases: pd.DataFrame, attribute: str, models: Sequence[str] | None = None,
                    level: float = 0.95) -> pd.DataFrame:
    """Share of cases in each agreement pattern (:func:`patterns`), for all cases and per group of ``attribute``.

    Long format: ``group, n, pattern, count, share, lo, hi`` with the Wilson interval of the share. The patterns
    partition the cases; a last row per group, ``models disagree``, is the share not in ``all right``/``all wrong``.
    """
    models = _models(cases, models)
    names = _all_patterns(models) + ["models disagree"]
    pattern = patterns(cases, models)
    rows = []
    for group, part in _groups(cases, attribute):
        counts = pattern[part.index].value_counts()
        counts["models disagree"] = len(part) - counts.get("all right", 0) - counts.get("all wrong", 0)
        for name in names:
            k = int(counts.get(name, 0))
            lo, hi = wilson_interval(k, len(part), level)
            rows.append({"group": group, "n": len(part), "pattern": name, "count": k, "share": k / len(part),
                         "lo": float(lo), "hi": float(hi)})
    return pd.DataFrame(rows)


def accuracy_table(cases: pd.DataFrame, attribute: str, models: Sequence[str] | None = None,
                   level: float = 0.95) -> pd.DataFrame:
    """Accuracy of each model, all cases and per group: ``group, n, model``; ``right`` and ``accuracy`` of the
    majority verdicts with the Wilson interval ``lo, hi``; ``seed_accuracy``, the mean over seeds of each seed's
    accuracy (= the mean over cases of the share of seeds right), with a t interval over cases ``seed_lo, seed_hi``.
    The two differ when seeds disagree on many cases (a tie counts as not right in the first)."""
    rows = []
    for group, part in _groups(cases, attribute):
        t = stats.t.ppf(0.5 + level / 2, len(part) - 1) if len(part) > 1 else float("nan")
        for m in _models(cases, models):
            k = int(part[f"{m} right"].sum())
            lo, hi = wilson_interval(k, len(part), level)
            rate = (part[f"{m} right seeds"] / part[f"{m} seeds"]).to_numpy(float)
            half = t * rate.std(ddof=1) / np.sqrt(len(rate)) if len(rate) > 1 else float("nan")
            rows.append({"group": group, "n": len(part), "model": m, "right": k, "accuracy": k / len(part),
                         "lo": float(lo), "hi": float(hi), "seed_accuracy": rate.mean(),
                         "seed_lo": rate.mean() - half, "seed_hi": rate.mean() + half})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ McNemar
def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar test (McNemar 1947; exact form: binomial test of ``b`` successes in ``b + c``
    discordant pairs with probability 1/2): ``min(1, 2 P(X <= min(b, c)))``, ``X ~ Bin(b + c, 1/2)``; 1 when
    there is no discordant pair."""
    n = int(b) + int(c)
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * stats.binom.cdf(min(int(b), int(c)), n, 0.5)))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson 1934) interval of a binomial proportion ``k / n`` from Beta quantiles; NaN for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    alpha = 1 - level
    lo = stats.beta.ppf(alpha / 2, k, n - k + 1) if k > 0 else 0.0
    hi = stats.beta.ppf(1 - alpha / 2, k + 1, n - k) if k < n else 1.0
    return float(lo), float(hi)


def paired_difference_ci(cells: Sequence[int], level: float = 0.95) -> tuple[float, float]:
    """Interval of the paired difference of proportions ``(b - c) / n`` from the cells ``(a, b, c, d)`` (a: both
    right, b: only the first, c: only the second, d: neither): Newcombe's hybrid score interval for paired data
    (Newcombe 1998, Statistics in Medicine 17:2635, method 10).

    With ``p1 = (a + b) / n``, ``p2 = (a + c) / n`` and their Wilson intervals ``(l1, u1)``, ``(l2, u2)``:
    ``lower = p1 - p2 - sqrt((p1 - l1)² - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)²)``, ``upper`` likewise with
    ``(u1 - p1)`` and ``(p2 - l2)``, where ``phi`` is the correlation of the paired table with a continuity
    correction (``ad - bc`` reduced by ``n / 2`` towards 0 when positive) and 0 when a margin is empty."""
    a, b, c, d = map(int, cells)
    n = a + b + c + d
    if n == 0:
        return float("nan"), float("nan")
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, l2), (u1, u2) = wilson_interval(np.array([a + b, a + c]), n, level)
    cross = a * d - b * c
    cross = max(cross - n / 2, 0) if cross > 0 else cross
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = cross / np.sqrt(margins) if margins > 0 else 0.0
    down = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    up = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return float(p1 - p2 - np.sqrt(max(down, 0))), float(p1 - p2 + np.sqrt(max(up, 0)))


def mcnemar(cases: pd.DataFrame, attribute: str, a: str, b: str, level: float = 0.95) -> pd.DataFrame:
    """Model ``a`` against model ``b`` on the same cases, for all cases and per group of ``attribute``.

    Columns: ``group, n, model_a, model_b``; ``a_only``/``b_only`` (discordant cases only ``a``/``b`` gets right)
    and ``discordant``; ``a_wins`` = ``a_only / discordant`` with its Clopper-Pearson interval ``a_wins_lo/hi``
    (1/2 when the models are equally good); ``p`` (exact McNemar, :func:`mcnemar_p`); ``diff`` = accuracy of ``a``
    minus ``b`` = ``(a_only - b_only) / n`` with its paired interval ``diff_lo/hi`` (:func:`paired_difference_ci`)."""
    _models(cases, [a, b])
    rows = []
    for group, part in _groups(cases, attribute):
        ra, rb = part[f"{a} right"].to_numpy(bool), part[f"{b} right"].to_numpy(bool)
        cells = [int((ra & rb).sum()), int((ra & ~rb).sum()), int((~ra & rb).sum()), int((~ra & ~rb).sum())]
        k, d = cells[1], cells[1] + cells[2]
        wins_lo, wins_hi = clopper_pearson(k, d, level)
        diff_lo, diff_hi = paired_difference_ci(cells, level)
        rows.append({"group": group, "n": len(part), "model_a": a, "model_b": b, "a_only": k, "b_only": cells[2],
                     "discordant": d, "a_wins": k / d if d else float("nan"), "a_wins_lo": wins_lo,
                     "a_wins_hi": wins_hi, "p": mcnemar_p(k, cells[2]), "diff": (k - cells[2]) / len(part),
                     "diff_lo": diff_lo, "diff_hi": diff_hi})
    return pd.DataFrame(rows)


def pairwise_mcnemar(cases: pd.DataFrame, attribute: str, models: Sequence[str] | None = None,
                     level: float = 0.95) -> pd.DataFrame:
    """:func:`mcnemar` for every pair of models (earlier model as ``a``), stacked."""
    models = _models(cases, models)
    return pd.concat([mcnemar(cases, attribute, a, b, level)
                      for a, b in itertools.combinations(models, 2)], ignore_index=True)


# ------------------------------------------------------------------------------------------------ gallery
def gallery_cases(cases: pd.DataFrame, attribute: str, per_group: int = 3, seed: int = 0,
                  models: Sequence[str] | None = None) -> pd.DataFrame:
    """Up to ``per_group`` cases per group of ``attribute`` on which the models' verdicts differ, for a gallery.

    Deterministic for a ``seed``: the group's disagreements are shuffled, then taken one pattern at a time, in a
    shuffled order of the patterns (round robin), so that different patterns ("only X right", "only Y wrong", ...)
    appear before a pattern repeats. Returns the chosen rows of ``cases`` with ``group`` and ``pattern`` columns."""
    models = _models(cases, models)
    names = _all_patterns(models)
    chosen = []
    for i, (group, part) in enumerate(_groups(cases, attribute)[1:]):
        rng = np.random.default_rng([seed, i])
        order = dict(zip(names, rng.permutation(len(names))))
        part = part.assign(group=group, pattern=patterns(part, models))
        part = part[~part["pattern"].isin(["all right", "all wrong"])]
        part = part.sample(frac=1, random_state=rng)
        part = part.assign(_round=part.groupby("pattern").cumcount(), _order=part["pattern"].map(order))
        chosen.append(part.sort_values(["_round", "_order"], kind="stable").head(per_group))
    return pd.concat(chosen).drop(columns=["_round", "_order"]).reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ display
def interval_table(frame: pd.DataFrame, index: str | Sequence[str], columns: str, value: str, lo: str = "lo",
                   hi: str = "hi", scale: float = 100, decimals: int = 1) -> pd.DataFrame:
    """Wide display table with cells ``value [lo, hi]`` (times ``scale``), rows and columns in first-seen order."""
    cells = frame.assign(_cell=[estimate(scale * v, lo=scale * low, hi=scale * h, decimals=decimals)
                                for v, low, h in zip(frame[value], frame[lo], frame[hi])])
    index = [index] if isinstance(index, str) else list(index)
    wide = cells.pivot(index=index, columns=columns, values="_cell")
    rows = list(dict.fromkeys(map(tuple, frame[index].to_numpy().tolist())))
    wide = wide.reindex(columns=list(dict.fromkeys(frame[columns])))
    wide = wide.reindex(pd.MultiIndex.from_tuples(rows, names=index) if len(index) > 1 else [r[0] for r in rows])
    wide.columns.name = None
    return wide
