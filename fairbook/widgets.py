"""Interactive views for JupyterLab (ipywidgets).

Outside a live JupyterLab session (``fairbook run``, papermill used directly, the book) each view draws its first
state as a plain figure instead of a widget: the static book cannot run widgets, and executing widget cells in a
headless client is fragile (nbclient can wait forever on widget messages, jupyter/nbclient#312). A live session is
recognised by ``JPY_SESSION_NAME``, which Jupyter Server sets for the kernels it starts for a notebook.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from fairbook.plots import say
from fairbook.runs import RUN_DIR_ENV


def interactive() -> bool:
    """True in a live JupyterLab notebook; False under ``fairbook run`` or any headless execution (papermill)."""
    return not os.environ.get(RUN_DIR_ENV) and bool(os.environ.get("JPY_SESSION_NAME"))


def filter_samples(meta: pd.DataFrame, attribute: str, group: str = "all", label: str = "all") -> pd.DataFrame:
    """Rows of ``meta`` in ``group`` of ``attribute`` (or all) with glaucoma ``label`` ("all", "0" or "1")."""
    keep = np.ones(len(meta), bool)
    if group != "all":
        keep &= (meta[f"{attribute}_name"] == group).to_numpy()
    if label != "all":
        keep &= (meta["glaucoma"] == int(label)).to_numpy()
    return meta[keep]


def _show_sample(row: pd.Series, attributes) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.5, 3.5))
    with np.load(row["path"]) as z:
        ax.imshow(z["slo_fundus"], cmap="gray")
    ax.axis("off")
    plt.show()
    say(f"{row['filename']} · glaucoma={row['glaucoma']} · "
        + " · ".join(f"{a}={row[f'{a}_name']}" for a in attributes))
    say(row["note"])


def sample_browser(meta: pd.DataFrame, attributes=("race", "gender", "ethnicity", "language")):
    """Browse samples filtered by attribute group and glaucoma label: image, codes and note."""
    if not interactive():
        return _show_sample(meta.iloc[0], attributes)
    import ipywidgets as w

    attr = w.Dropdown(options=list(attributes), description="attribute")
    group = w.Dropdown(description="group")
    label = w.ToggleButtons(options=["all", "0", "1"], description="glaucoma")
    index = w.IntSlider(description="sample", min=0)
    out = w.Output()

    def groups(*_):
        group.options = ["all", *sorted(meta[f"{attr.value}_name"].dropna().unique())]

    def show(*_):
        rows = filter_samples(meta, attr.value, group.value or "all", label.value)
        index.max = max(len(rows) - 1, 0)
        out.clear_output(wait=True)
        with out:
            if rows.empty:
                print("no sample matches this filter")
            else:
                _show_sample(rows.iloc[index.value], attributes)

    groups()
    for widget in (attr, group, label, index):
        widget.observe(show, names="value")
    attr.observe(groups, names="value")
    show()
    return w.VBox([w.HBox([attr, group]), label, index, out])


def _show_rates(rows: pd.DataFrame) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.8))
    rows[["selection_rate", "tpr", "fpr"]].plot.bar(ax=ax, rot=0)
    ax.set(ylim=(0, 1), ylabel="rate", xlabel="group")
    plt.show()
    print(f"threshold {rows['threshold'].iloc[0]:.2f}: DPD = {rows['dpd'].iloc[0]:.3f}, "
          f"EOD (worst case) = {rows['eod'].iloc[0]:.3f}")


def threshold_explorer(y_true, y_score, groups, thresholds=None):
    """A threshold slider showing each group's selection rate, TPR and FPR, and the resulting DPD and EOD.

    The curve is computed once (:func:`fairbook.metrics.threshold_curve`); the slider only redraws.
    """
    from fairbook.metrics import threshold_curve

    thresholds = np.round(np.linspace(0.05, 0.95, 19) if thresholds is None else np.asarray(thresholds), 3)
    curve = threshold_curve(y_true, y_score, groups, thresholds)
    middle = thresholds[len(thresholds) // 2]
    if not interactive():
        return _show_rates(curve[curve["threshold"] == middle].set_index("group"))
    import ipywidgets as w

    slider = w.SelectionSlider(options=list(thresholds), value=middle, description="threshold")
    out = w.Output()

    def show(*_):
        out.clear_output(wait=True)
        with out:
            _show_rates(curve[curve["threshold"] == slider.value].set_index("group"))

    slider.observe(show, names="value")
    show()
    return w.VBox([slider, out])
