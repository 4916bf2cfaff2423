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
# # Ablation: the components of Fair-MoE (Table 4)
#
# Table 4 of the paper removes one piece of Fair-MoE at a time:
#
# * **(a)** one of the four F terms of FOL ($F_{EI}$, $F_{ET}$, $F_{FI}$, $F_{FT}$);
# * **(b)** the patch-embedding MoE (EM) or the feature MoE (FM), in both encoders;
# * **(c)** FO-MoE in the text encoder or in the image encoder.
#
# In (b) and (c) the F terms of the removed routers go with them; the Sinkhorn term stays in every variant. Each
# variant is compared with the full Fair-MoE of chapter 13, paired on seed. The paper's claim is that every
# component helps: removing any of them should lower ES-AUC or AUC, or raise DPD or EOD.

# %%
import pandas as pd

import fairbook as fb

# %% tags=["parameters"]
data_root = "data/synth-fairvlmed"
# the full Fair-MoE on the same data
reference_run = "runs/13-fair-moe/default"
model = "fairbook-tiny"
pretrained = "runs/10-pretrain-synthetic-clip/default/clip.pt"
recipe = "fairclip"
epochs = 2
lr = 1e-4
batch_size = 32
n_train = 1000
prompts = "fairmedfm"
# the CPU default runs the attribute with designed bias
attributes = ["race"]
# which rows of Table 4 to train
variants = ["w/o F_EI", "w/o F_ET", "w/o F_FI", "w/o F_FT",
            "w/o EM", "w/o FM",
            "w/o text FO-MoE", "w/o image FO-MoE"]
seeds = [0, 1, 2]
n_boot = 1000
# this execution's run folder outside `fairbook run` (None:
# named from the parameter values; see the README)
run_dir = None

# %% [markdown]
# Where this execution's results go (its own run folder; the README explains the naming):

# %%
out = fb.runs.begin("22-ablation-components", globals())

# %% [markdown]
# ## The variants
#
# Each row of Table 4 (`fb.methods.fair_moe.TABLE4`) is a change to `fb.methods.fair_moe.add_fo_moe` (which
# layers exist) and to `fb.methods.fair_moe.fol` (which F terms count):

# %%
TABLE4 = fb.methods.fair_moe.TABLE4
pd.DataFrame([{"variant": name, "layers": layers or "all four",
               "F terms": ", ".join(keep)}
              for name, (layers, keep) in TABLE4.items()
              if name in variants]).set_index("variant")

# %% [markdown]
# ## Training

# %%
source = fb.data.describe(data_root)
config = fb.train.TrainConfig.preset(
    recipe, epochs=epochs, lr=lr, batch_size=batch_size,
    prompts=prompts)
# as chapter 13 trained it (chosen FOL weight)
fair_moe = fb.protocol.saved_method(reference_run, "Fair-MoE")
ablations = [
    fb.methods.FairMoE(
        f"Fair-MoE {name}",
        layers={**fair_moe.layers, **TABLE4[name][0]},
        fol={**fair_moe.fol, "keep": TABLE4[name][1]})
    for name in variants]
fb.plots.say(fair_moe.describe())
setup = fb.protocol.Setup(data_root, config, model, pretrained,
                          n_train)
fb.protocol.train_grid(out, ablations, setup, seeds, attributes)

# %% [markdown]
# ## Table 4
#
# Percent, mean ± std over seeds.

# %%
methods = ["Fair-MoE", *(f"Fair-MoE {name}" for name in variants)]
reference = fb.results.collect(reference_run)
runs = pd.concat(
    [reference[reference["attribute"].isin(attributes)],
     fb.results.collect(out)], ignore_index=True)
evals = fb.tables.evaluate(fb.results.same_data(runs, source),
                           attributes=attributes, n_boot=n_boot)
table = fb.tables.table(evals, methods=methods)
table

# %%
fb.tables.ci_table(evals, methods=methods)

# %% [markdown]
# ## Does each component help?
#
# Each variant minus the full Fair-MoE, paired on seed. The paper's claim for a component holds when removing it
# makes the model clearly *worse*, i.e. when the verdict of "variant against Fair-MoE" is `worse`.

# %%
verdicts = fb.tables.claims(
    fb.tables.paired_table(evals, baseline="Fair-MoE"))
summary = verdicts.pivot_table(index="method",
                               columns=["attribute", "metric"],
                               values="verdict", aggfunc="first")
summary.reindex([m for m in methods if m in summary.index])

# %% mystnb={"figure": {"caption": "Each Table 4 variant minus the full Fair-MoE, mean over seeds with paired 95% bootstrap intervals. Removing a useful component should move ES-AUC and AUC below zero and DPD and EOD above.", "name": "fig-ablation-components"}}
fb.plots.set_style()
row = (verdicts["method"].str.removeprefix("Fair-MoE ") + " · "
       + verdicts["metric"].str.upper().str.replace("_", "-"))
fig = fb.plots.differences(
    verdicts.assign(row=row), "diff", "boot_lo", "boot_hi",
    label="row", by="attribute", xlabel="variant − Fair-MoE")
fb.plots.savefig(fig, "variants-minus-fair-moe")

# %% [markdown]
# ## Record the numbers

# %%
fb.runs.save_metrics({
    "data": source, "attributes": attributes, "seeds": seeds,
    "variants": variants,
    "model": f"{model} from {pretrained}; "
             + "; ".join(m.describe() for m in ablations),
    "table": table, "paired": verdicts})

# %% [markdown]
# ## Takeaways

# %%
helps = verdicts[verdicts["verdict"] == "worse"]
fb.plots.say(f"{len(verdicts)} comparisons; removing a component "
             f"made Fair-MoE clearly worse in {len(helps)}:",
             ", ".join(f"{r.method.removeprefix('Fair-MoE ')} "
                       f"({r.metric})"
                       for r in helps.itertuples()) or "none")

# %% [markdown]
# - A component whose removal changes nothing clearly is not shown to matter on this benchmark; with three seeds
#   and the tiny model, small effects cannot be told from noise. This is a statement about the evidence here,
#   not a proof that the component is useless.
