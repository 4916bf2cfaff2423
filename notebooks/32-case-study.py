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
# # Case study: which patients each model gets right
#
# Two models with the same AUC can fail different patients. Fair-MoE's Fig. 3(a) makes the point with a few cases:
# a fundus image, its clinical note and each model's score, for patients of different groups. A handful of chosen
# cases shows *that* models differ, not *how often*. This chapter does both. It reads the test predictions that
# chapters 11 to 13 saved for CLIP, FairCLIP and Fair-MoE (nothing is retrained) and asks, for one attribute:
#
# * on what share of each group's cases are all three models right, all wrong, or split, and how;
# * when two models disagree on a case, is one of them right significantly more often (McNemar's test), and by how
#   much does that move accuracy;
# * what the cases they disagree on look like.
#
# Protocol. Each model and seed calls a case positive when its score reaches a threshold chosen on that model's own
# validation predictions (Youden's J); test predictions choose nothing. A case's *verdict* for a model is the
# majority over seeds: right when the model is right in more than half of its seeds (with an even number of seeds a
# tie counts as not right). Every share comes with a 95% interval over test cases (Wilson for shares, exact
# Clopper-Pearson for McNemar's share, Newcombe's paired score interval for accuracy differences; see `fb.cases`).
# The intervals cover the finite test set for these trained models, not training variation between seeds.

# %%
import pandas as pd

import fairbook as fb

# %% tags=["parameters"]
# the data the three chapters were run on
data_root = "data/synth-fairvlmed"
# CLIP (training attribute "all")
clip_run = "runs/11-clip-baseline/default"
# FairCLIP, one model per attribute and seed
fairclip_run = "runs/12-fairclip/default"
# Fair-MoE, one model per attribute and seed
fair_moe_run = "runs/13-fair-moe/default"
# the groups compared, and the attribute FairCLIP and Fair-MoE
# trained on
attribute = "race"
seeds = [0, 1, 2]
# fb.metrics.choose_threshold method, applied to validation
# predictions
threshold = "youden"
n_examples = 3  # gallery cases per group
# which disagreements the gallery shows (deterministic for a seed)
gallery_seed = 0
# this execution's run folder outside `fairbook run` (None:
# named from the parameter values; see the README)
run_dir = None

# %% [markdown]
# Where this execution's results go (its own run folder; the README explains the naming):

# %%
out = fb.runs.begin("32-case-study", globals())

# %%
methods = ["CLIP", "FairCLIP", "Fair-MoE"]
source = fb.data.describe(data_root)
fb.plots.say(source)

# %% [markdown]
# ## The per-case frame
#
# One model per method and seed: CLIP (trained without attributes) and the FairCLIP and Fair-MoE models trained on
# `attribute`. Prediction files have no case id; they follow the dataset's item order, which `fb.cases` checks row by
# row (label and all four attributes) before using them. The thresholds each model and seed chose on validation:

# %%
runs = fb.results.collect(clip_run, fairclip_run, fair_moe_run)
models = fb.cases.select_models(runs, attribute, methods, seeds)
verdicts = fb.cases.seed_verdicts(models, data_root, threshold)
(verdicts.groupby(["method", "seed"], sort=False)["threshold"]
 .first().unstack().round(4))

# %% [markdown]
# One row per test case: its group, label, and for each model the seed-mean score, the number of seeds that got
# it right and the majority verdict.

# %%
cases = fb.cases.case_frame(verdicts, data_root)
right = [f"{m} right seeds" for m in methods]
cases[["case", attribute, "label", *right]].head()

# %% [markdown]
# Accuracy per group, from the verdicts (Wilson interval) and as the mean of the seeds' accuracies (t interval over
# cases). Where the two differ much, the seeds often disagree with each other on the same case.

# %%
accuracy = fb.cases.accuracy_table(cases, attribute, methods)
labelled = accuracy.assign(group=accuracy["group"] + " (n="
                           + accuracy["n"].astype(str) + ")")
pd.concat({"verdict": fb.cases.interval_table(labelled, "group",
                                              "model", "accuracy"),
           "seed mean": fb.cases.interval_table(
               labelled, "group", "model", "seed_accuracy",
               "seed_lo", "seed_hi")},
          axis=1)

# %% [markdown]
# ## Where the models agree and disagree
#
# Each case falls in one pattern: all right, one model wrong, one model right, or all wrong. Percent of each group's
# cases [95% Wilson interval]; the last row adds up the split patterns.

# %%
agreement = fb.cases.agreement_table(cases, attribute, methods)
labelled = agreement.assign(group=agreement["group"] + " (n="
                            + agreement["n"].astype(str) + ")")
fb.cases.interval_table(labelled, "pattern", "group", "share")

# %% [markdown]
# ## Paired tests: who is right when two models disagree
#
# For each pair of models, only the discordant cases (one right, the other wrong) carry information about which is
# better. McNemar's exact test asks whether the first model wins more or fewer than half of them; `a_wins` is the
# share it wins [Clopper-Pearson interval], and `diff` the resulting accuracy difference, first minus second, with
# Newcombe's interval for paired proportions. The exact test is conservative, so in a borderline case the interval
# can just exclude zero while p stays above 0.05; read the two together.

# %%
mcnemar = fb.cases.pairwise_mcnemar(cases, attribute, methods)
mcnemar["pair"] = mcnemar["model_a"] + " − " + mcnemar["model_b"]
columns = ["n", "a_only", "b_only", "a_wins", "a_wins_lo",
           "a_wins_hi", "p", "diff", "diff_lo", "diff_hi"]
mcnemar.set_index(["pair", "group"])[columns].round(3)

