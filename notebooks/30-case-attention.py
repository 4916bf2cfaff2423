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
# # Case study: where do the models look?
#
# Fair-MoE (Fig. 1) and FairMed-VLM (Fig. 1) persuade with attention maps: a fairer model, the figures suggest,
# looks at the right place for every group. Such figures show a handful of hand-picked images and no number.
# The synthetic data lets us do better, because it knows where the disease signal is: glaucoma shows in the
# cup-to-disc ratio, inside the optic disc, and each image comes with its disc mask.
#
# So this chapter measures, for CLIP, FairCLIP and Fair-MoE (chapters 11–13), **the share of each
# explanation map's mass that falls inside the optic disc**, per group, with bootstrap intervals, on the same
# test images for every model. Two maps from `fb.explain`:
#
# * **attention rollout** (Abnar & Zuidema 2020): how the attention of all blocks mixes the input patches into
#   the image embedding; it does not depend on the prompts;
# * **gradient-weighted attention** (Chefer, Gur & Wolf 2021): attention weighted by the gradient of the
#   glaucoma decision, $\cos(f(x), t_+ - t_-)$ with $t_\pm$ the class prompt embeddings.
#
# Both find a planted signal in `tests/test_explain.py`; a channel-averaged Grad-CAM did not, so it is not
# used here. The reference level is the disc's share of the image: the share that a flat map reaches.

# %%
import pandas as pd

import fairbook as fb

# %% tags=["parameters"]
data_root = "data/synth-fairvlmed"
clip_run = "runs/11-clip-baseline/default"
fairclip_run = "runs/12-fairclip/default"
fair_moe_run = "runs/13-fair-moe/default"
# the FairCLIP and Fair-MoE models trained on this attribute;
# the groups are its groups
attribute = "race"
seeds = [0, 1, 2]
per_cell = 40  # test images drawn per (group, label) cell
# class prompts that define the decision direction t+ - t-
prompts = "fairmedfm"
methods = ["rollout", "gradient-attention"]
n_boot = 1000
mask_key = "disc_mask"
# this execution's run folder outside `fairbook run` (None:
# named from the parameter values; see the README)
run_dir = None

# %% [markdown]
# Where this execution's results go (its own run folder; the README explains the naming):

# %%
out = fb.runs.begin("30-case-attention", globals())

# %% [markdown]
# ## The models and the cases
#
# Each model is rebuilt from its run folder (`fb.protocol.load_model`): architecture from its record, weights
# from its kept epoch. The cases are drawn from the test split with the same number of glaucoma and healthy
# images in every group, so that the groups do not differ in their label mix.

# %%
models = {"CLIP": (clip_run, "CLIP", "all"),
          "FairCLIP": (fairclip_run, "FairCLIP", attribute),
          "Fair-MoE": (fair_moe_run, "Fair-MoE", attribute)}
source = fb.data.describe(data_root)
net, preprocess, tokenizer = fb.protocol.load_model(
    clip_run, "CLIP", "all", seeds[0])
test = fb.data.FairVLMed(data_root, "Test", preprocess, tokenizer)
rows = fb.explain.sample_cases(test, attribute, per_cell, seed=0)
cases = (test.metadata.iloc[rows][["glaucoma", f"{attribute}_name"]]
         .rename(columns={f"{attribute}_name": "group"}))
cases.groupby(["group", "glaucoma"]).size().unstack()

# %% [markdown]
# The images go through the evaluation preprocess (resize and centre crop); the disc masks follow the same
# geometry onto the patch grid.

# %%
images = fb.explain.case_images(test, rows)
masks = fb.explain.region_masks(test, rows, mask_key)
fb.plots.say(f"{len(rows)} cases, images {tuple(images.shape)}, "
             f"patch grid {fb.explain.patch_grid(net)}, "
             f"masks {masks.shape[1:]} at the raw resolution")

# %% [markdown]
# ## Disc shares for every model and seed

# %%
shares = fb.explain.model_shares(models, seeds, images, masks,
                                 ["uniform", *methods], prompts)
