"""Segmentation fairness metrics: per-case Dice (DSC) and IoU, their group means, and the gaps FairMedFM reports
(Jin et al., NeurIPS 2024 D&B, Table 2, segmentation rows) with bootstrap intervals over cases.

For groups ``g`` with mean Dice ``DSC_g`` and the Dice over all cases ``DSC`` (the mean of the per-case Dice):

* ``dsc_delta`` = ``max_g DSC_g - min_g DSC_g``;
* ``dsc_std`` = population standard deviation of the ``DSC_g`` (ddof 0; half the gap for two groups);
* ``dsc_skew`` = ``max_g (1 - DSC_g) / min_g (1 - DSC_g)``, the ratio of the worst group's error to the best's;
* ``dsc_es`` = ``DSC / (1 + dsc_std)``, FairMedFM's equity-scaled Dice;
* ``dsc_es_fairseg`` = ``DSC / (1 + sample std of the DSC_g)`` (ddof 1), the form of Harvard-FairSeg's code
  (Tian et al., ICLR 2024), a different number under its own name.

These reproduce Table 2's segmentation rows from their own columns, e.g. SAM: 83.55 / (1 + 0.865 / 100) = 82.83
and skew (1 - 0.8274) / (1 - 0.8447) = 1.11.

Empty masks: a case with an empty ground truth and an empty prediction scores 1 (nothing to find, nothing
claimed), and one with an empty ground truth and a non-empty prediction scores 0 (every predicted pixel is a false
positive). FairSeg's evaluation code scores the second case as Dice 1, which rewards segmenting a structure that is
not there; fairbook does not.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike

from fairbook.metrics import bootstrap_indices, equity_scaled_std

__all__ = ["SUMMARY", "SegmentationError", "dice", "iou", "segmentation_report", "summarise"]

#: The report's headline numbers, in Table 2's order.
SUMMARY = ("dsc", "dsc_delta", "dsc_std", "dsc_skew", "dsc_es", "dsc_es_fairseg")


class SegmentationError(ValueError):
    """Masks or groups that cannot be scored."""


def _pair(pred: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    if pred.shape != target.shape or pred.ndim not in (2, 3):
        raise SegmentationError(f"prediction and ground truth must be masks of one shape, (H, W) or (N, H, W); "
                                f"got {pred.shape} and {target.shape}: resize the prediction to the mask first")
    return pred, target


def dice(pred: ArrayLike, target: ArrayLike) -> np.ndarray:
    """Per-case Dice ``2 |P & G| / (|P| + |G|)`` of binary masks, 1 where both are empty (module docstring)."""
    pred, target = _pair(pred, target)
    axes = (-2, -1)
    overlap, size = (pred & target).sum(axes), pred.sum(axes) + target.sum(axes)
    return np.where(size == 0, 1.0, 2.0 * overlap / np.maximum(size, 1))


def iou(pred: ArrayLike, target: ArrayLike) -> np.ndarray:
    """Per-case intersection over union ``|P & G| / |P | G|``, 1 where both are empty."""
    pred, target = _pair(pred, target)
    axes = (-2, -1)
    overlap, union = (pred & target).sum(axes), (pred | target).sum(axes)
    return np.where(union == 0, 1.0, overlap / np.maximum(union, 1))


def summarise(overall: ArrayLike, group_values: ArrayLike) -> dict[str, np.ndarray]:
    """The :data:`SUMMARY` numbers from the Dice over all cases ``overall`` (shape ``(...)``) and the group means
    ``group_values`` (``(..., G)``, G >= 2): for one model or for B bootstrap resamples at once."""
    m, g = np.asarray(overall, float), np.asarray(group_values, float)
    if g.shape[-1] < 2:
        raise SegmentationError("group gaps need at least two groups with cases")
    error = 1.0 - g
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = error.max(axis=-1) / error.min(axis=-1)
    return {"dsc": m, "dsc_delta": g.max(axis=-1) - g.min(axis=-1), "dsc_std": g.std(axis=-1),
            "dsc_skew": skew, "dsc_es": equity_scaled_std(m, g), "dsc_es_fairseg": m / (1 + g.std(axis=-1, ddof=1))}


def segmentation_report(scores: Mapping[str, ArrayLike], groups: ArrayLike, n_boot: int = 1000,
                        level: float = 0.95, seed: int = 0, keep_boot: bool = False) -> dict:
    """Per-group means of per-case ``scores`` (``{"dsc": ..., "iou": ...}``, ``dsc`` required) and the
    :data:`SUMMARY` numbers of the Dice, each with a percentile bootstrap interval over cases (resampled within
    each group, so every resample keeps the group sizes; ``n_boot=0`` gives no intervals).

    Returns ``{"n", "groups": {group: {"n", <score>...}}, <summary>..., "ci": {name: [lo, hi]}}``; the group
    intervals are under ``ci["<score>_<group>"]``. ``keep_boot=True`` adds ``"boot"``: the resampled values of each
    summary number and ``"group_dsc"`` (n_boot x groups, groups sorted), the same resamples for every model scored
    on the same cases with the same ``seed`` (what :func:`fairbook.tables.evaluate_segmentation` averages over
    seeds).
    """
    values = {k: np.asarray(v, float).ravel() for k, v in scores.items()}
    if "dsc" not in values:
        raise SegmentationError("segmentation_report needs the per-case Dice under 'dsc'")
    groups = np.asarray(groups, dtype=object).astype(str)
    if any(len(v) != len(groups) for v in values.values()) or not len(groups):
        raise SegmentationError(f"every score needs one value per case ({len(groups)} group labels); got "
                                f"{ {k: len(v) for k, v in values.items()} }")
    names = sorted({str(g) for g in groups})
    members = {g: np.flatnonzero(groups == g) for g in names}

    def group_means(v: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        take = (lambda m: v[m]) if idx is None else (lambda m: v[idx[:, m]])
        return np.stack([take(members[g]).mean(axis=-1) for g in names], axis=-1)

    report = {"n": len(groups), "groups": {g: {"n": len(members[g]), **{k: float(v[members[g]].mean())
                                                                         for k, v in values.items()}}
                                           for g in names}}
    point = summarise(values["dsc"].mean(), group_means(values["dsc"]))
    report.update({k: float(v) for k, v in point.items()})
    report["ci"] = {}
    if n_boot:
        idx = bootstrap_indices(groups, n_boot, seed)
        boot = summarise(values["dsc"][idx].mean(axis=1), group_means(values["dsc"], idx))
        tail = 50 * (1 - level)
        for name, reps in boot.items():
            report["ci"][name] = np.nanpercentile(reps, [tail, 100 - tail]).tolist()
        for k, v in values.items():
            for g, reps in zip(names, group_means(v, idx).T):
                report["ci"][f"{k}_{g}"] = np.percentile(reps, [tail, 100 - tail]).tolist()
        if keep_boot:
            report["boot"] = {**boot, "group_dsc": group_means(values["dsc"], idx)}
    return report
