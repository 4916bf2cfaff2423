"""FairMedFM (Jin et al., "FairMedFM: Fairness Benchmarking for Medical Imaging Foundation Models", NeurIPS 2024
Datasets and Benchmarks): how a foundation model is *used* (Sec. 3.2) and how it is *debiased* (Sec. 3.3, Table
2), declared once and trained through the one loop (:func:`fairbook.train.fit`).

Usages (``usage``):

* ``"zero-shot"``: CLIP as it starts, scored with the class prompts (``prompts``, FairMedFM's FairVLMed prompt by
  default; :func:`fairbook.train.zero_shot_scores`). Nothing trains: the protocol runs the loop with ``epochs=0``;
* ``"lp"``, linear probe: the encoder is frozen and a linear head is trained by the loop (fairbook's
  scikit-learn probe, :func:`fairbook.train.linear_probe`, is the closed-form counterpart);
* ``"clip-adapt"``, CLIP-Adapt: the class-text prototypes are trainable, the whole CLIP is frozen, and the
  cross-entropy runs on the scaled cosine logits (:class:`fairbook.models.PromptClassifier`);
* ``"lora"``: LoRA on the attention of every image-tower block (peft, :func:`fairbook.models.add_lora`;
  ``lora_mlp`` adds the MLP linears) plus a linear head. FairMedFM's released LoRA wrapper cannot run; this is
  the paper's description;
* ``"ft"``: full fine-tuning of the image tower plus a linear head.

Mitigations (``mitigation``), for the training attribute:

* ``"erm"``: the mean loss, one model for every attribute;
* ``"resampling"``: batches drawn by :func:`fairbook.mitigations.balanced_sampler` over the attribute x label
  cells (``resample_by="attribute x label"``) or the attribute's groups only (``"attribute"``). FairMedFM's
  released code only turns shuffling off; this is the resampling its paper and MEDFAIR describe;
* ``"groupdro"``: :class:`fairbook.mitigations.GroupDRO` over the attribute's groups, step size ``dro_eta`` and
  generalisation adjustment ``C = dro_adjustment`` (FairMedFM uses C = 1), over the groups present in the
  training draw. Training samples whose attribute is unknown (code -1) form a group of their own, so that no
  sample leaves the objective;
* ``"laftr"``: :class:`fairbook.mitigations.LAFTR`, an adversary on the representation the head classifies,
  in its demographic-parity or equalised-odds form (``laftr_form``), coefficient 0.1 as in FairMedFM. With the
  linear probe the encoder is frozen and the adversary would have nothing upstream to push on, so fairbook puts
  a trainable ``Linear(D, D)`` projection before the head (its reading of a point the paper leaves open).

Paper against released code: the paper's recipe is AdamW with a cosine schedule (App. D); the released code runs
plain SGD (preset ``"fairmedfm-code"``) on a class-weighted cross-entropy, ``w_c = N / (2 n_c)``
(``class_weighted=True``). Both are offered; the default is the paper's. Images always go through the model's own
preprocess (open_clip: resized straight to the input size, CLIP statistics), which is the released code's; the
paper's resize to 256, centre crop to 224 and ImageNet statistics are not offered. The paper trains LAFTR at lr 3e-4;
fairbook trains every cell at the recipe's one lr, so that the cells differ only by their mitigation.

The recipe is the shared :class:`fairbook.train.TrainConfig` (:meth:`~fairbook.train.TrainConfig.preset`
``"fairmedfm"`` is the paper's: AdamW, cosine schedule, weight decay 0.05, lr 2.5e-4); every usage leaves its
frozen parts frozen (``trainable="as built"``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from fairbook.data.attributes import FILTER_ATTRIBUTES
from fairbook.methods.base import Claim, Method, MethodError
from fairbook.mitigations import LAFTR, RESAMPLE_BY, GroupDRO, cell_sampler, training_groups
from fairbook.models import ImageClassifier, PromptClassifier, add_lora
from fairbook.train import PROMPT_SETS, Classification, Contrastive, Objective, TrainConfig, class_embeddings

__all__ = ["CLAIMS", "MITIGATIONS", "USAGES", "FairMedFM", "grid"]

#: Usage -> what trains.
USAGES = {"zero-shot": "nothing: CLIP answers with its class prompts",
          "lp": "a linear head on the frozen image encoder", "clip-adapt": "the class prototypes of a frozen CLIP",
          "lora": "LoRA adapters on the image tower's attention, and a linear head",
          "ft": "the whole image tower and a linear head"}
#: Mitigation -> what it changes.
MITIGATIONS = {"erm": "nothing (mean loss)", "resampling": "the draw of training batches",
               "groupdro": "the loss: the worst groups weigh more",
               "laftr": "the representation: an adversary must not tell the groups apart"}
#: Names of the usages and mitigations in FairMedFM's tables ("LP", "LoRA+GroupDRO").
NAMES = {"zero-shot": "Zero-shot", "clip-adapt": "CLIP-Adapt", "lp": "LP", "lora": "LoRA", "ft": "FT",
         "erm": "", "resampling": "+Resampling", "groupdro": "+GroupDRO", "laftr": "+LAFTR"}


@dataclass(frozen=True)
class FairMedFM(Method):
    """One cell of FairMedFM's grid: a ``usage`` of the foundation model (module docstring) with a
    ``mitigation``, e.g. ``FairMedFM("LoRA + GroupDRO", usage="lora", mitigation="groupdro")``."""

    name: str = "LP"
    usage: str = "lp"
    mitigation: str = "erm"
    prompts: str = "fairmedfm"
    resample_by: str = "attribute x label"
    dro_eta: float = 0.01
    dro_adjustment: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_mlp: bool = False
    laftr_form: str = "dp"
    laftr_coefficient: float = 0.1
    laftr_hidden: int | None = None
    class_weighted: bool = False

    def __post_init__(self) -> None:
        self.require_known(usage=USAGES, mitigation=MITIGATIONS, resample_by=RESAMPLE_BY, prompts=PROMPT_SETS)
        if self.usage == "zero-shot" and self.mitigation != "erm":
            raise MethodError(f"{self.name}: zero-shot use trains nothing, so no mitigation applies; use "
                              "mitigation='erm'")
        if self.usage == "clip-adapt" and self.mitigation == "laftr":
            raise MethodError(f"{self.name}: LAFTR needs a representation that training can change; CLIP-Adapt "
                              "trains only the class prototypes. Use usage='lp', 'lora' or 'ft'")

    @property
    def uses_attribute(self) -> bool:
        return self.mitigation != "erm"

    @property
    def trains(self) -> bool:
        return self.usage != "zero-shot"

    def adapt(self, model: nn.Module, tokenizer=None) -> nn.Module:
        if self.usage == "zero-shot":
            return model
        if self.usage == "clip-adapt":
            if tokenizer is None:
                raise MethodError(f"{self.name}: CLIP-Adapt starts its prototypes from the class prompts and needs "
                                  "the tokenizer: adapt(model, tokenizer)")
            return PromptClassifier(model, class_embeddings(model, tokenizer, PROMPT_SETS[self.prompts]))
        visual = model.visual
        if self.usage == "lp":
            visual.requires_grad_(False)
        elif self.usage == "lora":
            visual = add_lora(visual, self.lora_rank, self.lora_alpha, mlp=self.lora_mlp)
        else:
            visual.requires_grad_(True)
        # a frozen encoder leaves LAFTR's adversary nothing to push on: a trainable projection before the head
        return ImageClassifier(visual, projection=self.usage == "lp" and self.mitigation == "laftr")

    def objective(self, model: nn.Module, train, attribute: str, seed: int, config: TrainConfig, tokenizer
                  ) -> Objective:
        if self.usage == "zero-shot":
            return Contrastive(tokenizer, PROMPT_SETS[self.prompts])
        weights = None
        if self.class_weighted:  # FairMedFM's released code: w_c = N / (2 n_c)
            counts = np.bincount(train.metadata["glaucoma"].to_numpy(), minlength=2)
            weights = (counts.sum() / (2 * np.maximum(counts, 1))).tolist()
        if self.mitigation not in ("groupdro", "laftr"):
            return Classification(class_weights=weights)
        lookup, counts = training_groups(train.metadata[attribute].to_numpy(), attribute)
        column = FILTER_ATTRIBUTES.index(attribute)
        if self.mitigation == "groupdro":
            dro = GroupDRO(len(counts), eta=self.dro_eta, adjustment=self.dro_adjustment, group_counts=counts)
            return Classification(dro, column=column, lookup=lookup, class_weights=weights)
        width = int(model.head.in_features)
        adversary = LAFTR(width, len(counts), self.laftr_form, self.laftr_coefficient, self.laftr_hidden)
        return Classification(column=column, adversary=adversary, lookup=lookup, class_weights=weights)

    def sampler(self, train, attribute: str, seed: int):
        if self.mitigation != "resampling":
            return None
        return cell_sampler(train.metadata, attribute, self.resample_by, seed)


def grid(usages=("lp", "lora"), mitigations=("erm",), **settings) -> list[FairMedFM]:
    """FairMedFM's cells, usage x mitigation, named as its Table 2 names them (``"LP"``, ``"LoRA+GroupDRO"``),
    every one with the same ``settings`` (fields of :class:`FairMedFM`, e.g. ``laftr_form="eo"``)."""
    return [FairMedFM(NAMES[u] + NAMES[m], usage=u, mitigation=m, **settings) for u in usages for m in mitigations]


_PAPER = "FairMedFM (Jin et al., NeurIPS 2024 D&B)"
#: FairMedFM's Table 2 findings on sex, as comparisons chapter 23 tests: LAFTR narrows LoRA's AUC gap (1.95 to 0.62
#: points), GroupDRO costs LoRA AUC (82.52 to 79.54), resampling does not (83.27).
CLAIMS = [
    Claim(_PAPER, "Table 2", "LAFTR narrows LoRA's sex gap in AUC", "23-fairmedfm-mitigations", "LoRA+LAFTR", "LoRA",
          "auc_delta"),
    Claim(_PAPER, "Table 2", "GroupDRO lowers LoRA's AUC", "23-fairmedfm-mitigations", "LoRA+GroupDRO", "LoRA",
          "auc", "worse"),
    Claim(_PAPER, "Table 2", "Resampling does not lower LoRA's AUC", "23-fairmedfm-mitigations", "LoRA+Resampling",
          "LoRA", "auc", "not worse"),
]
