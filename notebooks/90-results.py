# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python (fairbook)
#     language: python
#     name: fairbook
# ---

# %% [markdown]
# # Results: every method side by side
#
# This chapter trains nothing. It reads the predictions that the method chapters saved (`fb.results.save`), scores
# them all with one protocol, and ranks them on one leaderboard, then prints the comparison in the layout of
# Fair-MoE's Table 1. Every chapter that saved predictions in this configuration is read, so a new method appears
# as a new row without any change here. Re-running it after a method chapter has been re-run, or after a sweep,
# refreshes every number.
#
# The protocol, once more: each model's epoch was chosen on validation AUC and its decision threshold is chosen here
# on its own validation predictions (Youden's J). Test predictions are used for nothing but these tables.

# %%
import pandas as pd

import fairbook as fb

# %% tags=["parameters"]
runs_dir = "runs"  # where the chapters' run folders are
# which configuration of each chapter to read (default, smoke,
# paper-b16, ...)
config = "default"
# chapters whose saved predictions are compared ([]: every
# chapter with saved predictions)
chapters = []
# intersectional attributes evaluated beside the single ones
intersections = ["race&gender"]
# the method every other method is compared with, paired on seed
baseline = "CLIP"
n_boot = 1000  # bootstrap resamples of the test set
# this execution's run folder outside `fairbook run` (None:
# named from the parameter values; see the README)
run_dir = None

# %% [markdown]
# Where this execution's results go (its own run folder; the README explains the naming):

# %%
out = fb.runs.begin("90-results", globals())

# %% [markdown]
# ## What was run
#
# One row per trained model: its chapter, method, the attribute it trained on (`all` for none) and its seed. Every
# model must come from the same data, or the comparison means nothing.

# %%
chapters = chapters or sorted(
    p.parent.parent.name for p in
    fb.files.resolve(runs_dir).glob(f"*/{config}/predictions"))
folders = [fb.files.resolve(runs_dir) / chapter / config
           for chapter in chapters]
runs = fb.results.collect(*folders)
source = runs["data"].iloc[0]
fb.results.same_data(runs, source)
fb.plots.say(f"data: {source}; configuration: {config}")
(runs.groupby(["chapter", "method", "attribute"])["seed"]
 .apply(lambda s: ", ".join(map(str, sorted(s)))).to_frame("seeds"))

# %% [markdown]
# ## The leaderboard
#
# Per attribute, and for the race × gender cells, each metric as the seed mean with its 95% bootstrap interval
# over test resamples (percent); ↑ higher is better, ↓ lower. `mean rank` is a method's rank among the methods
# in each column (1 = best), averaged over the `columns` where it appears. A method trained on one attribute
# appears under that attribute, and under an intersection through its model trained on the intersection's first
# attribute; it is ranked in fewer columns, so compare mean ranks between methods with the same count. Ranks order
# methods; whether two of them differ is the question of the paired comparison below.

# %%
evals = fb.tables.evaluate(
    runs, attributes=[*fb.data.FILTER_ATTRIBUTES, *intersections],
    n_boot=n_boot)
methods = list(dict.fromkeys(runs["method"]))
board = fb.tables.leaderboard(evals, methods=methods)
board

# %% [markdown]
# ## Table 1
#
# Percent, mean ± sample standard deviation over seeds, in the layout of Fair-MoE's Table 1.

# %%
table = fb.tables.table(evals, methods=methods)
table

# %% [markdown]
# The seed means with 95% bootstrap intervals over test resamples (every model scored on the same resamples):

# %%
fb.tables.ci_table(evals, methods=methods)

# %% [markdown]
# ## Against the baseline
#
# Method − baseline, paired on seed: the mean difference, its paired bootstrap interval over test resamples, and the
# paired t-test across seeds. Higher is better for ES-AUC and AUC, lower for DPD and EOD.

# %%
paired = fb.tables.paired_table(evals, baseline=baseline)
paired.round(4)

# %% mystnb={"figure": {"caption": "Each method minus the baseline, per attribute and metric: mean over seeds with paired 95% bootstrap intervals.", "name": "fig-results-vs-baseline"}}
fb.plots.set_style()
label = (paired["method"] + " · "
         + paired["metric"].str.upper().str.replace("_", "-"))
fig = fb.plots.differences(
    paired.assign(row=label), "diff", "boot_lo", "boot_hi",
    label="row", by="attribute", xlabel=f"method − {baseline}")
fb.plots.savefig(fig, "methods-minus-baseline")

# %% [markdown]
# ## Group AUCs

# %%
for attribute in fb.data.FILTER_ATTRIBUTES:
    display(fb.tables.group_auc_table(evals, attribute,
                                      methods=methods))

# %% [markdown]
# ## Saved for later
#
# The per-seed scores behind every table, one row per (model, evaluated attribute), are written next to this
# notebook as `per-seed.csv`, for plots or tests of one's own.

# %%
columns = ["chapter", "method", "attribute", "seed",
           "eval_attribute", "threshold", "auc", "es_auc", "dpd",
           "eod", "eq_odds", "worst_auc", "auc_delta"]
per_seed = evals[columns]
fb.files.atomic_write_text(out / "per-seed.csv",
                           per_seed.to_csv(index=False))
fb.runs.save_metrics({
    "data": source, "chapters": chapters, "source_config": config,
    "leaderboard": board.set_axis(
        [" ".join(c).strip() for c in board.columns], axis=1),
    "table": table, "paired": paired})

# %% [markdown]
# ## Reading the table
#
# The number of clear differences (paired bootstrap interval excluding zero), computed:

# %%
verdicts = fb.tables.claims(paired)
pd.crosstab(verdicts["method"], verdicts["verdict"])

# %% [markdown]
# - The table is only as good as its protocol: validation-chosen epochs and thresholds, paired seeds, the test
#   set read once. The papers' tables select on test; their numbers and these are not comparable.
# - On SynthFairVLMed the numbers describe the synthetic benchmark and the tiny CPU models. They say whether a
#   method moves the gaps that the generator put in, not how it behaves on real fundus images. Run the
#   `paper-b16` configurations on the real data for that.
