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
# # Fairness metrics: one name, one definition
#
# The five papers of this handbook report "ES-AUC", "EOD" or "equalized odds", but not always the same quantity
# under the same name. This chapter fixes one definition per name, shows where the papers' definitions part ways,
# and sets the protocol every later chapter follows:
#
# - the decision threshold is chosen on **validation** predictions and applied unchanged to test;
# - every metric comes with a bootstrap confidence interval, resampled within each group;
# - a group where a metric is undefined (one class only) or empty is reported, never silently skipped.
#
# To have predictions to measure, we fit the simplest model there is: logistic regression on downsampled pixels.

# %%
import numpy as np
import pandas as pd

import fairbook as fb

pd.set_option("display.max_colwidth", None)

# %% tags=["parameters"]
# a FairVLMed folder; relative paths start at the fairbook checkout
data_root = "data/synth-fairvlmed"
attributes = ["race", "gender", "ethnicity", "language"]
# images are resized to pixels x pixels for the logistic regression
pixels = 32
# threshold chosen on validation: 0.5, youden, f1 or prevalence
threshold = "youden"
n_boot = 1000  # bootstrap resamples for the confidence intervals
seed = 0
# this execution's run folder outside `fairbook run` (None:
# named from the parameter values; see the README)
run_dir = None

# %% [markdown]
# Where this execution's results go (its own run folder; the README explains the naming):

# %%
out = fb.runs.begin("02-fairness-metrics", globals())

# %% [markdown]
# ## A model to measure
#
# The regularisation strength `C` is chosen on validation AUC; the test split is read once, at the end.

# %%
root = fb.files.resolve(data_root)
source = fb.data.describe(root)
X = {split: fb.data.load_pixels(root, split, size=pixels)
     for split in fb.data.SPLITS}
fb.plots.say(source)

# %%
(X_train, train), (X_val, val), (X_test, test) = (
    X["Training"], X["Validation"], X["Test"])
model = fb.models.fit_logistic(X_train, train["glaucoma"],
                               X_val, val["glaucoma"])
p_val, p_test = (model.predict_proba(X_val)[:, 1],
                 model.predict_proba(X_test)[:, 1])
{"chosen C": model.C,
 "validation AUC by C": {c: round(a, 3)
                         for c, a in model.val_auc_.items()}}

# %% [markdown]
# ## The metrics
#
# Each metric has one key in `fb.metrics.METRICS`, with its definition and the papers that report it.
# `gap(M)` is the largest minus the smallest group value.

# %%
pd.DataFrame.from_dict(fb.metrics.METRICS, orient="index",
                       columns=["definition; reported by"])

# %% [markdown]
# The full report for the test split, with the threshold chosen on validation. Values are in percent, as in the
# papers' tables, with 95% bootstrap intervals.

# %%
groups = {a: test[f"{a}_name"] for a in attributes}
report = fb.metrics.fairness_report(
    test["glaucoma"], p_test, groups, threshold=threshold,
    validation=(val["glaucoma"], p_val), n_boot=n_boot, seed=seed)
fb.plots.say(report["threshold_note"],
             f"-> threshold {report['threshold']:.3f}")

# %%
headline = ["auc", "es_auc", "es_auc_std", "dpd", "eod", "eq_odds",
            "auc_delta", "worst_auc", "ece"]
fb.metrics.ci_table(report, headline)

# %% [markdown]
# Per group, for race. The interval of a group is wide when the group is small: here, the Asian group.

# %%
per_group = fb.metrics.group_table(report)
race = per_group[per_group["attribute"] == "race"]
race[["group", "count", "prevalence", "auc", "auc_lo", "auc_hi",
      "tpr", "fpr", "selection_rate"]].round(3)

# %% mystnb={"figure": {"caption": "Test AUC per race group with 95% bootstrap intervals (resampled within each group); dashed: overall AUC.", "name": "fig-group-auc"}}
fb.plots.set_style()
fig = fb.plots.group_metric(
    race, "auc", overall=report["attributes"]["race"]["auc"])
fb.plots.savefig(fig, "group-auc-race")