shares["case"] = rows[shares["item"]]
shares["group"] = cases["group"].to_numpy()[shares["item"]]
fb.plots.say(f"{len(shares):,} shares: "
             f"{shares['model'].nunique()} models x {len(seeds)} "
             f"seeds x {shares['method'].nunique()} maps (with the "
             f"flat map) x {len(rows)} cases")

# %% [markdown]
# ## Share of the map inside the disc, per group
#
# Percent, mean over the cases of each case's seed-mean share; ± the std over seeds of the per-seed mean; in
# brackets the 95% interval over 1,000 resamples of the cases of the group (the same resamples for every
# model). "uniform" is the disc's own share of the image.

# %%
tables = {m: fb.explain.share_table(shares[shares["method"] == m],
                                    n_boot=n_boot) for m in methods}
flat = fb.explain.share_table(
    shares[(shares["method"] == "uniform")
           & (shares["model"] == "CLIP")], n_boot=n_boot)
summary = pd.concat(
    {**tables, "uniform": flat.assign(model="flat map")},
    names=["method"]).reset_index(level=0)
cell = [fb.stats.estimate(100 * r.share, 100 * r.std, 100 * r.lo,
                          100 * r.hi, decimals=1)
        for r in summary.itertuples()]
summary.assign(cell=cell).pivot_table(
    index=["method", "model"], columns="group", values="cell",
    aggfunc="first")

# %% mystnb={"figure": {"caption": "Share of the explanation map inside the optic disc, per group and model, mean over cases of the seed-mean share with 95% bootstrap intervals over cases. The grey band is the disc's own share of the image (a flat map).", "name": "fig-disc-share"}}
fb.plots.set_style()
fig = fb.plots.region_shares(
    summary[summary["method"] != "uniform"], reference=flat)
fb.plots.savefig(fig, "disc-share-by-group")

# %% [markdown]
# ## Do the fairness methods change where the model looks?
#
# The same cases under each model, so the differences are paired: for each case, the model's seed-mean share
# minus CLIP's, averaged over the cases of a group, with a paired bootstrap interval over cases. That interval
# holds the trained models fixed; `std` is the spread over seeds of the per-seed difference, which it does not
# contain. A difference is worth reading only when it is large against both.

# %%
paired = pd.concat(
    [fb.explain.share_differences(shares[shares["method"] == m],
                                  baseline="CLIP", n_boot=n_boot)
     .assign(method=m) for m in methods], ignore_index=True)
paired.round(4)

# %% [markdown]
# ## Maps of one case per group
#
# A glaucoma case from each group (the first drawn), under the gradient-weighted attention of the first seed of
# each model. The cyan outline is the optic disc.

# %%
show = (cases.reset_index(drop=True).query("glaucoma == 1")
        .groupby("group").head(1).index.tolist())
maps = {}
for name, (run, method, trained_on) in models.items():
    net, preprocess, tokenizer = fb.protocol.load_model(
        run, method, trained_on, seeds[0])
    target = fb.explain.decision_direction(
        net, tokenizer, fb.train.PROMPT_SETS[prompts])
    maps[name] = fb.explain.upsample_map(fb.explain.token_maps(
        net, images[show], methods[-1], target), net)
outline = fb.explain.transform_mask(masks[show], preprocess)

# %% mystnb={"figure": {"caption": "Gradient-weighted attention of CLIP, FairCLIP and Fair-MoE (first seed) on one glaucoma test image per group; each map scaled to its own maximum; cyan: optic disc.", "name": "fig-attention-cases"}}
labels = [f"{g}" for g in cases["group"].to_numpy()[show]]
fig = fb.plots.attention_grid(images[show], maps, outline, labels)
fb.plots.savefig(fig, "attention-cases")

# %% [markdown]
# ## Fair-MoE's routing over the fundus
#
# Which image patches each expert of the patch MoE takes (colour: the expert with the largest kept gate weight)
# and which assignments the capacity limit drops (x), for the same cases, Fair-MoE's first seed. Below, for all
# cases and seeds: the share of the $\mathrm{Top}_r$ assignments that the capacity removed, inside the disc and outside it
# (95% intervals over cases).

# %%
net, preprocess, _ = fb.protocol.load_model(
    fair_moe_run, "Fair-MoE", attribute, seeds[0])
