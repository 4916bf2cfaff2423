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


def savefig(fig, name: str) -> None:
    """Save ``fig`` as ``figures/<name>.png`` in the run folder (:func:`fairbook.runs.output_dir`).

    Returns nothing, so that a cell ending with it shows only the figure.
    """
    path = output_dir() / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)


def _grid(n: int, ncols: int = 4, size: float = 2.6):
    import matplotlib.pyplot as plt

    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * 0.9 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def group_sizes(meta, attributes):
    """Bar chart of the number of samples per group, one panel per attribute."""
    import seaborn as sns

    fig, axes = _grid(len(attributes))
    for ax, attr in zip(axes, attributes):
        counts = meta[f"{attr}_name"].value_counts()
        sns.barplot(x=counts.index, y=counts.values, ax=ax, hue=counts.index, legend=False)
        ax.set(xlabel=attr, ylabel="samples")
        ax.tick_params(axis="x", rotation=30)
    return fig


def prevalence_by_group(tables: dict):
    """Glaucoma prevalence per group with its confidence interval, one panel per attribute.

    ``tables`` maps attribute -> :func:`fairbook.data.summary.group_table`. The dashed line is the overall prevalence.
    """
    fig, axes = _grid(len(tables), ncols=2, size=3.6)
    for ax, (attr, t) in zip(axes, tables.items()):
        t = t[t["n"] > 0]
        x = range(len(t))
        ax.errorbar(x, t["prevalence"], yerr=[t["prevalence"] - t["ci_low"], t["ci_high"] - t["prevalence"]],
                    fmt="o", capsize=4)
        overall = (t["prevalence"] * t["n"]).sum() / t["n"].sum()
        ax.axhline(overall, ls="--", color="grey", lw=1)
        ax.set_xticks(list(x), t.index, rotation=30)
        ax.set(xlabel=attr, ylabel="glaucoma prevalence", ylim=(0, 1), xlim=(-0.5, len(t) - 0.5))
    return fig


def heatmap(table, fmt: str = "d", cmap: str = "Blues"):
    """An annotated heatmap of a small two-way table (e.g. race x gender counts)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(1.4 * table.shape[1] + 2, 0.6 * table.shape[0] + 1.5))
    sns.heatmap(table, annot=True, fmt=fmt, cmap=cmap, cbar=False, ax=ax)
    return fig


def by_group(df, y: str, attribute: str, hue: str | None = "glaucoma", kind: str = "box"):
    """Distribution of ``y`` per group of ``attribute`` (split by ``hue``): box or violin plot."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6, 3.2))
    plot = sns.violinplot if kind == "violin" else sns.boxplot
    plot(data=df, x=f"{attribute}_name", y=y, hue=hue, ax=ax)
    ax.set(xlabel=attribute, ylabel=y.replace("_", " "))
    return fig


def example_images(meta, attribute: str, per_group: int = 2, seed: int = 0, note_chars: int = 60):
    """Example images for each group of ``attribute``, titled with the label and the start of the note."""
    import textwrap

    import numpy as np

    import pandas as pd

    picks = pd.concat([g.sample(min(per_group, len(g)), random_state=seed)
                       for _, g in meta.groupby(f"{attribute}_name", observed=True)])
    fig, axes = _grid(len(picks), ncols=per_group * 2, size=2.4)
    for ax, (_, row) in zip(axes, picks.iterrows()):
        with np.load(row["path"]) as z:
            ax.imshow(z["slo_fundus"], cmap="gray")
        label = "glaucoma" if row["glaucoma"] else "no glaucoma"
        note = textwrap.shorten(row["note"], note_chars, placeholder="…")
        ax.set_title(f"{row[f'{attribute}_name']} · {label}\n" + "\n".join(textwrap.wrap(note, 30)), fontsize=7)
        ax.axis("off")
    return fig