# %% [markdown]
# ## Where the papers disagree: three readings of ES-AUC
#
# FairCLIP and Fair-MoE scale the overall AUC by the summed deviations of the groups from it:
# $\mathrm{ES\text{-}AUC} = \mathrm{AUC} / (1 + \sum_g |\mathrm{AUC} - \mathrm{AUC}_g|)$.
# FairMedFM scales by the spread of the group AUCs instead. Its code, and every consistent row of its Table 2,
# divide the overall AUC: $\mathrm{AUC_{ES}} = \mathrm{AUC} / (1 + \operatorname{std}_g \mathrm{AUC}_g)$, e.g.
# linear probing $76.07 / (1 + 0.53 / 2 / 100) = 75.87$. Its appendix can also be read as scaling the mean group
# AUC, $\overline{\mathrm{AUC}_g} / (1 + \operatorname{std}_g \mathrm{AUC}_g)$, which the table does not follow.
# The sum form grows with the number of groups; the std forms do not. Two hypothetical models with three groups
# each:

# %%
models = {"A": (0.85, [0.85, 0.85, 0.70]),
          "B": (0.80, [0.88, 0.72, 0.80])}
forms = pd.DataFrame({
    name: {
        "ES-AUC (sum)": fb.metrics.equity_scaled_sum(auc, g),
        "AUC_ES (FairMedFM)": fb.metrics.equity_scaled_std(auc, g),
        "AUC_ES (group mean)":
            fb.metrics.equity_scaled_group_mean(g)}
    for name, (auc, g) in models.items()}).T.astype(float)
fb.plots.say("ranked first:", forms.idxmax().to_dict())
forms.round(4)

# %% [markdown]
# Under the sum form A pays for one deviation of 0.15 and B for two of 0.08, and A's higher pooled AUC decides.
# FairMedFM's form keeps the pooled AUC too. The group-mean reading drops it: both models have a mean group AUC of
# 0.80, A's groups are spread more (std 0.071 against 0.065), and the ranking can flip. No form is wrong, but a
# table that mixes them, or compares a number of one form with a number of another, is. fairbook reports all
# three under distinct keys (`es_auc`, `es_auc_std`, `es_auc_group_mean`).

# %% [markdown]
# ## The threshold moves DPD and EOD
#
# Demographic parity and equalised odds are properties of *decisions*, so they depend on where the threshold
# sits. We draw the curves on validation predictions, the only ones a threshold may be chosen on.

# %%
thresholds = np.round(np.linspace(0.1, 0.9, 17), 2)
curve = fb.metrics.threshold_curve(val["glaucoma"], p_val,
                                   val["race_name"], thresholds)

# %% mystnb={"figure": {"caption": "Validation: per-race selection rate and TPR (left) and DPD and EOD (right) as the threshold moves.", "name": "fig-threshold"}}
fig = fb.plots.threshold_curve(curve)
fb.plots.savefig(fig, "threshold-curve")

# %% [markdown]
# In JupyterLab, move the slider to see each group's rates at one threshold; the static book shows the middle
# threshold.

# %%
fb.widgets.threshold_explorer(val["glaucoma"], p_val,
                              val["race_name"], thresholds)

# %% [markdown]
# ## Intersections
#
# Fairness across race and across gender does not imply fairness across their combinations. Intersectional groups
# are just another attribute; empty combinations are listed, not dropped.

# %%
both = fb.metrics.intersectional_groups(
    {"race": test["race_name"], "gender": test["gender_name"]})
inter = fb.metrics.fairness_report(
    test["glaucoma"], p_test, {"race & gender": both},
    threshold=report["threshold"], n_boot=n_boot, seed=seed)
fb.metrics.group_table(inter)[["group", "count", "auc", "auc_lo",
                               "auc_hi", "acc"]].round(3)

# %% [markdown]
# ## Record the numbers

# %%
race_entry = report["attributes"]["race"]
fb.runs.save_metrics({
    "data": source,
    "model": f"logistic regression on {pixels}x{pixels} pixels, "
             f"C={model.C} chosen on validation AUC",
    "threshold": {"value": report["threshold"],
                  "method": report["threshold_method"]},
    "test": {a: {k: e[k] for k in ("auc", "es_auc", "es_auc_std",
                                   "dpd", "eod", "eq_odds")}
             for a, e in report["attributes"].items()},
    "ci_race": {k: race_entry["ci"][k]
                for k in ("auc", "es_auc", "dpd", "eod")},
})

# %% [markdown]
# ## Takeaways
#
# - Name the definition: `es_auc` (sum form), `es_auc_std` (FairMedFM's) and `es_auc_group_mean` can rank models
#   differently.
# - Choose the threshold on validation; DPD and EOD move with it, so a threshold fitted on test flatters them.
# - Small groups have wide intervals: a gap smaller than the interval of the smallest group is not evidence of
#   unfairness, nor of its absence.
# - Every number above describes a pixel-level logistic regression on the data named at the top of the chapter.
