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
# # An offline pretrained start for the tiny CLIP
#
# FairCLIP and the methods compared with it fine-tune a *pretrained* CLIP: the FairCLIP paper starts from
# OpenAI's CLIP ViT-B/16. Those weights cannot be downloaded in an offline CPU setting, and fine-tuning a randomly
# initialised model is a different experiment: the fairness of a fine-tuned model depends on where it started.
#
# **This chapter exists only so that the CPU default of the handbook has a non-random start.** It trains the small
# `fairbook-tiny` CLIP contrastively, from random weights, on a separate synthetic corpus and saves the result as
# `clip.pt` in its run folder. The checkpoint stands in for OpenAI's pretrained CLIP and for nothing else. A real
# run uses `pretrained: openai` (with the paper's architecture, e.g. `ViT-B-16`) in the fine-tuning chapters'
# parameters; a reader working with the real Harvard-FairVLMed skips this chapter.
#
# We ask two questions: does the pretrained start know anything about glaucoma before any fine-tuning (its
# zero-shot AUC on the evaluation data), and is that knowledge already unequal across groups?

# %%
import pandas as pd
import torch
from torch.utils.data import DataLoader

import fairbook as fb

# %% tags=["parameters"]
# evaluation data (FairVLMed layout); relative paths start at the
# checkout
data_root = "data/synth-fairvlmed"
# seed of the pretraining corpus: must differ from the evaluation
# data's seed
pretrain_seed = 1000
# training samples of the corpus (its validation split: a quarter,
# 64 to 500)
pretrain_samples = 3000
# open_clip architecture, trained here from random initialisation
model = "fairbook-tiny"
epochs = 4
batch_size = 32
lr = 5e-4
# zero-shot class prompts, for choosing the epoch and for
# evaluation: fairmedfm or fairclip
prompts = "fairmedfm"
n_boot = 1000  # bootstrap resamples for the confidence intervals
seed = 0
# this execution's run folder outside `fairbook run` (None:
# named from the parameter values; see the README)
run_dir = None

# %% [markdown]
# Where this execution's results go (its own run folder; the README explains the naming):

# %%
out = fb.runs.begin("10-pretrain-synthetic-clip", globals())

# %% [markdown]
# ## Two datasets that share no sample
#
# The pretraining corpus is a fresh SynthFairVLMed draw: the generator's default population with its own seed,
# written to its own folder. The evaluation data, where every later chapter measures fairness, is the folder at
# `data_root`. With different seeds every image, note and label is an independent draw, so the pretrained model has
# never seen an evaluation sample. Generating the corpus takes seconds and is skipped when the folder exists.

# %%
root = fb.files.resolve(data_root)
source = fb.data.describe(root)
corpus = fb.data.synthetic.pretrain_corpus(pretrain_seed,
                                           pretrain_samples)
corpus_source = fb.data.describe(corpus)
fb.plots.say(f"pretraining: {corpus_source}\nevaluation:  {source}")

# %% [markdown]
# The corpus splits. Its validation split chooses the epoch; its small test split exists only because the
# FairVLMed layout needs one, and is never read.

# %%
fb.data.split_table({split: fb.data.load_metadata(corpus, split)
                     for split in fb.data.SPLITS}).round(3)

# %% [markdown]
# ## Contrastive pretraining
#
# The objective is CLIP's symmetric InfoNCE loss over (image, note) pairs (`fb.train.Contrastive`), trained by
# `fb.train.fit`, the loop every chapter trains through, with the default `fb.train.TrainConfig`: AdamW, linear
# warm-up then cosine decay, every parameter trained. After each epoch the
# model classifies the corpus' validation images zero-shot with the class prompts; the epoch with the best
# validation AUC is kept. Neither split of the evaluation data is used here.
#
# Early in training the validation AUC can sit far *below* 0.5: the image features already separate the classes,
# but which of the two prompts lies nearer to the glaucomatous images is still arbitrary (see "Which prompts?"
# below).

# %%
torch.manual_seed(seed)
net, preprocess_train, preprocess_val, tokenizer = (
    fb.models.create_clip(model))
train_ds = fb.data.FairVLMed(corpus, "Training", preprocess_train,
                             tokenizer)
