"""Representation fairness: how much of a sensitive attribute a model's image features carry.

Three views of the same L2-normalised image features (:func:`fairbook.train.extract_features`):

* **t-SNE maps** (van der Maaten & Hinton, 2008), coloured by group and by label, as in Fair-MoE's Fig. 3(b). A
  picture, not a measurement: t-SNE keeps neighbourhoods, not distances or cluster sizes.
* **Attribute probe**: a logistic regression that predicts the group from the features. Its test AUC (macro
  one-vs-rest for more than two groups) is 0.5 when the features carry no linearly decodable trace of the
  attribute and 1 when they separate the groups perfectly.
* **Group distances**: the unbiased squared maximum mean discrepancy MMD²_u (Gretton et al., 2012, JMLR,
  Lemma 6) between a group's features and the others', with a Gaussian kernel. Its expectation is exactly 0 when
  the two distributions are equal, unlike the biased (V-statistic) estimate, which is positive at any finite
  sample size; a permutation test of the group labels says whether it differs from 0.

Intervals follow :mod:`fairbook.results`: every model is scored on the same test split with the same resample
indices (same ``seed``), so the mean over seeds of the replicates is a replicate of the seed mean
(:func:`over_seeds`) and the difference of two models' mean replicates gives a paired interval (:func:`compare`).
These intervals cover test-set sampling for fixed trained models; the ± std over seeds covers training variation.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from fairbook.data.attributes import ATTRIBUTES, FILTER_ATTRIBUTES, UNKNOWN
from fairbook.metrics import bootstrap_indices, resampled_auc
from fairbook.stats import NBSP, estimate, interval

__all__ = ["CS", "Features", "Images", "RepresentationError", "load_images", "image_features", "tsne", "tsne_points",
           "attribute_probe", "median_bandwidth", "gaussian_kernel", "mmd2_unbiased", "group_distances", "over_seeds",
           "compare", "format_summary"]

#: Inverse regularisation strengths the probe chooses from: :func:`fairbook.train.linear_probe`'s grid (unit-norm
#: features need large C) and one more decade, as fine-tuned features lie close together.
CS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0, 1e4)


class RepresentationError(ValueError):
    """Bad input to a representation analysis."""


class Features(NamedTuple):
    """Image features of one split: ``X`` (n x D, L2-normalised), ``label`` (glaucoma 0/1) and ``group`` (the
    sensitive attribute's group names)."""

    X: np.ndarray
    label: np.ndarray
    group: np.ndarray


def _check_attribute(attribute: str) -> str:
    if attribute not in FILTER_ATTRIBUTES:
        raise RepresentationError(f"unknown attribute {attribute!r}; choose one of {', '.join(FILTER_ATTRIBUTES)}")
    return attribute


class Images(NamedTuple):
    """A split's images, decoded and preprocessed once to run several models on: ``batches`` (a list of loader
    batches, itself a loader) and ``preprocess`` (the text of the preprocess they went through)."""

    batches: list
    preprocess: str


def load_images(dataset, batch_size: int = 64) -> Images:
    """Decode and preprocess every image of a :class:`fairbook.data.FairVLMed` split once (its ``preprocess``);
    models of one run configuration share their preprocess, so reading the files once serves all of them."""
    from torch.utils.data import DataLoader

    return Images(list(DataLoader(dataset, batch_size=batch_size)), repr(dataset.preprocess))


def image_features(model, preprocess, images: Images, attribute: str) -> Features:
    """:func:`fairbook.train.extract_features` of preloaded images (:func:`load_images`), with the group names of
    ``attribute``. ``preprocess`` is the model's own (from :func:`fairbook.protocol.load_model`); it must be the one
    the images went through. Samples whose attribute is unknown (code -1, kept in the training split) are dropped."""
    _check_attribute(attribute)
    if repr(preprocess) != images.preprocess:
        raise RepresentationError("the model's preprocess differs from the one the images went through; load the "
                                  "images again with this model's preprocess")
    import torch

    from fairbook.data import FairVLMed
    from fairbook.train import extract_features

    with torch.inference_mode():
        X, y, codes = extract_features(model, images.batches)
    codes = codes[:, FairVLMed.attribute_names.index(attribute)]
    known = codes != UNKNOWN
    names = np.array([ATTRIBUTES[attribute][int(c)] for c in codes[known]], dtype=str)
    return Features(X[known], y[known], names)


def _matrix(X, name: str = "features") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) == 0:
        raise RepresentationError(f"{name} must be a non-empty 2-D array (samples x dimensions), got shape {X.shape}")
    return X


