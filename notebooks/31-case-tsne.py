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
# # Case study: what the image features know about the patient's group
#
# Fairness methods change the loss, but the loss acts through the features. Fair-MoE's Fig. 3(b) shows t-SNE maps
# of image features: if a method made groups indistinguishable in the representation, its map coloured by race
# should look mixed while the map coloured by glaucoma should stay separated. A t-SNE map is a picture, though, not
# a measurement: it keeps neighbourhoods, not distances, and its clusters can appear or vanish with the perplexity.
# This chapter shows the maps and then puts two numbers on each model's features, with intervals:
#
# * **Attribute probe.** A logistic regression predicts the group from the frozen image features; its test AUC
#   (macro one-vs-rest for more than two groups) is 0.5 when the features carry no linearly readable trace of the
#   group, and 1 when they separate the groups perfectly.
# * **Group distance.** The unbiased squared maximum mean discrepancy (MMD²; Gretton et al., 2012) between a group's
#   features and everyone else's, with a Gaussian kernel. Unlike the plug-in (biased) estimate, which is positive
#   even for two samples of one distribution, its expectation is exactly 0 when the distributions are equal, so a
#   value near 0 means "no detectable difference". A permutation test of the group labels gives its p-value.
#
# Protocol. The models are the ones chapters 11 to 13 trained and kept (epoch chosen on validation): CLIP, which
# uses no attribute, and the FairCLIP and Fair-MoE models trained on `attribute`, for every seed. Features are
# L2-normalised `encode_image` outputs. The probe is fitted on a draw of training images, its regularisation is
# chosen on validation AUC, and it is scored once on the test split; distances are measured on the test split.
# Results are mean ± std over seeds, and the 95% bootstrap interval of the seed mean over test images (every model is
# scored on the same resamples, as in `fb.results`).

# %%
import json

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
# the groups studied, and the attribute FairCLIP and Fair-MoE
# trained on
attribute = "race"
seeds = [0, 1, 2]
# test images in each t-SNE map (a random draw, the same for every
# model)
n_points = 600
# training images the attribute probe is fitted on (None: the whole
# training split)
n_train_probe = 1000
n_boot = 1000  # bootstrap resamples of the test set
n_perm = 1000  # label permutations of the distance test
# this execution's run folder outside `fairbook run` (None:
# named from the parameter values; see the README)
run_dir = None

# %% [markdown]
# Where this execution's results go (its own run folder; the README explains the naming):

# %%
out = fb.runs.begin("31-case-tsne", globals())

# %%
source = fb.data.describe(data_root)
models = {"CLIP": (clip_run, fb.results.ALL),
          "FairCLIP": (fairclip_run, attribute),
          "Fair-MoE": (fair_moe_run, attribute)}
fb.plots.say(source)

# %% [markdown]
# ## The models
#
# One model per method and seed, read from the run folders of chapters 11 to 13; all must have been trained on
# this chapter's data.

# %%
runs = fb.results.same_data(
    fb.results.collect(clip_run, fairclip_run, fair_moe_run),
    source)
chosen = fb.cases.select_models(runs, attribute, list(models),
                                seeds)
architecture = sorted(
    {json.loads((f / "info.json").read_text())["model"]
     for f in chosen["folder"]})
fb.plots.say("architecture:", ", ".join(architecture))
(chosen.groupby(["method", "attribute"], sort=False)["seed"]
 .apply(list).to_frame("seeds"))

# %% [markdown]
# ## Image features
#
# Every model sees the same images: one draw of `n_train_probe` training images and the whole validation and test
# splits. The models of one configuration share their preprocess, so the images are decoded once.

# %%
_, preprocess, _ = fb.protocol.load_model(
    clip_run, "CLIP", fb.results.ALL, seeds[0])
splits = {
    "train": (fb.data.FairVLMed(data_root, "Training", preprocess)
              .subset(n_train_probe, 0)),
    "val": fb.data.FairVLMed(data_root, "Validation", preprocess),
    "test": fb.data.FairVLMed(data_root, "Test", preprocess)}
images = {split: fb.representation.load_images(data)
          for split, data in splits.items()}

# %% [markdown]
# `fb.protocol.load_model` rebuilds each model with its kept epoch and `fb.representation.image_features` runs its
# image encoder over the images.

# %%
features = {}
for method, (run_dir, trained_on) in models.items():
    for seed in seeds:
        net, preprocess, _ = fb.protocol.load_model(
            run_dir, method, trained_on, seed)
        features[method, seed] = {
            split: fb.representation.image_features(
                net, preprocess, batches, attribute)
            for split, batches in images.items()}
test = features["CLIP", seeds[0]]["test"]
fb.plots.say({split: f.X.shape
              for split, f in features["CLIP", seeds[0]].items()})
