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
# # FairMedFM: how the model is used
#
# FairMedFM (Jin et al., NeurIPS 2024 Datasets and Benchmarks) asks whether the *way* a foundation model is used
# changes how fair it is. The same CLIP can answer zero-shot from class prompts, learn only its class prototypes
# (CLIP-Adapt), feed a linear probe, be tuned with LoRA, or be fine-tuned whole. The paper's Fig. 2 shows the
# group gap in AUC (AUC_Δ) of each usage, its Fig. 4a utility against fairness, and its Fig. 5 one group's AUC
# against the other's.
#
# This chapter runs the five usages on one start, one training draw per seed and one protocol: the epoch is chosen
# on validation AUC, the threshold on validation predictions, and the test split is scored once. The attributes
# are binarised as FairMedFM binarises them (sex; age ≥ 60; race White / non-White; language English /
# non-English), beside the three-group race used in the rest of the handbook.

# %%
import fairbook as fb

# %% tags=["parameters"]
# FairVLMed layout; relative paths start at the checkout
data_root = "data/synth-fairvlmed"
# open_clip architecture: fairbook-tiny, ViT-B-16, ViT-L-14, ...
model = "fairbook-tiny"
# a checkpoint file or an open_clip tag (openai)
pretrained = "runs/10-pretrain-synthetic-clip/default/clip.pt"
# fb.train.TrainConfig preset: FairMedFM's paper recipe
recipe = "fairmedfm"
epochs = 2
lr = 2.5e-4
batch_size = 32
# training pairs drawn per seed (None: the whole training split)
n_train = 500
seeds = [0, 1, 2]
n_boot = 1000  # bootstrap resamples of the test set
# this execution's run folder outside `fairbook run` (None:
# named from the parameter values; see the README)
run_dir = None

# %% [markdown]
# Where this execution's results go (its own run folder; the README explains the naming):

# %%
out = fb.runs.begin("14-fairmedfm-usages", globals())

# %% [markdown]
# ## Data and recipe
#
# Each seed trains on its own random draw of `n_train` training pairs; the validation and test splits are whole.
# The recipe is FairMedFM's (AdamW, cosine schedule, weight decay 0.05); each usage trains only what it says.

# %%
source = fb.data.describe(data_root)
config = fb.train.TrainConfig.preset(recipe, epochs=epochs, lr=lr,
                                     batch_size=batch_size)
attributes = [*fb.data.BINARY_ATTRIBUTES, "race"]
fb.plots.say(source)
fb.plots.say(config)

# %% [markdown]
# ## Five usages, one loop
#
# `fb.methods.fairmedfm.grid` declares the usages once, named as the paper names them. Zero-shot trains nothing:
# the loop scores the start as "epoch 0". Every other usage is trained by the same loop with plain empirical risk
# minimisation (no mitigation, one model per seed for every attribute).

# %%
usages = fb.methods.fairmedfm.grid(
    ["zero-shot", "clip-adapt", "lp", "lora", "ft"])
for usage in usages:
    trains = fb.methods.fairmedfm.USAGES[usage.usage]
    fb.plots.say(f"{usage.name}: {trains}")
setup = fb.protocol.Setup(data_root, config, model, pretrained,
                          n_train)
trained = fb.protocol.train_grid(out, usages, setup, seeds)

# %% [markdown]
# Did each usage learn? The training loss per epoch and the validation AUC that chose the kept epoch (zero-shot has
# only its start). CLIP-Adapt starts from zero-shot's class prompts; the heads of LP, LoRA and FT start at zero, so
# before their first step every case gets the same score (AUC 0.5), and any AUC they reach was learned.

# %%
history = fb.protocol.histories(trained)
learning = (history.groupby(["method", "epoch"], sort=False)
            [["train_loss", "val_auc"]].mean())
learning.round(4)

# %% [markdown]
# Does a trained usage rank the cases differently from zero-shot, or only rescale its scores? The Spearman
# correlation of each usage's test scores with zero-shot's, per seed (1 means the same order, and so the same AUC in
# every group; mean and minimum over seeds):

# %%
agreement = fb.tables.rank_agreement(trained, baseline="Zero-shot")
agreement.round(4)

# %% [markdown]
# ## Table 2's columns for each usage
#
# `fb.tables.evaluate` scores each seed's test predictions on every attribute, at a threshold chosen on its own
# validation predictions (Youden's J). The table has the columns of FairMedFM's Table 2 (percent, mean ± std over
# seeds): AUC, the AUC of each sex, their gap AUC_Δ, EqOdds as 1 − gap (higher is better, as the paper prints it),
# the gap in calibration error ECE_Δ, AUC_ES in FairMedFM's form AUC / (1 + std of group AUCs), and DPD.

# %%
evals = fb.tables.evaluate(fb.results.collect(out),
                           attributes=attributes, n_boot=n_boot)
names = [u.name for u in usages]
fb.tables.table2(evals, "sex", methods=names)

# %% [markdown]
# Zero-shot trains nothing, so its seeds are one model and its std is zero. The same on the binarised race, with the 95% bootstrap interval of each seed mean instead of the std:

# %%
fb.tables.table2(evals, "race-binary", methods=names,
                 intervals=True)