val_ds = fb.data.FairVLMed(corpus, "Validation", preprocess_val,
                           tokenizer)
config = fb.train.TrainConfig(epochs=epochs, batch_size=batch_size,
                              lr=lr, prompts=prompts, seed=seed)

# %%
objective = fb.train.Contrastive(tokenizer,
                                 fb.train.PROMPT_SETS[prompts])
result = fb.train.fit(net, train_ds, val_ds, config, out, objective,
                      progress=False)
checkpoint = (out / "best.pt").replace(out / "clip.pt")
pd.DataFrame(result["history"]).round(3)

# %% mystnb={"figure": {"caption": "Pretraining on the synthetic corpus: mean contrastive loss per epoch (left) and zero-shot AUC on the corpus' validation split (right); dashed: the epoch kept.", "name": "fig-pretrain-curve"}}
fb.plots.set_style()
fig = fb.plots.training_curve(result["history"],
                              best_epoch=result["best_epoch"])
fb.plots.savefig(fig, "training-curve")

# %% [markdown]
# ## Zero-shot glaucoma detection on the evaluation data
#
# The pretrained model now scores the evaluation data without any training on it: the glaucoma probability is a
# softmax over the image's similarity to the two class prompts, scaled by the learned logit scale.
#
# ### Which prompts?
#
# fairbook has the prompts of two papers: FairCLIP's "A photo of glaucoma" / "A photo of non-glaucoma" and
# FairMedFM's "a scanning laser ophthalmoscope fundus image of a glaucoma" / "... of a normal". A text encoder
# trained only on clinical notes has seen neither phrasing, so nothing guarantees that the "glaucoma" prompt lands
# nearer to glaucomatous images than the other prompt does. An AUC below 0.5 means exactly that failure: the
# ranking is inverted. We compare the two sets on the evaluation data's *validation* split; the test split plays
# no part in the choice.

# %%
evaluation = {split: fb.data.FairVLMed(root, split, preprocess_val,
                                       tokenizer)
              for split in ("Validation", "Test")}
val_loader = DataLoader(evaluation["Validation"], batch_size=64)
pd.Series({name: fb.train.validation_auc(net, tokenizer,
                                         val_loader, p)
           for name, p in fb.train.PROMPT_SETS.items()},
          name="validation AUC").round(3)

# %% [markdown]
# The rest of the chapter uses the `prompts` parameter's set. The threshold is chosen on the validation split
# (Youden's J) and applied unchanged to the test split.

# %%
class_prompts = fb.train.PROMPT_SETS[prompts]
scores = {split: fb.train.zero_shot_scores(
              net, tokenizer, DataLoader(ds, batch_size=64),
              class_prompts)
          for split, ds in evaluation.items()}
(y_val, p_val, _), (y_test, p_test, _) = (scores["Validation"],
                                          scores["Test"])
for label, texts in class_prompts.items():
    fb.plots.say(f"{label}:", " | ".join(texts))

# %%
test = evaluation["Test"].metadata
groups = {a: test[f"{a}_name"] for a in fb.data.FILTER_ATTRIBUTES}
report = fb.metrics.fairness_report(
    y_test, p_test, groups, threshold="youden",
    validation=(y_val, p_val), n_boot=n_boot, seed=seed)
fb.plots.say(report["threshold_note"],
             f"-> threshold {report['threshold']:.3f}")

# %% [markdown]
# Test metrics in percent with 95% bootstrap intervals (resampled within each group), one row per attribute.

# %%
headline = ["auc", "es_auc", "es_auc_std", "dpd", "eod",
            "worst_auc"]
fb.metrics.ci_table(report, headline)

# %% [markdown]
# Per race group:

# %%
per_group = fb.metrics.group_table(report)
race = per_group[per_group["attribute"] == "race"]
race[["group", "count", "prevalence", "auc", "auc_lo", "auc_hi",
      "tpr", "fpr"]].round(3)

# %% mystnb={"figure": {"caption": "Zero-shot test AUC of the pretrained start per race group, with 95% bootstrap intervals; dashed: overall AUC.", "name": "fig-pretrain-group-auc"}}
fig = fb.plots.group_metric(
    race, "auc", overall=report["attributes"]["race"]["auc"])
fb.plots.savefig(fig, "zero-shot-group-auc-race")