weights, dropped = fb.explain.patch_routing(net, images)
grid = fb.explain.mask_to_grid(masks, preprocess, net)

# %% mystnb={"figure": {"caption": "Fair-MoE image patch routing (first seed) on one glaucoma test image per group: colour, the expert with the largest kept gate weight for each patch; x, a patch with an assignment dropped by the capacity limit.", "name": "fig-routing-cases"}}
fig = fb.plots.routing_overlay(images[show], weights[show],
                               dropped[show], labels,
                               patch=fb.explain.patch_size(net))
fb.plots.savefig(fig, "routing-cases")

# %%
drops = []
for seed in seeds:
    net, _, _ = fb.protocol.load_model(fair_moe_run, "Fair-MoE",
                                       attribute, seed)
    drops.append(fb.explain.dropped_shares(
        *fb.explain.patch_routing(net, images), grid)
        .assign(seed=seed))
drops = pd.concat(drops, ignore_index=True)
drops = drops.assign(case=rows[drops["item"]],
                     group=cases["group"].to_numpy()[drops["item"]])
dropped_table = fb.explain.share_table(
    drops.rename(columns={"region": "model"}), n_boot=n_boot)
dropped_table = dropped_table.rename(columns={"model": "region"})
dropped_table.round(4)

# %% [markdown]
# ## A planted shortcut: the device marker
#
# SynthFairVLMed plants a shortcut for one group (its mechanism e). In the training split, that group's images
# carry a small bright device marker in 80% of the glaucoma cases and 20% of the healthy ones. In validation and
# test the marker shows in half of the group's images, whatever the label. A model that learned the shortcut
# would put explanation mass on the marker, and it would score marked images higher than unmarked ones of the
# same group. We measure both, on that group's test images. The shares use the same maps as above, with the
# marker's square as the region; the cases are drawn per (marker, label) cell.

# %%
truth = fb.data.synthetic.load_truth(data_root)
marker_race = (fb.data.synthetic.load_manifest(data_root)
               ["config"]["artefact_race"])
marked = test.metadata["filename"].map(truth["marker"]).where(
    test.metadata["race"] == marker_race, -1)
marker_rows = fb.explain.sample_cases(test, marked.to_numpy(),
                                      per_cell, seed=1)
box = fb.data.synthetic.marker_mask(*masks.shape[1:])
on_marker = fb.explain.model_shares(
    models, seeds, fb.explain.case_images(test, marker_rows), box,
    ["uniform", *methods], prompts)
on_marker["case"] = marker_rows[on_marker["item"]]
on_marker["group"] = marked.iloc[on_marker["case"]].map(
    {1: "marked", 0: "unmarked"}).to_numpy()
marker_table = pd.concat(
    {m: fb.explain.share_table(on_marker[on_marker["method"] == m],
                               n_boot=n_boot)
     for m in ["uniform", *methods]},
    names=["method"]).reset_index(level=0)
marker_table = marker_table[(marker_table["method"] != "uniform")
                            | (marker_table["model"] == "CLIP")]
fb.cases.interval_table(marker_table, ["method", "model"], "group",
                        "share", decimals=2)

# %% [markdown]
# Percent of the map on the marker's square, mean over cases of the seed-mean share, 95% intervals over cases;
# the "uniform" row is the square's share of the image. Now the scores: for every test image of the group, the
# model's glaucoma score, marked minus unmarked (mean over seeds; ± the std over seeds of the per-seed gap;
# interval over resamples of the cases of each kind).

# %%
chosen = fb.cases.select_models(
    fb.results.collect(clip_run, fairclip_run, fair_moe_run),
    attribute, list(models), seeds)
scores = fb.cases.seed_verdicts(chosen, data_root)
scores = scores.assign(
    model=scores["method"], share=scores["score"],
    group=(marked.map({1: "marked", 0: "unmarked"})
           .to_numpy()[scores["case"]]))
shift = fb.explain.share_gap(scores.dropna(subset=["group"]),
                             "marked", "unmarked", n_boot=n_boot)
shift.round(4)

# %% [markdown]
# ## Record the numbers