pd.Series(test.group).value_counts().to_frame(
    f"test images per {attribute} group")

# %% [markdown]
# ## t-SNE maps
#
# The same `n_points` test images for every model, first seed. Each map is computed separately (PCA start, fixed
# seed), so positions and orientations are not comparable between maps; only how the colours mix within a map is.

# %%
first = {method: features[method, seeds[0]]["test"]
         for method in models}
points = fb.representation.tsne_points(first, n_points=n_points,
                                       seed=0)

# %% mystnb={"figure": {"caption": "t-SNE maps of test-image features (one random draw of test images, the same for every model; first seed), coloured by group of the studied attribute (left; race by default) and by glaucoma label (right). One row per model: CLIP, FairCLIP and Fair-MoE, the last two trained on that attribute.", "name": "fig-tsne-maps"}}
fb.plots.set_style()
fig = fb.plots.tsne_grid(points)
fb.plots.savefig(fig, "tsne-maps")

# %% [markdown]
# ## Can a linear probe read the group?
#
# For each model and seed: an L2 logistic regression predicts the group from the features
# (`fb.representation.attribute_probe`). Its `C` is chosen on validation AUC from a fixed grid, never on test. Chance
# is an AUC of 0.5. Per seed, with the 95% bootstrap interval over test images:

# %%
probes = []
for (method, seed), f in features.items():
    probe = fb.representation.attribute_probe(
        f["train"], f["val"], f["test"], n_boot=n_boot)
    probes.append({"method": method, "seed": seed, **probe})
probes = pd.DataFrame(probes)
probes[["method", "seed", "auc", "ci_lo", "ci_hi", "C"]].round(3)

# %% [markdown]
# Mean ± std over seeds, and the 95% bootstrap interval of the seed mean:

# %%
probe_summary = fb.representation.over_seeds(
    probes, "method", "auc")
fb.representation.format_summary(probe_summary)

# %% [markdown]
# The macro AUC averages one AUC per group, each group against the others. Which groups can be told apart:

# %%
per_group = pd.DataFrame(
    [{"method": p["method"], "seed": p["seed"], "group": g,
      "auc": p["group_auc"][g], "boot": p["group_boot"][g]}
     for p in probes.to_dict("records") for g in p["groups"]])
group_probe_summary = fb.representation.over_seeds(
    per_group, ["method", "group"], "auc")
fb.representation.format_summary(group_probe_summary)

# %% [markdown]
# Each fairness method minus CLIP. Two intervals answer two questions: `ci_lo`/`ci_hi` is the paired bootstrap
# interval over test images (every model is scored on the same resamples), for these trained models;
# `seed_ci_lo`/`seed_ci_hi` and `p_seeds` come from a paired t-test over seeds (same seed, same training draws), and
# cover training variation, with few degrees of freedom. Below zero: the group is harder to read than from CLIP's
# features.

# %%
probe_vs_clip = fb.representation.compare(
    probe_summary, "CLIP", key="method")
probe_vs_clip.round(4)

# %% [markdown]
# ## How far apart are the groups' feature distributions?
#
# For each model and seed: the unbiased MMD² between each group's test features and the rest's
# (`fb.representation.group_distances`; with two groups, one row). The Gaussian kernel's bandwidth is the median
# distance between the model's test features (one per model and seed). Being unbiased, the estimate scatters around
# 0 when there is no difference, so small negative values are expected. The p-value tests the seed mean against
# label permutations shared by all seeds. The bootstrap interval is conservative when there is no difference; read
# the p-value for "is there a difference" and the interval for "how large". MMD² in thousandths (× 1000):

# %%
distances = pd.concat(
    [fb.representation.group_distances(
        f["test"].X, f["test"].group, n_boot=n_boot, n_perm=n_perm)
     .assign(method=method, seed=seed)
     for (method, seed), f in features.items()], ignore_index=True)
distance_summary = fb.representation.over_seeds(
    distances, ["method", "comparison"], "mmd2")
fb.representation.format_summary(distance_summary, decimals=2,
                                 scale=1000)

# %% mystnb={"figure": {"caption": "Unbiased MMD² between each group's test-image features and the rest's, per model: mean over seeds with the 95% bootstrap interval of the mean (Gaussian kernel, median-distance bandwidth per model and seed). Zero is no difference between the distributions; bandwidths differ between models, so compare groups within a model first.", "name": "fig-tsne-distances"}}
fig = fb.plots.differences(distance_summary, "mean", "ci_lo",
                           "ci_hi", label="comparison", by="method",
                           xlabel="mmd² (unbiased), group vs rest")
fb.plots.savefig(fig, "group-distances")

# %% [markdown]
# Each fairness method minus CLIP, per comparison, with the same two intervals as for the probe:

# %%
distance_vs_clip = fb.representation.compare(
    distance_summary, "CLIP", key="method")
