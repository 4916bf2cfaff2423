"""What a chapter shows besides tables: figures in one house style, saved into the run folder, and printed
summaries wrapped to the book's code column (:func:`say`).

Captions belong in the notebook's cell metadata (``mystnb: {figure: {caption, name}}``), not in ``ax.set_title``.
"""
from __future__ import annotations

import textwrap

import matplotlib

from fairbook.runs import output_dir

#: One colour per group, stable across chapters (colour-blind safe: seaborn's "colorblind").
PALETTE = "colorblind"
#: Characters of monospace text that fit one line of the book's code column (608 px in a 1200 px window, measured
#: in Chromium): the longest line a chapter's code cells may have (tests/test_notebooks.py) and the width at which
#: :func:`say` wraps printed summaries, so that nothing on a page scrolls sideways.
CODE_COLUMN = 68


def say(*parts, sep: str = " ", width: int = CODE_COLUMN) -> None:
    """``print(*parts, sep=sep)``, wrapped at ``width`` characters (the book's code column), continuation lines
    indented by two spaces; line breaks in the text are kept. Chapters print their summaries with it."""
    text = sep.join(map(str, parts))
    print("\n".join(textwrap.fill(line, width, subsequent_indent="  ", break_on_hyphens=False) if line.strip()
                    else line for line in text.split("\n")))


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
    :func:`fairbook.train.fit` (a list of ``{"epoch", "train_loss", "val_auc", ...}``).

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


def validation_curve(table, values, xlabel: str, log: bool = True):
    """Validation AUC (left) and ES-AUC (right) of each candidate setting, from
    :func:`fairbook.protocol.choose_on_validation`'s table (rows in the order of ``values``); the chosen setting
    is marked by a dashed line, the settings outside the AUC slack by open markers."""
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.asarray(values, float)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, column, ylabel in zip(axes, ("val_auc", "val_es_auc"), ("validation AUC", "validation ES-AUC")):
        ax.plot(values, table[column], color="C0", zorder=1)
        eligible = table["eligible"].to_numpy(bool)
        ax.scatter(values[eligible], table[column][eligible], color="C0", zorder=2, label="within the AUC slack")
        if (~eligible).any():
            ax.scatter(values[~eligible], table[column][~eligible], facecolors="white", edgecolors="C0", zorder=2,
                       label="outside the AUC slack")
        ax.axvline(values[table["chosen"].to_numpy(bool)][0], ls="--", color="grey", lw=1, label="chosen")
        ax.set(xlabel=xlabel, ylabel=ylabel, xscale="log" if log else "linear")
    axes[1].legend(fontsize="small")
    fig.tight_layout()
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


def tradeoff(frame, x: str, y: str, label: str, by: str | None = None, diagonal: bool = False,
             xlabel: str | None = None, ylabel: str | None = None):
    """Scatter of one point per row of ``frame``: ``x`` against ``y`` with the intervals ``<x>_lo``/``<x>_hi``
    and ``<y>_lo``/``<y>_hi`` as error bars when those columns exist, labelled by ``label``, one panel per ``by``
    value. ``diagonal`` draws y = x (e.g. one group's AUC against the other's: points off the line are gaps).
    A percentile interval of a gap can miss its point (its bootstrap is biased); its bar then stops at the point."""
    import seaborn as sns

    panels = list(dict.fromkeys(frame[by])) if by else [None]
    fig, axes = _grid(len(panels), ncols=3, size=3.2)
    labels = list(dict.fromkeys(frame[label]))
    colours = dict(zip(labels, sns.color_palette(PALETTE, len(labels))))
    for ax, panel in zip(axes, panels):
        rows = frame if by is None else frame[frame[by] == panel]
        for row in rows.to_dict("records"):
            err = {f"{axis}err": [[max(0, row[v] - row[f"{v}_lo"])], [max(0, row[f"{v}_hi"] - row[v])]]
                   for axis, v in (("x", x), ("y", y)) if f"{v}_lo" in row}
            ax.errorbar(row[x], row[y], fmt="o", color=colours[row[label]], ms=5, lw=1, label=row[label], **err)
        if diagonal:
            lo, hi = min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])
            ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
        ax.set(xlabel=xlabel or x, ylabel=ylabel or y, title=panel or "")
    handles = {h.get_label(): h for ax in axes[:len(panels)] for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(labels), 5), frameon=False,
               bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    return fig


