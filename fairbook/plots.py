"""Figures: one house style for every chapter, and saving figures into the run folder.

Captions belong in the notebook's cell metadata (``mystnb: {figure: {caption, name}}``), not in ``ax.set_title``.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

from fairbook.runs import output_dir

#: One colour per group, stable across chapters (colour-blind safe: seaborn's "colorblind").
PALETTE = "colorblind"


def set_style() -> None:
    """The handbook's figure style: white grid, small fonts, lowercase labels by convention."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE, font_scale=0.9)
    matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight",
                                "axes.spines.top": False, "axes.spines.right": False})


def savefig(fig, name: str) -> Path:
    """Save ``fig`` as ``figures/<name>.png`` in the run folder and return the path."""
    path = output_dir() / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path