def _groups(X: np.ndarray, groups, least: int = 2) -> np.ndarray:
    groups = np.asarray(groups).astype(str)
    if groups.shape != (len(X),):
        raise RepresentationError(f"{len(groups)} group labels for {len(X)} feature rows; give one label per row")
    if len(np.unique(groups)) < least:
        raise RepresentationError(f"found {len(np.unique(groups))} group(s); need at least {least} to compare groups")
    return groups


# ------------------------------------------------------------------------------------------------------ t-SNE
def tsne(X, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """Two-dimensional t-SNE (van der Maaten & Hinton, 2008) with scikit-learn: PCA initialisation and a fixed
    ``random_state``, so the same features and seed give the same map. ``perplexity`` is capped at (n - 1) / 3 for
    small samples. Returns an (n, 2) array."""
    from sklearn.manifold import TSNE

    X = _matrix(X)
    if len(X) < 5:
        raise RepresentationError(f"t-SNE needs at least 5 samples, got {len(X)}")
    perplexity = min(float(perplexity), (len(X) - 1) / 3)
    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(X)


def tsne_points(features: Mapping[str, Features], n_points: int = 600, seed: int = 0) -> pd.DataFrame:
    """t-SNE maps of several models' features of the same split, on the same ``n_points`` samples (drawn without
    replacement with ``seed``): columns ``model, x, y, group, label`` ("glaucoma" / "no glaucoma")."""
    frames, first = [], None
    for model, feats in features.items():
        if first is None:
            first = feats
            rng = np.random.default_rng(seed)
            rows = np.sort(rng.choice(len(feats.X), size=min(int(n_points), len(feats.X)), replace=False))
        elif len(feats.group) != len(first.group) or not np.array_equal(feats.group, first.group):
            raise RepresentationError(f"{model!r} has features of other samples than {next(iter(features))!r}; "
                                      "extract every model's features from the same split")
        xy = tsne(feats.X[rows], seed)
        frames.append(pd.DataFrame({"model": model, "x": xy[:, 0], "y": xy[:, 1], "group": feats.group[rows],
                                    "label": np.where(feats.label[rows] == 1, "glaucoma", "no glaucoma")}))
    if not frames:
        raise RepresentationError("no features given; pass {model name: Features}")
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------- attribute probe
def _ovr_auc(groups: np.ndarray, proba: np.ndarray, classes: Sequence[str], idx: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC of each group (rows) on each resample ``idx`` (B, n): group ``c`` against the others,
    scored by its predicted probability. Their mean is scikit-learn's ``roc_auc_score(..., multi_class="ovr",
    average="macro")``; with two groups both rows equal the binary AUC."""
    return np.stack([resampled_auc(groups == c, proba[:, k], idx) for k, c in enumerate(classes)])


def _macro_auc(groups: np.ndarray, proba: np.ndarray, classes: Sequence[str], idx: np.ndarray) -> np.ndarray:
    return _ovr_auc(groups, proba, classes, idx).mean(axis=0)


def _everything(n: int) -> np.ndarray:
    return np.arange(n)[None]


def attribute_probe(train: Features, val: Features, test: Features, Cs: Sequence[float] = CS, n_boot: int = 1000,
                    seed: int = 0, level: float = 0.95) -> dict:
    """How well the sensitive attribute can be read linearly from image features.

    An L2 logistic regression (scikit-learn; multinomial for more than two groups) predicts the group from
    ``X``: fitted on ``train``, its ``C`` chosen by the VALIDATION macro AUC (ties: the smaller C), scored once on
    ``test``. The AUC is the binary ROC AUC for two groups and the macro one-vs-rest AUC otherwise; chance is 0.5.
    The interval is a percentile bootstrap over test samples, stratified by group (same indices for the same test
    groups and ``seed``; see the module docstring).

    Returns ``auc``, ``ci_lo``, ``ci_hi``, ``boot`` (resampled AUCs), ``C``, ``val_auc_by_C``, ``groups``,
    ``group_auc`` and ``group_boot`` (each group against the rest, and its resampled values) and ``n`` (samples
    per split).
    """
    from sklearn.linear_model import LogisticRegression

    splits = {}
    for name, part in (("train", train), ("val", val), ("test", test)):
        X = _matrix(part.X, f"{name} features")
        splits[name] = (X, _groups(X, part.group))
    classes = list(np.unique(splits["train"][1]))
    for name in ("val", "test"):
        unseen = sorted(set(splits[name][1]) - set(classes))
        missing = sorted(set(classes) - set(splits[name][1]))
        if unseen or missing:
            raise RepresentationError(f"{name} groups differ from training groups (unseen: {unseen}, missing: "
                                      f"{missing}); draw splits that contain every group")
    X_train, g_train = splits["train"]
    X_val, g_val = splits["val"]
    fits = {C: LogisticRegression(C=C, max_iter=2000).fit(X_train, g_train) for C in Cs}
    val_auc = {C: float(_macro_auc(g_val, m.predict_proba(X_val), classes, _everything(len(g_val)))[0])
               for C, m in fits.items()}
    C = max(val_auc, key=val_auc.get)
    X_test, g_test = splits["test"]
    proba = fits[C].predict_proba(X_test)
    point = _ovr_auc(g_test, proba, classes, _everything(len(g_test)))[:, 0]
    reps = (_ovr_auc(g_test, proba, classes, bootstrap_indices(g_test, n_boot, seed)) if n_boot
            else np.zeros((len(classes), 0)))
    lo, hi = _percentile(reps.mean(axis=0), level)
    return {"auc": float(point.mean()), "ci_lo": lo, "ci_hi": hi, "boot": reps.mean(axis=0), "C": float(C),
            "val_auc_by_C": val_auc, "groups": classes, "group_auc": dict(zip(classes, point.tolist())),
            "group_boot": dict(zip(classes, reps)), "n": {name: len(g) for name, (_, g) in splits.items()}}


def _percentile(values: np.ndarray, level: float) -> tuple[float, float]:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------------------- MMD
def _sq_distances(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    d2 = (X * X).sum(1)[:, None] + (Y * Y).sum(1)[None] - 2 * X @ Y.T
    return np.maximum(d2, 0)


def median_bandwidth(X) -> float:
    """The median heuristic (Gretton et al., 2012, Sec. 8): the median Euclidean distance between distinct
    samples of ``X`` (pool both samples before calling)."""
    X = _matrix(X)
    if len(X) < 2:
        raise RepresentationError("the median heuristic needs at least 2 samples")
    d = np.sqrt(_sq_distances(X, X)[np.triu_indices(len(X), 1)])
    bandwidth = float(np.median(d))
    if bandwidth <= 0:
        raise RepresentationError("the median distance between samples is 0 (duplicated features); pass a bandwidth")
    return bandwidth


def gaussian_kernel(X, Y, bandwidth: float) -> np.ndarray:
    """Gaussian kernel matrix ``k(x, y) = exp(-|x - y|^2 / (2 bandwidth^2))``."""
    return np.exp(-_sq_distances(_matrix(X), _matrix(Y)) / (2 * float(bandwidth) ** 2))


def mmd2_unbiased(X, Y, bandwidth: float) -> float:
    """Unbiased MMD² of Gretton et al. (2012), Lemma 6 (Eq. 3):

    ``1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j)``,

    with the Gaussian :func:`gaussian_kernel`. Zero in expectation when X and Y come from the same distribution,
    so it can be negative."""
    X, Y = _matrix(X), _matrix(Y)
    if len(X) < 2 or len(Y) < 2:
        raise RepresentationError(f"the unbiased MMD needs at least 2 samples on each side, got {len(X)} and {len(Y)}")
    m, n = len(X), len(Y)
    kxx, kyy, kxy = (gaussian_kernel(A, B, bandwidth) for A, B in ((X, X), (Y, Y), (X, Y)))
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def _weighted_mmd2(diag: np.ndarray, wa: np.ndarray, wb: np.ndarray, ka: np.ndarray, kb: np.ndarray
                   ) -> np.ndarray:
    """MMD²_u for each row of sample weights ``wa``, ``wb`` (R, n) on disjoint samples (``ka = wa @ K``,
    ``kb = wb @ K``, ``diag`` the kernel's diagonal), never pairing a sample with itself: 0/1 weights give
    :func:`mmd2_unbiased` exactly; bootstrap counts give the same U-statistic on the resample with the copies of
    one sample left unpaired, so the replicates centre on the estimate instead of above it."""

    def within(w, kw):  # NaN for a resample holding copies of a single sample
        with np.errstate(invalid="ignore", divide="ignore"):
            return ((kw * w).sum(1) - (w * w) @ diag) / (w.sum(1) ** 2 - (w * w).sum(1))

    return within(wa, ka) + within(wb, kb) - 2 * (ka * wb).sum(1) / (wa.sum(1) * wb.sum(1))


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)


def group_distances(X, groups, n_boot: int = 1000, n_perm: int = 1000, seed: int = 0, level: float = 0.95,
                    bandwidth: float | None = None) -> pd.DataFrame:
    """Unbiased MMD² (:func:`mmd2_unbiased`) between each group's features and the rest's; with two groups, one
    row (first group against second).

    The Gaussian bandwidth is fixed once per call: ``bandwidth`` or the median heuristic on all of ``X``.

    * ``ci_lo``/``ci_hi``: percentile bootstrap over samples, stratified by group
      (:func:`fairbook.metrics.bootstrap_indices` with ``seed``), in which copies of one sample are never paired.
      When the distributions are equal this interval is conservative (wider than the estimate's spread: the
      bootstrap of a degenerate U-statistic), so read "is there a difference" from ``p_perm``.
    * ``p_perm``: permutation test of "this group's features are distributed as the rest's",
      ``(1 + #{permuted >= observed}) / (1 + n_perm)`` over random relabellings (the same for the same ``seed``).
    * ``boot`` and ``perm`` keep the replicates for :func:`over_seeds`.
    """
    X = _matrix(X)
    groups = _groups(X, groups)
    names = list(np.unique(groups))
    counts = {g: int((groups == g).sum()) for g in names}
    if min(counts.values()) < 2 or len(X) - max(counts.values()) < 2:
        raise RepresentationError(f"group sizes {counts}: every group and its rest need at least 2 samples")
    bandwidth = median_bandwidth(X) if bandwidth is None else float(bandwidth)
    K = gaussian_kernel(X, X, bandwidth)
    diag, k_sum = np.diag(K), K.sum(0)[None]
    weights = _counts(bootstrap_indices(groups, n_boot, seed), len(X)) if n_boot else np.zeros((0, len(X)))
    k_weights = weights @ K
    rng = np.random.default_rng(seed)
    codes = np.unique(groups, return_inverse=True)[1].ravel()
    shuffled = np.stack([rng.permutation(codes) for _ in range(n_perm)]) if n_perm else np.zeros((0, len(X)), int)
    rows = []
    for code, g in enumerate(names[:1] if len(names) == 2 else names):
        a = (groups == g).astype(np.float64)[None]
        ka = a @ K
        observed = float(_weighted_mmd2(diag, a, 1 - a, ka, k_sum - ka)[0])
        boot_a = weights * a
        kb = boot_a @ K
        boot = _weighted_mmd2(diag, boot_a, weights - boot_a, kb, k_weights - kb)
        perm_a = (shuffled == code).astype(np.float64)
        kp = perm_a @ K
        perm = _weighted_mmd2(diag, perm_a, 1 - perm_a, kp, k_sum - kp)
        lo, hi = _percentile(boot, level)
        rows.append({"comparison": f"{g} vs {names[1]}" if len(names) == 2 else f"{g} vs rest", "group": g,
                     "n_group": counts[g], "n_rest": len(X) - counts[g], "mmd2": observed, "ci_lo": lo,
                     "ci_hi": hi, "p_perm": _p_value(observed, perm), "bandwidth": bandwidth, "boot": boot,
                     "perm": perm})
    return pd.DataFrame(rows)


def _p_value(observed: float, perm: np.ndarray) -> float:
    """One-sided permutation p-value with the observed labelling counted (Phipson & Smyth, 2010)."""
    return float((1 + np.sum(perm >= observed)) / (1 + len(perm))) if len(perm) else float("nan")


# ------------------------------------------------------------------------------------------------- over seeds
def over_seeds(rows: pd.DataFrame, by: str | Sequence[str], value: str, level: float = 0.95) -> pd.DataFrame:
    """Seed summary of one statistic: one row per ``by`` key (e.g. ``"model"`` or ``["model", "comparison"]``) of
    ``rows`` (one row per model and seed, with ``value`` and its bootstrap replicates in ``boot``).

    Columns: ``mean``, ``std`` (sample std over seeds), ``ci_lo``/``ci_hi`` (percentile interval of the seed mean:
    replicates averaged over seeds, which share resample indices), ``p_perm`` when ``rows`` has permutation
    replicates ``perm`` (the test of the seed mean: permuted statistics averaged over seeds, which share
    relabellings), ``seeds``, and for :func:`compare` ``boot`` (replicates of the seed mean) and ``values``
    ({seed: value}, keyed by the ``seed`` column when there is one).
    """
    by = [by] if isinstance(by, str) else list(by)
    missing = sorted({value, "boot", *by} - set(rows.columns))
    if missing:
        raise RepresentationError(f"rows lack column(s) {missing}; pass one row per model and seed with "
                                  f"{value!r} and its replicates 'boot'")
    out = []
    for key, part in rows.groupby(by, sort=False):
        values = part[value].to_numpy(np.float64)
        boot = _mean_replicates(part["boot"])
        lo, hi = _percentile(boot, level)
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row.update(mean=values.mean(), std=values.std(ddof=1) if len(values) > 1 else float("nan"), ci_lo=lo,
                   ci_hi=hi)
        if "perm" in part:
            row["p_perm"] = _p_value(values.mean(), _mean_replicates(part["perm"]))
        seeds = part["seed"] if "seed" in part else range(len(values))
        out.append({**row, "seeds": len(values), "boot": boot, "values": dict(zip(seeds, values.tolist()))})
    return pd.DataFrame(out)


def _mean_replicates(column: pd.Series) -> np.ndarray:
    lengths = {len(r) for r in column}
    if len(lengths) != 1:
        raise RepresentationError(f"replicate counts differ between seeds ({sorted(lengths)}); use the same n_boot, "
                                  "n_perm and seed for every model")
    return np.mean(np.stack(list(column)), axis=0)


_SUMMARY = ("mean", "std", "ci_lo", "ci_hi", "p_perm", "seeds", "boot", "values")


def compare(summary: pd.DataFrame, baseline: str, key: str = "model", level: float = 0.95) -> pd.DataFrame:
    """Every ``key`` value of :func:`over_seeds` output against ``baseline``, matched on the other identifying
    columns: ``diff`` (difference of seed means) with

    * ``ci_lo``/``ci_hi``: paired percentile interval over test resamples (difference of the seed-mean replicates,
      which share resamples), and ``ci_contains_0``; it holds the trained models fixed;
    * ``seed_ci_lo``/``seed_ci_hi`` and ``p_seeds``: the paired t-test over the seeds both have
      (:func:`fairbook.stats.paired_ttest`), which covers training variation instead; NaN with fewer than two.
    """
    from fairbook.stats import paired_ttest

    ids = [c for c in summary.columns if c not in (*_SUMMARY, key)]
    if baseline not in set(summary[key]):
        raise RepresentationError(f"baseline {baseline!r} is not among {sorted(set(summary[key]))}")
    base = {tuple(r[c] for c in ids): r for r in summary[summary[key] == baseline].to_dict("records")}
    out = []
    for r in summary[summary[key] != baseline].to_dict("records"):
        b = base[tuple(r[c] for c in ids)]
        lo, hi = _percentile(r["boot"] - b["boot"], level)
        seeds = sorted(set(r["values"]) & set(b["values"]))
        test = (paired_ttest([r["values"][s] for s in seeds], [b["values"][s] for s in seeds], level)
                if len(seeds) > 1 else {"ci_low": np.nan, "ci_high": np.nan, "p": np.nan})
        out.append({key: r[key], **{c: r[c] for c in ids}, "baseline": baseline, "diff": r["mean"] - b["mean"],
                    "ci_lo": lo, "ci_hi": hi, "ci_contains_0": bool(lo <= 0 <= hi), "seed_ci_lo": test["ci_low"],
                    "seed_ci_hi": test["ci_high"], "p_seeds": test["p"]})
    return pd.DataFrame(out)


def format_summary(summary: pd.DataFrame, decimals: int = 3, scale: float = 1.0) -> pd.DataFrame:
    """:func:`over_seeds` output as a table: identifying columns as the index, ``mean ± std`` and the interval
    of the seed mean as text (values times ``scale``), ``p_perm`` and ``seeds`` as they are."""
    ids = [c for c in summary.columns if c not in _SUMMARY]

    table = pd.DataFrame({
        f"mean{NBSP}±{NBSP}std": [estimate(scale * m, scale * s, decimals=decimals) for m, s in zip(summary["mean"],
                                                                                       summary["std"])],
        "CI of seed mean": [interval(scale * lo, scale * hi, decimals) for lo, hi in zip(summary["ci_lo"],
                                                                                        summary["ci_hi"])],
    }, index=pd.MultiIndex.from_frame(summary[ids]) if len(ids) > 1 else pd.Index(summary[ids[0]]))
    if "p_perm" in summary:
        table["p (permutation)"] = summary["p_perm"].round(4).to_numpy()
    table["seeds"] = summary["seeds"].to_numpy()
    return table