def traces(frame, x: str, y: str, hue: str, by: str | None = None, ylabel: str | None = None,
           reference: float | None = None):
    """Lines of ``y`` against ``x`` (e.g. a modulation factor over training steps), one colour per ``hue`` value
    and one panel per ``by`` value: the mean over the other rows (seeds) with a band of one standard deviation.
    ``reference`` draws a dashed horizontal line (e.g. 1, no modulation)."""
    import seaborn as sns

    panels = list(dict.fromkeys(frame[by])) if by else [None]
    fig, axes = _grid(len(panels), ncols=3, size=3.2)
    for ax, panel in zip(axes, panels):
        rows = frame if by is None else frame[frame[by] == panel]
        sns.lineplot(rows, x=x, y=y, hue=hue, errorbar="sd", ax=ax, palette=PALETTE, lw=1)
        if reference is not None:
            ax.axhline(reference, color="grey", lw=1, ls="--")
        ax.set(ylabel=ylabel or y, title=panel or "")
    fig.tight_layout()
    return fig


def routing(frame, value: str = "load", ylabel: str | None = None):
    """Fair-MoE routing diagnostics per group (:func:`fairbook.methods.fair_moe.routing_frame`): one panel per router,
    experts
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


def case_gallery(picks, models, note_chars: int = 90):
    """Case gallery in the manner of Fair-MoE's Fig. 3(a): one row per group, one panel per case chosen by
    :func:`fairbook.cases.gallery_cases`. Above each image: group, label, agreement pattern and the start of the
    note; below it, for each of ``models``, the score (mean over seeds [lowest, highest seed]) and the number of
    seeds that got the case right."""
    import textwrap

    import matplotlib.pyplot as plt

    from fairbook.data.fairvlmed import load_image

    groups = list(dict.fromkeys(picks["group"]))
    ncols = int(picks["group"].value_counts().max()) if len(picks) else 1
    fig, axes = plt.subplots(max(len(groups), 1), ncols, figsize=(3.0 * ncols, 3.7 * max(len(groups), 1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax_row, group in zip(axes, groups):
        for ax, case in zip(ax_row, picks[picks["group"] == group].to_dict("records")):
            ax.set_visible(True)
            ax.imshow(load_image(case["path"]), cmap="gray")
            ax.set(xticks=[], yticks=[])
            note = textwrap.shorten(case["note"], note_chars, placeholder="…")
            label = "glaucoma" if case["label"] else "no glaucoma"
            title = [f"{group} · {label} · {case['pattern']}", *textwrap.wrap(note, 40)]
            ax.set_title("\n".join(title), fontsize=7, loc="left")
            ax.set_xlabel("\n".join(
                f"{m}: {case[f'{m} score']:.3f} [{case[f'{m} score min']:.3f}, {case[f'{m} score max']:.3f}] · "
                f"right {case[f'{m} right seeds']}/{case[f'{m} seeds']}" for m in models), fontsize=7, loc="left")
    return fig


def _display(image):
    """A preprocessed image tensor (3, H, W) or array (H, W) as a grey (H, W) array scaled to [0, 1]."""
    import numpy as np

    image = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=float)
    image = image.mean(0) if image.ndim == 3 else image
    return (image - image.min()) / max(float(image.max() - image.min()), 1e-12)


def segmentation_gallery(shown: dict, titles):
    """Segmented cases side by side (:meth:`fairbook.segmentation.training.Segmentation.masks` gives ``shown``):
    each image with the ground truth outlined in cyan and the model's mask in orange; ``titles[i]`` above case i
    (e.g. its group and Dice). Rows of at most six cases."""
    fig, axes = _grid(len(titles), ncols=6, size=1.6)
    for i, ax in enumerate(axes):
        if i >= len(titles):
            break
        ax.imshow(_display(shown["image"][i]), cmap="gray")
        for mask, colour in ((shown["target"][i], "cyan"), (shown["predicted"][i], "orange")):
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=colour, linewidths=0.9)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(titles[i], fontsize=7)
    return fig


def attention_grid(images, maps: dict, masks, labels):
    """Token maps over fundus images: one row per case (``labels[i]`` on the left), the image in the first column
    and one column per entry of ``maps`` ({model: (B, H, W) maps at the image size, e.g. upsampled with
    :func:`fairbook.explain.upsample_map`}); the optic disc outline (``masks``, (B, H, W) at the image size,
    :func:`fairbook.explain.transform_mask`) is drawn in every panel. Each map is scaled to its own maximum."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(images), 1 + len(maps), figsize=(1.7 * (1 + len(maps)), 1.7 * len(images)),
                             squeeze=False)
    for i, row in enumerate(axes):
        grey = _display(images[i])
        for j, ax in enumerate(row):
            ax.imshow(grey, cmap="gray")
            if j:
                heat = np.asarray(list(maps.values())[j - 1][i], dtype=float)
                ax.imshow(heat / max(heat.max(), 1e-12), cmap="inferno", alpha=0.55, vmin=0, vmax=1)
            ax.contour(masks[i], levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title("image" if j == 0 else list(maps)[j - 1], fontsize=8)
        row[0].set_ylabel(labels[i], fontsize=7)
    return fig


def routing_overlay(images, weights, dropped, labels, patch: int):
    """Fair-MoE's image patch routing over fundus images (:func:`fairbook.explain.patch_routing`): each patch is
    coloured by the expert that holds the largest kept gate weight for it, a patch that every expert dropped is
    left clear, and an x marks a patch with at least one assignment dropped by the capacity.
    ``weights``/``dropped``: (B, M, gh, gw); ``patch``: the patch size in pixels."""
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    n_experts = weights.shape[1]
    colours = sns.color_palette("tab10", n_experts)
    fig, axes = plt.subplots(1, len(images), figsize=(2.0 * len(images), 2.3), squeeze=False)
    for ax, image, w, d, label in zip(axes[0], images, weights, dropped, labels):
        ax.imshow(_display(image), cmap="gray")
        overlay = np.zeros((*w.shape[1:], 4))
        for (r, c), top in np.ndenumerate(np.where(w.max(0) > 0, w.argmax(0), -1)):
            if top >= 0:
                overlay[r, c] = (*colours[top], 0.45)
        ax.imshow(np.kron(overlay, np.ones((patch, patch, 1))))
        rows, cols = np.nonzero(d.any(0))
        ax.plot((cols + 0.5) * patch, (rows + 0.5) * patch, "x", color="white", ms=5)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel(label, fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[j]) for j in range(n_experts)]
    fig.legend(handles, [f"expert {j}" for j in range(n_experts)], fontsize="x-small", ncol=min(n_experts, 5),
               loc="lower center", bbox_to_anchor=(0.5, -0.12))
    return fig