# %% [markdown]
# The predictions are kept as CSV files beside the checkpoint, so that `fairbook metrics` can recompute any of
# these numbers.

# %%
for split, (y, p, codes) in scores.items():
    fb.results.save_predictions(
        out / f"zero-shot-{split.lower()}.csv", y, p, codes,
        split.lower())

# %% [markdown]
# ## Using the checkpoint
#
# `clip.pt` is a `torch.save` dict with the model's `state_dict` and, beside it, the training config, the chosen
# epoch and its validation AUC. open_clip reads the `state_dict` entry of a file passed as `pretrained`, so
# `fb.models.create_clip(model, pretrained=path)` (that is, `open_clip.create_model_and_transforms`) builds the
# pretrained model in one call; `fb.train.load_checkpoint(path, net)` loads it into an existing model, with a
# strict check of names and shapes. Both must reproduce the scores of the model in memory:

# %%
reloaded, *_ = fb.models.create_clip(model,
                                     pretrained=str(checkpoint))
_, p_reloaded, _ = fb.train.zero_shot_scores(
    reloaded, tokenizer, val_loader, class_prompts)
info = fb.train.load_checkpoint(checkpoint, net)
pd.Series({"largest score difference after reloading":
           float(abs(p_reloaded - p_val).max()),
           "epoch in file": info["epoch"]}, name="check")

# %% [markdown]
# ## Record the numbers

# %%
race_entry = report["attributes"]["race"]
fb.runs.save_metrics({
    "data": source,
    "pretrain_data": corpus_source,
    "model": f"{model} trained from random initialisation on the "
             f"pretraining corpus: {epochs} epochs, batch "
             f"{batch_size}, lr {lr}; epoch {result['best_epoch']} "
             "chosen on the corpus' validation AUC",
    "checkpoint": checkpoint.name,
    "pretrain": {k: result[k] for k in ("best_epoch",
                                        "best_val_auc", "history",
                                        "steps")},
    "prompts": prompts,
    "threshold": {"value": report["threshold"],
                  "method": report["threshold_method"]},
    "zero_shot_test": {
        a: {k: e[k] for k in ("auc", "es_auc", "es_auc_std", "dpd",
                              "eod", "eq_odds")}
        for a, e in report["attributes"].items()},
    "group_auc_race": race_entry["group_auc"],
    "ci_race": {k: race_entry["ci"][k]
                for k in ("auc", "es_auc", "dpd", "eod",
                          "group_auc")},
})

# %% [markdown]
# ## Takeaways
#
# The run in one line, computed from the numbers above:

# %%
lo, hi = race_entry["ci"]["auc"]
fb.plots.say(f"zero-shot test AUC {race_entry['auc']:.3f} "
             f"[{lo:.3f}, {hi:.3f}] with the {prompts} prompts; "
             f"worst race group AUC {race_entry['worst_auc']:.3f}, "
             f"race AUC gap {race_entry['auc_delta']:.3f}")

# %% [markdown]
# - A zero-shot AUC clearly above 0.5 means the tiny CLIP, trained from random weights on a separate synthetic
#   corpus, is a usable, non-random start for the fine-tuning chapters.
# - Group AUCs can differ before any fine-tuning. The corpus carries the generator's designed biases (on the
#   default preset: darker, noisier images, more label noise and a marker shortcut for one group), so the start
#   inherits them, and every fine-tuning method inherits them from the start. A fairness comparison must start
#   every method from the same checkpoint.
# - Zero-shot scores depend on the prompts. A prompt set whose validation AUC is below 0.5 ranks the classes the
#   wrong way round for this text encoder; when this chapter was written, that was the case for FairCLIP's prompts
#   and not for FairMedFM's. Check the direction on validation before scoring with other prompts.
# - The corpus comes from the same generator, and hence the same population, as the evaluation data: this is
#   in-domain pretraining. OpenAI's CLIP has never been trained on SLO fundus images with clinical notes, so its
#   zero-shot AUC on real FairVLMed says something else entirely; do not compare the number above with the
#   papers' zero-shot results.
# - This checkpoint is a CPU stand-in for `pretrained: openai` and nothing more. Runs on the real data start from
#   OpenAI's weights and skip this chapter.