def group_metric(groups, metric: str = "auc", overall: float | None = None):
    """Per-group ``metric`` with its bootstrap CI, from :func:`fairbook.metrics.group_table` rows of one attribute.

    Group sizes are printed under the labels: the width of an interval is mostly a matter of group size.
    """
    import matplotlib.pyplot as plt

    g = groups[groups["count"] > 0]
    fig, ax = plt.subplots(figsize=(1.1 * len(g) + 2.5, 3))
    x = range(len(g))
    err = None
    if f"{metric}_lo" in g:
        err = [g[metric] - g[f"{metric}_lo"], g[f"{metric}_hi"] - g[metric]]
    ax.errorbar(x, g[metric], yerr=err, fmt="o", capsize=4)
    if overall is not None:
        ax.axhline(overall, ls="--", color="grey", lw=1)
    ax.set_xticks(list(x), [f"{name}\nn={n}" for name, n in zip(g["group"], g["count"])])
    ax.set(ylabel=metric.replace("_", " "), xlabel=str(g["attribute"].iloc[0]))
    return fig


def threshold_curve(curve):
    """Per-group selection rate and TPR against the threshold (left), and the resulting DPD and EOD (right)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    long = curve.melt(id_vars=["threshold", "group"], value_vars=["selection_rate", "tpr"], var_name="rate")
    sns.lineplot(data=long, x="threshold", y="value", hue="group", style="rate", ax=left)
    left.set(ylabel="rate")
    gaps = curve.drop_duplicates("threshold").melt(id_vars="threshold", value_vars=["dpd", "eod"], var_name="gap")
    sns.lineplot(data=gaps, x="threshold", y="value", hue="gap", ax=right)
    right.set(ylabel="gap between groups")
    return fig


def training_curve(history, best_epoch: int | None = None):
    """Training loss (left) and validation AUC (right) per epoch, from the ``history`` of
    :func:`fairbook.train.fit_clip` (a list of ``{"epoch", "train_loss", "val_auc", ...}``).

    ``best_epoch`` (the epoch chosen on validation) is marked by a dashed vertical line on both panels.
    """
    import matplotlib.pyplot as plt
    import pandas as pd

    h = pd.DataFrame(list(history))
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    left.plot(h["epoch"], h["train_loss"], marker="o")
    left.set(xlabel="epoch", ylabel="training loss")
    right.plot(h["epoch"], h["val_auc"], marker="o")
    right.set(xlabel="epoch", ylabel="validation auc")
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
        if best_epoch is not None:
            ax.axvline(best_epoch, ls="--", color="grey", lw=1)
    return fig


def differences(frame, value: str, lo: str, hi: str, label: str, by: str | None = None,
                xlabel: str = "difference"):
    """Forest plot: one row per ``label`` with its point ``value`` and interval ``[lo, hi]``, a vertical line at 0,
    and one colour per ``by`` value. The interval is drawn as it is, even when a percentile interval does not
    contain its point estimate (possible for gaps such as DPD, whose bootstrap is biased)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = frame.reset_index(drop=True)
    keys = list(dict.fromkeys(rows[by])) if by else [None]
    colours = dict(zip(keys, sns.color_palette(PALETTE, len(keys))))
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(rows) + 1.2))
    for i, row in rows.iterrows():
        y = len(rows) - 1 - i
        colour = colours[row[by] if by else None]
        ax.hlines(y, row[lo], row[hi], color=colour, lw=1.5)
        ax.plot(row[value], y, "o", color=colour)
    ax.axvline(0, color="grey", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [f"{row[by]}: {row[label]}" if by else row[label]
                                     for row in rows.iloc[::-1].to_dict("records")])
    ax.set(xlabel=xlabel)
    return fig


def routing(frame, value: str = "load", ylabel: str | None = None):
    """Fair-MoE routing diagnostics per group (:func:`fairbook.moe.routing_frame`): one panel per router, experts
    on the x axis, one bar per group (the pooled group ``all`` left out)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = frame[frame["group"] != "all"]
    names = list(dict.fromkeys(data["router"]))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        sns.barplot(data=data[data["router"] == name], x="expert", y=value, hue="group", ax=ax,
                    palette=PALETTE, legend=ax is axes[0][-1])
        ax.set(title=name, ylabel=(ylabel or value.replace("_", " ")) if ax is axes[0][0] else "")
    if names:
        axes[0][-1].legend(title="group", fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    return fig