def tsne_grid(points, colour_by=("group", "label")):
    """t-SNE maps of image features (:func:`fairbook.representation.tsne_points`): one row per model, one column
    per colouring (by group, by label), as in Fair-MoE's Fig. 3(b). t-SNE axes have no units, so no ticks; each
    column has its own colours and one legend."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    models = list(dict.fromkeys(points["model"]))
    fig, axes = plt.subplots(len(models), len(colour_by), figsize=(3.3 * len(colour_by), 2.9 * len(models)),
                             squeeze=False)
    offset = 0
    for j, hue in enumerate(colour_by):
        order = sorted(points[hue].unique())
        colours = dict(zip(order, sns.color_palette(PALETTE, offset + len(order))[offset:]))
        offset += len(order)
        for i, model in enumerate(models):
            ax = axes[i][j]
            sns.scatterplot(data=points[points["model"] == model], x="x", y="y", hue=hue, hue_order=order,
                            palette=colours, s=7, linewidth=0, alpha=0.8, ax=ax, legend=i == 0)
            ax.set(xticks=[], yticks=[], xlabel="t-sne 1" if i == len(models) - 1 else "",
                   ylabel=f"{model}\nt-sne 2" if j == 0 else "")
        axes[0][j].set_title(f"by {hue}")
        axes[0][j].legend(title=None, fontsize="x-small", markerscale=1.5, loc="best")
    return fig


def region_shares(table, reference=None):
    """Share of the map inside a region per group (:func:`fairbook.explain.share_table` rows with a ``method``
    column): one panel per method, groups on the y axis, one colour per model, intervals ``[lo, hi]``; the
    ``reference`` table's share per group (a flat map) is drawn as a grey bar."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    methods = list(dict.fromkeys(table["method"]))
    models = list(dict.fromkeys(table["model"]))
    groups = list(dict.fromkeys(table["group"]))
    colours = dict(zip(models, sns.color_palette(PALETTE, len(models))))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 0.6 * len(groups) + 1.4),
                             sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        if reference is not None:
            for y, group in enumerate(groups):
                level = reference.loc[reference["group"] == group, "share"].mean()
                ax.barh(y, level, height=0.8, color="lightgrey", zorder=0)
        for k, model in enumerate(models):
            rows = table[(table["method"] == method) & (table["model"] == model)].set_index("group")
            for y, group in enumerate(groups):
                if group in rows.index:
                    offset = y + 0.25 * (k - (len(models) - 1) / 2)
                    ax.hlines(offset, rows.at[group, "lo"], rows.at[group, "hi"], color=colours[model], lw=1.5)
                    ax.plot(rows.at[group, "share"], offset, "o", color=colours[model],
                            label=model if y == 0 else None)
        ax.set(title=method, xlabel="share inside the disc")
        ax.set_yticks(range(len(groups)), groups)
    axes[0][-1].legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    return fig
