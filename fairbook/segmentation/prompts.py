"""Prompts for a promptable segmentation model (SAM), made from the ground-truth mask as FairMedFM defines them
(Jin et al., NeurIPS 2024 D&B, App. D.2): the centre point, one random point inside, five random points, and the
bounding box. Points and boxes are in SAM's pixel coordinates, ``(x, y)`` = (column, row) of the mask.

The "centre" of a mask is read as the interior pixel farthest from the background (the maximum of the Euclidean
distance transform), not the centroid: the centroid of a ring such as FairSeg's neuroretinal rim lies in the cup,
outside the mask, and a point prompt must land on the target. For a convex mask the two nearly coincide.
Random points are drawn without replacement from the mask's pixels with a seeded generator, so a prompt is the
same at every run of the same seed.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.ndimage import distance_transform_edt

__all__ = ["PROMPTS", "PromptError", "bounding_box", "centre_point", "make_prompt", "random_points"]

#: Prompt types, in FairMedFM's order: name -> what it gives SAM.
PROMPTS = {"centre": "one point, the mask's innermost pixel", "1 point": "one random point inside the mask",
           "5 points": "five random points inside the mask", "box": "the mask's bounding box"}


class PromptError(ValueError):
    """A mask a prompt cannot be made from."""


def _mask(mask: ArrayLike) -> np.ndarray:
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise PromptError(f"a prompt is made from one 2-D mask, got shape {mask.shape}")
    if not mask.any():
        raise PromptError("the mask is empty, so no prompt can point at it: leave this case out of prompted "
                          "segmentation or score it as a miss")
    return mask


def centre_point(mask: ArrayLike) -> np.ndarray:
    """``[[x, y]]``: the mask pixel farthest from the background (first in row-major order on ties)."""
    depth = distance_transform_edt(np.pad(_mask(mask), 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return np.array([[col, row]], dtype=np.int64)


def random_points(mask: ArrayLike, n: int = 1, seed: int | np.random.Generator = 0) -> np.ndarray:
    """``n x 2`` points ``(x, y)`` drawn uniformly without replacement from the mask's pixels (with replacement
    when the mask has fewer than ``n`` pixels, e.g. a small cup at a low input size)."""
    rows, cols = np.nonzero(_mask(mask))
    pick = np.random.default_rng(seed).choice(len(rows), size=n, replace=n > len(rows))
    return np.stack([cols[pick], rows[pick]], axis=1).astype(np.int64)


def bounding_box(mask: ArrayLike) -> np.ndarray:
    """``[x0, y0, x1, y1]``: the tight box around the mask, inclusive pixel coordinates."""
    rows, cols = np.nonzero(_mask(mask))
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.int64)


def make_prompt(kind: str, mask: ArrayLike, seed: int | np.random.Generator = 0) -> dict:
    """A prompt of type ``kind`` (a key of :data:`PROMPTS`) for one mask: ``{"points": n x 2, "labels": n}``
    (every point a foreground click, label 1) or ``{"box": [x0, y0, x1, y1]}``."""
    if kind not in PROMPTS:
        raise PromptError(f"unknown prompt {kind!r}: choose one of {', '.join(PROMPTS)}")
    if kind == "box":
        return {"box": bounding_box(mask)}
    points = centre_point(mask) if kind == "centre" else random_points(mask, 1 if kind == "1 point" else 5, seed)
    return {"points": points, "labels": np.ones(len(points), dtype=np.int64)}
