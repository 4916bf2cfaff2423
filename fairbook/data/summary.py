"""Descriptive tables for a FairVLMed folder: group sizes, intersections, prevalence with CIs, image and note
statistics.

All functions take the metadata frame of :func:`fairbook.data.fairvlmed.load_metadata` (one row per sample, with
``glaucoma``, the attribute codes and their ``<attribute>_name`` columns).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from fairbook.data.attributes import check_attribute


def wilson_interval(successes, n, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a binomial proportion (Wilson 1927); well behaved for small groups and p near 0 or 1.

    ``center = (p + z²/2n) / (1 + z²/n)``, ``half = z sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)``. ``n = 0`` gives NaN.
    """
    k, n = np.asarray(successes, float), np.asarray(n, float)
    z = stats.norm.ppf(0.5 + level / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z**2 / n
        center = (p + z**2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return center - half, center + half


def group_table(meta: pd.DataFrame, attribute: str, level: float = 0.95) -> pd.DataFrame:
    """One row per group of ``attribute``: count, share of samples, glaucoma prevalence and its Wilson CI.

    Groups with no sample (a code the attribute defines but the data lacks) are listed with count 0, never dropped.
    """
    from fairbook.data.attributes import ATTRIBUTES

    check_attribute(attribute)
    names = list(dict.fromkeys(list(ATTRIBUTES[attribute].values())))
    g = meta.groupby(f"{attribute}_name", observed=False)["glaucoma"].agg(["size", "sum"])
    g = g.reindex(names + [n for n in g.index if n not in names], fill_value=0)
    g = g[(g["size"] > 0) | g.index.isin([n for n in names if n != "Unknown"])]
    lo, hi = wilson_interval(g["sum"], g["size"], level)
    return pd.DataFrame({
        "n": g["size"].astype(int),
        "share": g["size"] / max(len(meta), 1),
        "prevalence": g["sum"] / g["size"].where(g["size"] > 0),
        "ci_low": lo,
        "ci_high": hi,
    }).rename_axis(attribute)


def intersection_table(meta: pd.DataFrame, row: str, col: str, values: str = "n") -> pd.DataFrame:
    """Counts (``values="n"``) or glaucoma prevalence (``values="prevalence"``) of ``row`` x ``col`` groups."""
    check_attribute(row), check_attribute(col)
    grouped = meta.groupby([f"{row}_name", f"{col}_name"], observed=False)["glaucoma"]
    table = grouped.size() if values == "n" else grouped.mean()
    return table.unstack(fill_value=0 if values == "n" else np.nan).rename_axis(index=row, columns=col)


def split_table(metas: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Samples and glaucoma prevalence per split, from ``{split: metadata}``."""
    return pd.DataFrame({s: {"n": len(m), "glaucoma prevalence": m["glaucoma"].mean()} for s, m in metas.items()}).T


def vertical_cdr(disc_mask: np.ndarray, cup_mask: np.ndarray) -> float:
    """Vertical cup-to-disc ratio: cup height / disc height, the clinical glaucoma measure (NaN without a disc)."""
    disc_rows, cup_rows = np.flatnonzero(disc_mask.any(1)), np.flatnonzero(cup_mask.any(1))
    if disc_rows.size == 0:
        return float("nan")
    cup_h = np.ptp(cup_rows) + 1 if cup_rows.size else 0
    return cup_h / (np.ptp(disc_rows) + 1)


def image_statistics(meta: pd.DataFrame, n: int | None = 1000, seed: int = 0) -> pd.DataFrame:
    """Per-image brightness, contrast and (where masks exist) vertical CDR for ``n`` random samples.

    Brightness is the mean grey level and contrast its standard deviation; both reveal acquisition shifts between
    groups. The vertical CDR needs ``disc_mask``/``cup_mask`` (SynthFairVLMed stores them; the real data does not).
    """
    sample = meta if n is None or n >= len(meta) else meta.sample(n, random_state=seed)
    rows = []
    for path in sample["path"]:
        with np.load(path) as z:
            img = z["slo_fundus"].astype(np.float32)
            cdr = vertical_cdr(z["disc_mask"], z["cup_mask"]) if "disc_mask" in z.files else np.nan
        rows.append((float(img.mean()), float(img.std()), cdr))
    out = pd.DataFrame(rows, columns=["brightness", "contrast", "vertical_cdr"], index=sample.index)
    return sample.drop(columns=["path"]).join(out)


def note_lengths(meta: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Word and character counts of the notes, described overall or per group of ``by``."""
    lengths = pd.DataFrame({"words": meta["note"].str.split().str.len(), "chars": meta["note"].str.len()})
    if by is None:
        return lengths.describe().T
    return lengths.groupby(meta[f"{check_attribute(by)}_name"]).agg(["mean", "median", "max"])