# %% mystnb={"figure": {"caption": "Accuracy of the first model minus the second, per group and model pair (majority verdicts over seeds; thresholds chosen on validation), with Newcombe's paired 95% intervals. Left of zero: the second model is right more often.", "name": "fig-case-study-mcnemar"}}
fb.plots.set_style()
fig = fb.plots.differences(
    mcnemar, "diff", "diff_lo", "diff_hi", label="group", by="pair",
    xlabel="accuracy difference (first model − second)")
fb.plots.savefig(fig, "paired-accuracy-differences")

# %% [markdown]
# There are as many tests as rows in this table; with 5% each, one small p-value among them can be chance. The
# takeaways below also apply a Bonferroni bound.
#
# ## A gallery of disagreements
#
# For each group, up to `n_examples` cases on which the models' verdicts differ, chosen at random (seeded) and one
# pattern at a time in a random order of the patterns, so that different patterns ("only CLIP right", "only Fair-MoE
# wrong", ...) appear before any repeats.

# %%
picks = fb.cases.gallery_cases(cases, attribute, n_examples,
                               gallery_seed, methods)
picks[["case", "filename", "group", "label", "pattern", *right]]

# %% mystnb={"figure": {"caption": "Test cases on which the models disagree, by group: the fundus image with its label, agreement pattern and the start of its clinical note; below, each model's score as the mean over seeds [lowest, highest seed] and the number of seeds that got the case right (each seed at its own validation-chosen threshold).", "name": "fig-case-study-gallery"}}
fig = fb.plots.case_gallery(picks, methods)
fb.plots.savefig(fig, "disagreement-gallery")

# %% [markdown]
# ## Record the numbers

# %%
fb.runs.save_metrics({
    "data": source,
    "model": f"CLIP ({clip_run}), FairCLIP and Fair-MoE trained "
             f"on {attribute} ({fairclip_run}, {fair_moe_run}); "
             f"seeds {seeds}; {threshold} threshold on each "
             "model's validation predictions; verdict = majority "
             "over seeds (a tie is not right)",
    "attribute": attribute,
    "thresholds": (verdicts.groupby(["method", "seed"])["threshold"]
                   .first()),
    "accuracy": accuracy,
    "agreement": agreement,
    "mcnemar": mcnemar,
    "gallery": picks[["case", "filename", "group", "label",
                      "pattern"]],
})

# %% [markdown]
# ## Takeaways
#
# Computed from the tables above:

# %%
for row in agreement.to_dict("records"):
    if row["pattern"] in ("all right", "all wrong",
                          "models disagree"):
        fb.plots.say(f"{row['group']} (n={row['n']}): "
                     f"{row['pattern']} {row['share']:.1%} "
                     f"[{row['lo']:.1%}, {row['hi']:.1%}]")

# %%
bound = 0.05 / len(mcnemar)
for row in mcnemar[mcnemar["p"] < 0.05].to_dict("records"):
    first = row["diff"] > 0
    winner, loser = ((row["model_a"], row["model_b"]) if first
                     else (row["model_b"], row["model_a"]))
    wins, lo, hi = (
        (row["a_wins"], row["a_wins_lo"], row["a_wins_hi"]) if first
        else (1 - row["a_wins"], 1 - row["a_wins_hi"],
              1 - row["a_wins_lo"]))
    fb.plots.say(f"{row['group']}: {winner} is right on {wins:.0%} "
                 f"[{lo:.0%}, {hi:.0%}] of the "
                 f"{row['discordant']} cases it splits with "
                 f"{loser}; accuracy {row['pair']} "
                 f"{row['diff']:+.3f} [{row['diff_lo']:+.3f}, "
                 f"{row['diff_hi']:+.3f}], p = {row['p']:.2g} "
                 f"({'below' if row['p'] < bound else 'above'} the "
                 f"Bonferroni bound {bound:.4f})")
fb.plots.say(f"{int((mcnemar['p'] >= 0.05).sum())} of "
             f"{len(mcnemar)} pair × group tests have p ≥ 0.05")
split = (agreement.set_index(["group", "pattern"])
         .loc[("all", "models disagree")])
fb.plots.say(f"The models split on {split['share']:.1%} "
             f"[{split['lo']:.1%}, {split['hi']:.1%}] of all "
             "cases.",
             "No pair differs beyond the Bonferroni bound in any "
             "group: the split cases do not clearly favour a model."
             if (mcnemar["p"] >= bound).all() else
             "Differences marked 'below the Bonferroni bound' "
             "above survive the number of tests.")

# %% [markdown]
# How much the majority verdict moves accuracy away from the seeds' own accuracy (all cases):

# %%
for row in accuracy[accuracy["group"] == "all"].to_dict("records"):
    fb.plots.say(f"{row['model']}: verdict accuracy "
                 f"{row['accuracy']:.1%} [{row['lo']:.1%}, "
                 f"{row['hi']:.1%}], mean of the seeds' accuracies "
                 f"{row['seed_accuracy']:.1%} "
                 f"[{row['seed_lo']:.1%}, {row['seed_hi']:.1%}]")

# %% [markdown]
# - Accuracy differences between models are made of discordant cases only; the pattern table shows how many there
#   are. When models are split on many cases but McNemar finds no winner, they fail *different* patients about
#   equally often, which an AUC table cannot show.
# - Small groups get wide intervals: a group of a few dozen cases cannot show a difference of a few points. Read
#   a group's row with its n.
# - Verdicts are majorities over seeds. A model whose seeds disagree on many cases (compare the two accuracy
#   columns above) is unstable on them, and its verdicts mix that instability with its skill.
# - The gallery is a random draw of disagreements, not a selection of flattering cases; the tables above are the
#   evidence, the gallery shows what it is made of. On synthetic data the notes and images are generated: they show
#   the mechanics of the comparison, not clinical findings.
