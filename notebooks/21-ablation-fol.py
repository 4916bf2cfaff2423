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
# # Ablation: Fair-MoE without FOL (Table 3)
#
# Table 3 of the paper removes the fairness-oriented loss: the FO-MoE architecture trained with CLIP's contrastive
# loss alone. Without FOL (which includes the Sinkhorn term) the model uses no sensitive attribute, so, like CLIP,
# it is one model per seed, evaluated under every attribute. Two comparisons answer two questions:
#
# * Fair-MoE without FOL against CLIP: what do the extra experts do on their own?
# * Fair-MoE against Fair-MoE without FOL: what does FOL add on top of the architecture? This is the paper's claim.

# %%
import pandas as pd

import fairbook as fb

# %% tags=["parameters"]
data_root = "data/synth-fairvlmed"
# CLIP and Fair-MoE, same data
reference_runs = ["runs/11-clip-baseline/default",
                  "runs/13-fair-moe/default"]
model = "fairbook-tiny"
pretrained = "runs/10-pretrain-synthetic-clip/default/clip.pt"
recipe = "fairclip"
epochs = 2
lr = 1e-4
batch_size = 32
n_train = 1000
prompts = "fairmedfm"
seeds = [0, 1, 2]
n_boot = 1000
# this execution's run folder outside `fairbook run` (None:
# named from the parameter values; see the README)
run_dir = None

# %% [markdown]
# Where this execution's results go (its own run folder; the README explains the naming):

# %%
out = fb.runs.begin("21-ablation-fol", globals())

# %% [markdown]
# ## Training

# %%
source = fb.data.describe(data_root)
config = fb.train.TrainConfig.preset(
    recipe, epochs=epochs, lr=lr, batch_size=batch_size,
    prompts=prompts)
# as chapter 13 trained it
fair_moe = fb.protocol.saved_method(reference_runs[1], "Fair-MoE")
without_fol = fb.methods.FairMoE("Fair-MoE w/o FOL",
                                 layers=fair_moe.layers, fol=None)
setup = fb.protocol.Setup(data_root, config, model, pretrained,
                          n_train)
fb.protocol.train_grid(out, [without_fol], setup, seeds)

# %% [markdown]
# ## Table 3
#
# Percent, mean ± std over seeds. Fair-MoE appears under the attributes chapter 13 trained it on.

# %%
methods = ["CLIP", "Fair-MoE w/o FOL", "Fair-MoE"]
runs = pd.concat([fb.results.collect(*reference_runs),
                  fb.results.collect(out)], ignore_index=True)
evals = fb.tables.evaluate(fb.results.same_data(runs, source),
                           n_boot=n_boot)
table = fb.tables.table(evals, methods=methods)
table

# %%
fb.tables.ci_table(evals, methods=methods)

# %% [markdown]
# ## What FOL adds
#
# Fair-MoE minus its FOL-free twin, paired on seed (the paper's claim):

# %%
columns = ["attribute", "metric", "diff", "boot_lo", "boot_hi", "p",
           "verdict"]
with_fol = fb.tables.claims(fb.tables.paired_table(
    evals[evals["method"] != "CLIP"], baseline="Fair-MoE w/o FOL"))
with_fol[columns].round(4)

# %% [markdown]
# ## What the experts do alone
#
# The FOL-free twin minus CLIP, paired on seed:

# %%
alone = fb.tables.claims(fb.tables.paired_table(
    evals[evals["method"] != "Fair-MoE"], baseline="CLIP"))
alone[columns].round(4)

# %% [markdown]
# ## Record the numbers

# %%
fb.runs.save_metrics({
    "data": source, "seeds": seeds,
    "model": f"{model} from {pretrained}; "
             f"{without_fol.describe()}, contrastive loss only",
    "table": table,
    "paired": pd.concat([with_fol, alone], ignore_index=True)})

# %% [markdown]
# ## Takeaways

# %%
fb.plots.say("FOL on top of the architecture:",
             with_fol["verdict"].value_counts().to_dict())
fb.plots.say("architecture alone against CLIP:",
             alone["verdict"].value_counts().to_dict())

# %% [markdown]
# - The paper's Table 3 claim is the first line: Fair-MoE should beat its FOL-free twin. The second line says how
#   much of any gain over CLIP the extra experts bring without any fairness term.