distance_vs_clip.round(5)

# %% [markdown]
# Each model's distances use its own kernel, so a difference between models mixes a change of the features with a
# change of the ruler. The bandwidths (a setting of the estimator, taken from the data by the median heuristic):

# %%
bandwidths = (distances.groupby("method", sort=False)["bandwidth"]
              .agg(["min", "max"]))
bandwidths.round(4)

# %% [markdown]
# ## Record the numbers

# %%
numbers = ["method", "mean", "std", "ci_lo", "ci_hi", "seeds"]
fb.runs.save_metrics({
    "data": source,
    "model": f"{', '.join(architecture)}: CLIP from {clip_run}, "
             f"FairCLIP from {fairclip_run} and Fair-MoE from "
             f"{fair_moe_run} (both trained on {attribute}); "
             "kept epochs; L2-normalised image features",
    "attribute": attribute,
    "seeds": seeds,
    "settings": {"n_points": n_points,
                 "n_train_probe": n_train_probe,
                 "n_boot": n_boot, "n_perm": n_perm,
                 "test_images": len(test.group)},
    "probe_auc": probe_summary[numbers],
    "probe_group_auc": group_probe_summary[["group", *numbers]],
    "probe_auc_vs_clip": probe_vs_clip,
    "probe_per_seed": probes[["method", "seed", "auc", "ci_lo",
                              "ci_hi", "C"]],
    "mmd2": distance_summary[["comparison", *numbers, "p_perm"]],
    "mmd2_vs_clip": distance_vs_clip,
    "mmd2_bandwidths": bandwidths,
})

# %% [markdown]
# ## Takeaways
#
# Computed from the tables above. A difference from CLIP counts as clear only when both intervals, over test images
# and over seeds, exclude zero.

# %%
def verdict(r):
    clear = (r["ci_lo"] * r["ci_hi"] > 0
             and r["seed_ci_lo"] * r["seed_ci_hi"] > 0
             and r["diff"] * r["ci_lo"] > 0)
    return (("lower" if r["diff"] < 0 else "higher") if clear
            else "no clear difference")


for r in probe_summary.to_dict("records"):
    readable = ("readable" if r["ci_lo"] > 0.5
                else "not distinguishable from chance")
    fb.plots.say(f"{r['method']}: {attribute} probe AUC "
                 f"{r['mean']:.3f} [{r['ci_lo']:.3f}, "
                 f"{r['ci_hi']:.3f}]: {readable}")
for r in probe_vs_clip.to_dict("records"):
    fb.plots.say(f"{r['method']} − CLIP probe AUC: "
                 f"{r['diff']:+.3f} [{r['ci_lo']:+.3f}, "
                 f"{r['ci_hi']:+.3f}] over test images, "
                 f"[{r['seed_ci_lo']:+.3f}, {r['seed_ci_hi']:+.3f}]"
                 f" over seeds: {verdict(r)}")
for method, rows in distance_summary.groupby("method", sort=False):
    top = rows.loc[rows["mean"].idxmax()]
    fb.plots.say(f"{method}: {int((rows['p_perm'] < 0.05).sum())} "
                 f"of {len(rows)} group-vs-rest distances with "
                 "permutation p < 0.05; largest MMD² "
                 f"{top['mean']:.4f} [{top['ci_lo']:.4f}, "
                 f"{top['ci_hi']:.4f}] ({top['comparison']})")
verdicts = distance_vs_clip.apply(verdict, axis=1)
fb.plots.say("distances vs CLIP's: "
             f"{verdicts.value_counts().to_dict()} "
             f"of {len(verdicts)}")

# %% [markdown]
# - The question this chapter answers is narrower than "is the model fair": whether the fairness methods make the
#   groups harder to tell apart in the image features. If they did, their probe AUCs would move towards 0.5 and their
#   distances towards 0, clearly below CLIP's; the lines above say whether that is what the numbers show.
# - Neither FairCLIP nor Fair-MoE asks for it. FairCLIP aligns the distributions of image–text similarity scores and
#   Fair-MoE the routing of its experts; both can change who is served well without removing the attribute from the
#   features, and features that encode the group can still serve every group equally.
# - A group can be readable without the model using it. In SynthFairVLMed the groups differ in image appearance and
#   in glaucoma prevalence by design, so a probe can read the group from image statistics or through the label.
#   Group distances mix both too; the t-SNE map coloured by label shows how much of the structure is the label.
# - The MMD² of different models uses different kernels (the median heuristic is applied to each model's features),
#   so compare the groups of one model with confidence and models with care; the probe AUC has a common scale.
# - Intervals over test images hold the trained models fixed; seeds vary training. With three seeds the t-test over
#   seeds has two degrees of freedom: a "no clear difference" is weak evidence of no difference. The map is one seed.