# %%
fb.runs.save_metrics({
    "data": source,
    "model": f"CLIP, FairCLIP and Fair-MoE ({attribute}) from "
             f"{clip_run}, {fairclip_run} and {fair_moe_run}, "
             f"seeds {seeds}; maps {methods}; decision direction "
             f"from the {prompts} prompts",
    "cases": {"n": len(rows), "per_cell": per_cell,
              "attribute": attribute},
    "disc_share": summary,
    "paired_vs_clip": paired,
    "capacity_drops_fair_moe": dropped_table,
    "marker_share": marker_table,
    "marker_score_shift": shift,
})

# %% [markdown]
# ## Takeaways
#
# Computed from the shares above: for each map, each model's disc share as a multiple of the flat-map level on the
# same case (1 = no concentration on the disc; mean over cases [95% interval over cases]), and the differences from
# CLIP that are clear in both senses: the paired interval over cases excludes 0 and the difference exceeds twice
# its spread over seeds.

# %%
relative = fb.explain.relative_shares(shares)
lift = pd.concat(
    {m: fb.explain.share_table(relative[relative["method"] == m],
                               n_boot=n_boot) for m in methods},
    names=["method"]).reset_index(level=0)
display(fb.cases.interval_table(lift, ["method", "model"], "group",
                                "share", scale=1, decimals=2))
clear = paired[((paired["lo"] > 0) | (paired["hi"] < 0))
               & (paired["diff"].abs() > 2 * paired["std"])]
fb.plots.say(f"{len(clear)} of {len(paired)} paired differences "
             "from CLIP exclude 0 over cases and exceed twice "
             "their seed std; the largest of all is "
             f"{100 * paired['diff'].abs().max():.1f} points:")
on_marker_relative = fb.explain.relative_shares(on_marker)
on_marker_relative = on_marker_relative[
    on_marker_relative["group"] == "marked"]
marker_lift = pd.concat(
    {m: fb.explain.share_table(
        on_marker_relative[on_marker_relative["method"] == m],
        n_boot=n_boot) for m in methods}, names=["method"])
fb.plots.say("map on the marker in marked images, as a multiple "
             "of the square's share of the image:",
             {f"{m} {r['model']}": f"{r['share']:.2f} "
                                   f"[{r['lo']:.2f}, {r['hi']:.2f}]"
              for (m, _), r in marker_lift.iterrows()})
fb.plots.say("score gap marked - unmarked with its interval:",
             {r["model"]: f"{r['gap']:+.4f} "
                          f"[{r['lo']:+.4f}, {r['hi']:+.4f}]"
              for r in shift.to_dict("records")})
clear[["method", "model", "group",
       "diff", "std", "lo", "hi"]].round(4)

# %% [markdown]
# - The disc-share table answers the question the papers' figures only suggest. A share well above the flat-map
#   level means the explanation concentrates on the disc, where the signal is. Equal shares across groups mean
#   the model looks at the same place whatever the group.
# - The papers' figures imply that the fairness methods move attention towards the disc for the disadvantaged
#   group. On this benchmark the paired differences above say whether they did; the printed count is the answer.
# - The marker lines say whether the models took the planted shortcut. A multiple below 1 means the maps look at
#   the marker less than a flat map would. A score gap whose interval holds 0 means that marked images are not
#   scored higher. When both hold, the shortcut was not learned in this configuration. Then this benchmark
#   cannot show a fairness method removing it, and a chapter that claimed so would be wrong.
# - Explanations are themselves models of the model. The two maps agree on ranking models only if the table
#   says so, and neither is ground truth. The planted-signal test shows that they can find a signal; it does not
#   show that they find all of it.
# - The capacity limit removes most of Fair-MoE's $\mathrm{Top}_r$ assignments (the last table), inside the disc
#   and outside it alike. Even perfectly even routing must drop some: on the tiny model a sequence has 37
#   tokens, so 111 assignments for 10 experts × 9 slots, and at least 19% go. When the gate sends every token to the same few experts (chapter 13's routing diagnostics), those
#   experts' slots fill up and the rest is dropped.
# - On the tiny model's 6 × 6 patch grid the disc covers only a few patches, so the shares are coarse. On
#   ViT-B/16 (14 × 14) the same code gives finer maps. The real Harvard-FairVLMed has no disc masks, so this
#   measurement needs the synthetic data or masks added to the files.