# %% [markdown]
# ## AUC_Δ by usage and attribute (Fig. 2)
#
# The group gap in AUC of each usage, seed mean with its bootstrap interval. A gap is never negative, so an interval
# near zero, not one that contains it, is what no gap looks like.

# %% mystnb={"figure": {"caption": "AUC gap between groups (percent points) of each usage, per attribute: seed mean and 95% bootstrap interval of the mean.", "name": "fig-fairmedfm-auc-gap"}}
means = fb.tables.seed_means(evals, ["auc", "auc_delta"], names)
gaps = means[means["metric"] == "auc_delta"]
fb.plots.set_style()
fig = fb.plots.differences(
    gaps.assign(**{k: 100 * gaps[k] for k in ("mean", "lo", "hi")}),
    "mean", "lo", "hi", label="method", by="attribute",
    xlabel="AUC_Δ (percent points)")
fb.plots.savefig(fig, "auc-gap-by-usage")

# %% [markdown]
# ## Utility against fairness (Fig. 4a)
#
# Each usage's AUC against its AUC_Δ, per attribute. Up and to the left is better on both.

# %% mystnb={"figure": {"caption": "AUC against AUC gap of each usage (seed means, 95% bootstrap intervals), one panel per attribute.", "name": "fig-fairmedfm-tradeoff"}}
points = fb.tables.wide_points(means, ["attribute", "method"],
                               "metric")
fig = fb.plots.tradeoff(points, "auc_delta", "auc", label="method",
                        by="attribute", xlabel="AUC_Δ",
                        ylabel="AUC")
fb.plots.savefig(fig, "utility-fairness")

# %% [markdown]
# ## Female against male (Fig. 5)
#
# Each usage's AUC on female patients against its AUC on male patients. On the dashed line both are served
# equally; the distance from it is the gap.

# %% mystnb={"figure": {"caption": "AUC on female against AUC on male patients of each usage (seed means, 95% bootstrap intervals); the dashed line is equal service.", "name": "fig-fairmedfm-female-male"}}
groups = fb.tables.group_means(evals, "sex", names)
by_sex = fb.tables.wide_points(groups, "method", "group")
fig = fb.plots.tradeoff(by_sex, "Male", "Female", label="method",
                        diagonal=True, xlabel="AUC, male",
                        ylabel="AUC, female")
fb.plots.savefig(fig, "female-against-male")

# %% [markdown]
# ## Record the numbers

# %%
fb.runs.save_metrics({
    "data": source,
    "model": f"{model} from {pretrained}; recipe {recipe} with "
             f"epochs={epochs}, lr={lr}, batch {batch_size}, "
             f"{n_train} training pairs per seed",
    "seeds": seeds,
    "learning": learning.reset_index(),
    "rank_agreement_with_zero_shot": agreement,
    "table2_sex": fb.tables.table2(evals, "sex", methods=names),
    "seed_means": means,
})

# %% [markdown]
# ## Takeaways
#
# Computed from the runs above: which usage is most accurate and which has the smallest sex gap, and whether the
# usages that train beat zero-shot at all (a paired comparison on seed; clear when the paired bootstrap interval
# excludes zero).

# %%
sex = means[means["attribute"] == "sex"].pivot(
    index="method", columns="metric", values="mean")
fb.plots.say(f"most accurate: {sex['auc'].idxmax()} "
             f"(AUC {100 * sex['auc'].max():.2f}); "
             f"smallest sex gap: {sex['auc_delta'].idxmin()} "
             f"(AUC_Δ {100 * sex['auc_delta'].min():.2f} points)")
paired = fb.tables.paired_table(evals, baseline="Zero-shot",
                                metrics=["auc", "auc_delta"])
verdicts = fb.tables.claims(paired[paired["attribute"] == "sex"])
better = verdicts[verdicts["verdict"] == "better"]
held = {m: ", ".join(better.loc[better["metric"] == m, "method"])
        for m in ("auc", "auc_delta")}
fb.plots.say("clearly more accurate than zero-shot:",
             held["auc"] or "none", "; clearly smaller sex gap",
             "than zero-shot:", held["auc_delta"] or "none")
same = agreement.loc[agreement["min"] >= 0.99, "method"]
fb.plots.say("rank the test cases as zero-shot does (Spearman",
             "≥ 0.99 at every seed):", ", ".join(same) or "none")
verdicts[["method", "metric", "diff", "boot_lo", "boot_hi",
          "verdict"]].round(4)

# %% [markdown]
# - FairMedFM found that the usage changes both utility and fairness, with no usage fairest everywhere. The lines
#   above say which differences from zero-shot are clear on this data; every other difference is within the noise
#   of three seeds and one test set.
# - A usage listed as ranking the cases as zero-shot does has zero-shot's AUC in every group and can differ from it
#   only where a threshold or the calibration enters (EqOdds, ECE_Δ, DPD): its training moved the scores' scale,
#   not their order.
# - Zero-shot is one model, the same at every seed; each other usage trains on its seed's draw, so its ± std adds
#   training noise to the test set's.
# - The binarised race pools Asian and Black patients, so it can hide a gap that the three-group race shows (compare
#   the two in the figures).
