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
# # The data: Harvard-FairVLMed and its synthetic stand-in
#
# Every method in this handbook is trained and tested on scanning laser ophthalmoscopy (SLO) fundus images paired
# with clinical notes, a glaucoma label and four protected attributes: race, gender, ethnicity and preferred
# language. This is the layout of Harvard-FairVLMed (Luo et al., CVPR 2024). Before we measure the fairness of a
# model, we ask what the data alone already says:
#
# - how large is each group, alone and in intersections?
# - does the base rate of glaucoma differ between groups?
# - do the images or the notes differ between groups in ways a model could exploit?
#
# By default this chapter runs on **SynthFairVLMed**, a procedural dataset that fairbook writes in the exact
# FairVLMed on-disk format. It has *designed* biases, so every number below describes the synthetic data, not
# patients. Point `data_root` at a real FairVLMed folder to run the same analysis on it.

# %%
import fairbook as fb

# %% tags=["parameters"]
# a FairVLMed folder; relative paths start at the fairbook checkout
data_root = "data/synth-fairvlmed"
attributes = ["race", "gender", "ethnicity", "language"]
# None: the official rule (drop val/test samples with an unknown
# race, gender, ethnicity or language)
drop_unknown = None
# images read for the brightness/contrast/CDR statistics
n_image_stats = 1000
examples_per_group = 2
seed = 0
# this execution's run folder outside `fairbook run` (None:
# named from the parameter values; see the README)
run_dir = None

# %% [markdown]
# Where this execution's results go (its own run folder; the README explains the naming):

# %%
out = fb.runs.begin("01-data-exploration", globals())

# %% [markdown]
# ## Loading the splits
#
# The split is the folder (`Training/`, `Validation/`, `Test/`). The official evaluation drops validation and
# test samples whose race, gender, ethnicity or language is unknown; `drop_unknown` switches that off.

# %%
root = fb.files.resolve(data_root)
source = fb.data.describe(root)
fb.plots.say(source)

# %%
metas = {split: fb.data.load_metadata(root, split,
                                      drop_unknown=drop_unknown)
         for split in fb.data.SPLITS}
fb.data.split_table(metas).round(3)

# %% [markdown]
# The rest of the chapter describes the training split, the data every method learns from.

# %%
fb.plots.set_style()
train = metas["Training"]

# %% [markdown]
# ## Group sizes
#
# Small groups are where fairness gaps are hardest to measure: their metrics carry the widest intervals.

# %% mystnb={"figure": {"caption": "Training samples per group for each protected attribute.", "name": "fig-group-sizes"}}
fig = fb.plots.group_sizes(train, attributes)
fb.plots.savefig(fig, "group-sizes")

# %% [markdown]
# Intersections shrink groups further: a model can be fair across race and across gender and still fail, say, Black
# men. The counts of race × gender:

# %% mystnb={"figure": {"caption": "Training samples per race and gender.", "name": "fig-race-gender"}}
counts = fb.data.intersection_table(train, "race", "gender")
fig = fb.plots.heatmap(counts)
fb.plots.savefig(fig, "race-gender-counts")

# %% [markdown]
# ## Glaucoma prevalence by group
#
# A group with a higher base rate changes what a fair classifier looks like: demographic parity and equalised odds
# can no longer hold together. Intervals are 95% Wilson score intervals.

# %%
tables = {a: fb.data.group_table(train, a) for a in attributes}
prevalence = fb.data.group_table(train, "race")
prevalence.round(3)

# %% mystnb={"figure": {"caption": "Glaucoma prevalence per group with 95% Wilson intervals; dashed: overall.", "name": "fig-prevalence"}}
fig = fb.plots.prevalence_by_group(tables)
fb.plots.savefig(fig, "prevalence-by-group")

# %% [markdown]
# Prevalence in the race × gender intersections:

# %% mystnb={"figure": {"caption": "Glaucoma prevalence per race and gender.", "name": "fig-race-gender-prevalence"}}
fig = fb.plots.heatmap(
    fb.data.intersection_table(train, "race", "gender",
                               values="prevalence"),
    fmt=".2f", cmap="Reds")
fb.plots.savefig(fig, "race-gender-prevalence")

# %% [markdown]
# ## What the images look like
#
# The images are centred on the optic nerve head. Glaucoma enlarges the optic cup, the pale centre of the disc,
# and thins the neuroretinal rim around it. Two examples per group, with the start of each note:

# %% mystnb={"figure": {"caption": "Example training images per race group, with label and note.", "name": "fig-examples"}}
fig = fb.plots.example_images(train, "race",
                              per_group=examples_per_group,
                              seed=seed)
fb.plots.savefig(fig, "examples-by-race")

# %% [markdown]
# ## Image statistics by group
#
# The cup-to-disc ratio (CDR) is the clinical measure of cupping; the synthetic data stores disc and cup masks, so
# we can read the vertical CDR directly (the real data has no masks, and the CDR column is then empty). Brightness
# and contrast reveal acquisition differences between groups.

# %%
image_stats = fb.data.image_statistics(train, n=n_image_stats,
                                       seed=seed)
(image_stats.groupby("race_name")
 [["brightness", "contrast", "vertical_cdr"]]
 .agg(["mean", "std"]).round(3))

# %% mystnb={"figure": {"caption": "Vertical cup-to-disc ratio by race and glaucoma label.", "name": "fig-cdr"}}
if image_stats["vertical_cdr"].notna().any():
    fig = fb.plots.by_group(image_stats, "vertical_cdr", "race")
    fb.plots.savefig(fig, "cdr-by-race")

# %% mystnb={"figure": {"caption": "Mean image brightness by race and glaucoma label.", "name": "fig-brightness"}}
fig = fb.plots.by_group(image_stats, "brightness", "race")
fb.plots.savefig(fig, "brightness-by-race")

# %% [markdown]
# ## The notes
#
# Contrastive methods learn from the note summaries, truncated to 180 characters. Notes that differ in length or
# detail between groups give the text encoder a group signal.

# %%
fb.data.note_lengths(train, by="race").round(1)

# %% [markdown]
# ## Browse the samples
#
# In JupyterLab this browser filters the training samples by group and label; in the static book it shows the
# first sample.

# %%
fb.widgets.sample_browser(train, attributes)

# %% [markdown]
# ## Record the numbers
#
# The run folder keeps the headline numbers, labelled with the data they describe.

# %%
fb.runs.save_metrics({
    "data": source,
    "n": {split: len(m) for split, m in metas.items()},
    "prevalence": {a: t["prevalence"].dropna().round(4).to_dict()
                   for a, t in tables.items()},
    "group_n": {a: t["n"].to_dict() for a, t in tables.items()},
})

# %% [markdown]
# ## Takeaways
#
# What to look for, on any FairVLMed folder (on the default SynthFairVLMed each of these holds by design):
#
# - Groups are very unequal in size; the smallest groups get the widest confidence intervals in every later
#   chapter.
# - Where glaucoma prevalence differs between groups, demographic parity and equalised odds cannot both hold, so
#   read parity numbers next to the base rates above.
# - Images and notes can carry group-linked differences besides the disease signal (brightness, contrast, note
#   length): a model can pick them up.
#
# The generator's bias knobs are documented in `fairbook.data.synthetic.SynthConfig`; `bias: none` gives a control
# in which groups are exchangeable.
