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
# # Ablation: FairCLIP with FO-MoE (Table 2)
#
# Fair-MoE changes both the architecture (FO-MoE layers) and the loss (FOL). Table 2 of the paper asks whether the
# architecture alone helps an existing fairness method: FairCLIP's loss, unchanged, trained on a CLIP with FO-MoE
# layers. The paper reports gains for ViT-B/16 on every attribute and mixed results for ViT-L/14.
#
# Everything else is as in chapters 12 and 13: same start, recipe, training draws, FO-MoE sizes and Sinkhorn
# weight; only the combination is new. The comparison is FairCLIP with FO-MoE against FairCLIP, paired on seed.

# %%
import pandas as pd

import fairbook as fb

# %% tags=["parameters"]
data_root = "data/synth-fairvlmed"
# FairCLIP and Fair-MoE, same data
reference_runs = ["runs/12-fairclip/default",
                  "runs/13-fair-moe/default"]
model = "fairbook-tiny"
pretrained = "runs/10-pretrain-synthetic-clip/default/clip.pt"
recipe = "fairclip"
epochs = 2
lr = 1e-4
batch_size = 32
n_train = 1000
prompts = "fairmedfm"
# the paper's Table 2 has all four; the CPU default runs the
# attribute with designed bias
attributes = ["race"]
seeds = [0, 1, 2]
n_boot = 1000
# this execution's run folder outside `fairbook run` (None:
# named from the parameter values; see the README)
run_dir = None

# %% [markdown]
# Where this execution's results go (its own run folder; the README explains the naming):

# %%
out = fb.runs.begin("20-ablation-fo-moe", globals())

# %% [markdown]
# ## Training

# %%
source = fb.data.describe(data_root)
config = fb.train.TrainConfig.preset(
    recipe, epochs=epochs, lr=lr, batch_size=batch_size,
    prompts=prompts)
# as chapter 12 trained it (chosen lambda)
fairclip = fb.protocol.saved_method(reference_runs[0], "FairCLIP")
# as chapter 13 trained it
fair_moe = fb.protocol.saved_method(reference_runs[1], "Fair-MoE")
fairclip_moe = fb.methods.FairMoE(
    "FairCLIP w. FO-MoE", layers=fair_moe.layers, fol=None,
    fairclip={k: v for k, v in fairclip.settings().items()
              if k != "name"})
fb.plots.say(fairclip_moe.describe())
setup = fb.protocol.Setup(data_root, config, model, pretrained,
                          n_train)
fb.protocol.train_grid(out, [fairclip_moe], setup, seeds,
                       attributes)

# %% [markdown]
# ## Table 2
#
# Percent, mean ± std over seeds, with Fair-MoE (chapter 13) for reference.

# %%
methods = ["FairCLIP", "FairCLIP w. FO-MoE", "Fair-MoE"]
runs = pd.concat([fb.results.collect(*reference_runs),
                  fb.results.collect(out)], ignore_index=True)
runs = fb.results.same_data(
    runs[runs["attribute"].isin(attributes)], source)
evals = fb.tables.evaluate(runs, attributes=attributes,
                           n_boot=n_boot)
table = fb.tables.table(evals, methods=methods)
table

# %%
fb.tables.ci_table(evals, methods=methods)

# %% [markdown]
# ## Does FO-MoE help FairCLIP?
#
# FairCLIP with FO-MoE minus FairCLIP, paired on seed, with the verdict on the paper's claim (better ES-AUC and
# AUC, lower DPD and EOD):

# %%
paired = fb.tables.paired_table(
    evals[evals["method"] != "Fair-MoE"], baseline="FairCLIP")
verdicts = fb.tables.claims(paired)
verdicts[["attribute", "metric", "diff", "boot_lo", "boot_hi", "p",
          "verdict"]].round(4)

# %% [markdown]
# ## Record the numbers

# %%
fb.runs.save_metrics({
    "data": source, "attributes": attributes, "seeds": seeds,
    "model": f"{model} from {pretrained}; "
             f"{fairclip_moe.describe()}",
    "table": table, "paired": verdicts})

# %% [markdown]
# ## Takeaways
#
# Computed:

# %%
fb.plots.say(verdicts["verdict"].value_counts().to_dict())

# %% [markdown]
# - A "better" verdict supports the paper's Table 2 claim for that metric on this benchmark; "no clear difference"
#   or "worse" does not, and is reported as it is.
# - FO-MoE adds parameters. An improvement could come from capacity rather than from routing; chapter 21 trains
#   the same architecture without any fairness term to separate the two.
