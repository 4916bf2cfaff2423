"""Segmentation fairness with the Segment Anything Model (FairMedFM, Jin et al., NeurIPS 2024 D&B: Sec. 3.2, App.
D.2 and Table 2's segmentation rows; FEBS from Harvard-FairSeg, Tian et al., ICLR 2024), declared once and trained
through the one loop (:func:`fairbook.train.fit`) by :func:`fairbook.protocol.train_segmentation`.

Usages (``usage``):

* ``"zero-shot"``: SAM as it starts answers a prompt made from the ground-truth mask of ``structure``
  (``prompt``: centre point, one random point, five random points or the bounding box,
  :data:`fairbook.segmentation.PROMPTS`). Nothing trains: the protocol scores the start (``epochs=0``);
* ``"samed"``: SAMed fine-tuning (Zhang & Liu, 2023; FairMedFM's "SAMed" rows): LoRA of rank ``lora_rank`` on the
  image encoder's ``qkv`` projections (peft) and the mask decoder tuned, the prompt encoder frozen;
* ``"full"``: every weight trains, the prompt encoder included. fairbook uses it to make the tiny SAM's pretrained
  start on a separate synthetic corpus (chapter 15), standing in for SAM's own pretraining.

Mitigations (``mitigation``, with ``"samed"``), for the training attribute:

* ``"erm"``: SAMed's loss ``0.2 CE + 0.8 Dice``;
* ``"febs"``: FEBS (:func:`fairbook.segmentation.losses.febs_loss`): group weights ``tanh((min_a L_a / L_g)^γ)``
  on the predictions inside the Dice term, ``γ = febs_gamma``; the minimum runs over the groups present in the
  batch, and ``faithful_to_code=True`` is FairSeg's released behaviour (a group absent from the batch zeroes every
  weight);
* ``"resampling"``: batches balanced over the attribute's groups (:func:`fairbook.mitigations.cell_sampler`
  ``by="attribute"``: a case has no class label to cross the groups with);
* ``"ind"``: InD, one mask decoder per group, each started from the pretrained decoder (``decoders``: one per code
  of the attribute, the unknown code included; :func:`grid` sets it).

The protocol trains on ``train_prompt`` (``"mixed"``: each case draws one of the four prompts) and scores
validation and test with ``prompt``; the Dice is computed at the model's input size (FairMedFM computes it at the
image's own resolution).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from fairbook.data.attributes import ATTRIBUTES, FILTER_ATTRIBUTES, UNKNOWN
from fairbook.methods.base import Claim, Method, MethodError
from fairbook.mitigations import cell_sampler, training_groups
from fairbook.segmentation.prompts import PROMPTS
from fairbook.segmentation.training import STRUCTURES, PromptedSAM, Segmentation
from fairbook.train import Objective, TrainConfig

__all__ = ["CLAIMS", "MITIGATIONS", "NAMES", "SAM", "USAGES", "grid", "zero_shot"]

#: Usage -> what trains.
USAGES = {"zero-shot": "nothing: SAM answers the prompt as it starts",
          "samed": "LoRA on the image encoder's qkv and the mask decoder (SAMed)",
          "full": "every weight (the pretrained start)"}
#: Mitigation -> what it changes.
MITIGATIONS = {"erm": "nothing (SAMed's loss)", "febs": "the Dice term: FEBS group weights",
               "resampling": "the draw of training batches", "ind": "the decoder: one per group"}
#: Names in FairMedFM's Table 2.
NAMES = {"erm": "SAMed", "febs": "SAMed+FEBS", "resampling": "SAMed+Resampling", "ind": "SAMed+InD"}


@dataclass(frozen=True)
class SAM(Method):
    """One segmentation model of FairMedFM's grid (module docstring), e.g.
    ``SAM("SAMed+FEBS", usage="samed", mitigation="febs")``."""

    name: str = "SAM"
    usage: str = "zero-shot"
    mitigation: str = "erm"
    structure: str = "cup"
    prompt: str = "box"
    train_prompt: str = "box"
    lora_rank: int = 4
    decoders: int = 1
    febs_gamma: float = 1.0
    dice_weight: float = 0.8
    faithful_to_code: bool = False

    def __post_init__(self) -> None:
        self.require_known(usage=USAGES, mitigation=MITIGATIONS, prompt=(*PROMPTS, "mixed"),
                           train_prompt=(*PROMPTS, "mixed"))
        if any(part not in STRUCTURES for part in self.structure.split("+")):
            raise MethodError(f"{self.name}: structure={self.structure!r} is not known; choose from "
                              f"{', '.join(STRUCTURES)} (or join them with '+')")
        if self.usage != "samed" and self.mitigation != "erm":
            raise MethodError(f"{self.name}: the mitigations apply to SAMed fine-tuning; use usage='samed' or "
                              "mitigation='erm'")
        if (self.mitigation == "ind") != (self.decoders > 1):
            raise MethodError(f"{self.name}: InD needs one decoder per group (decoders > 1) and only InD has more "
                              "than one; build it with fairbook.methods.sam.grid(attribute)")

    @property
    def uses_attribute(self) -> bool:
        return self.mitigation != "erm"

    @property
    def trains(self) -> bool:
        return self.usage != "zero-shot"

    @property
    def seed_free(self) -> bool:
        """True when every seed gives the same result: the start answering a prompt that involves no draw (the
        centre or the box; :func:`fairbook.protocol.segmentation_grid` then scores one seed and copies it)."""
        return not self.trains and self.prompt in ("centre", "box")

    def adapt(self, model: nn.Module, tokenizer=None) -> nn.Module:
        """The :class:`~fairbook.segmentation.training.PromptedSAM` to train from a ``transformers.SamModel``."""
        if self.usage == "full":
            wrapped = PromptedSAM(model)
            model.requires_grad_(True)
            return wrapped
        return PromptedSAM(model, lora_rank=self.lora_rank if self.usage == "samed" else None,
                           train_decoder=self.usage == "samed", decoders=self.decoders)

    def objective(self, model: nn.Module, train, attribute: str, seed: int, config: TrainConfig, tokenizer=None
                  ) -> Objective:
        losses = dict(dice_weight=self.dice_weight)
        if self.mitigation not in ("febs", "ind"):
            return Segmentation(**losses)
        column = FILTER_ATTRIBUTES.index(attribute)
        if self.mitigation == "ind":   # every code has its decoder: codes in order, unknown last
            n_groups = _groups_with_unknown(attribute)
            if self.decoders != n_groups:
                raise MethodError(f"{self.name}: {attribute} has {n_groups} groups (unknown included) but the "
                                  f"model has {self.decoders} decoders; build it with grid({attribute!r})")
            return Segmentation(column=column, lookup=np.arange(n_groups), n_groups=n_groups, **losses)
        lookup, counts = training_groups(train.metadata[attribute].to_numpy(), attribute)
        return Segmentation(febs=True, column=column, lookup=lookup, n_groups=len(counts), gamma=self.febs_gamma,
                            faithful_to_code=self.faithful_to_code, **losses)

    def sampler(self, train, attribute: str, seed: int):
        return cell_sampler(train.metadata, attribute, "attribute", seed) if self.mitigation == "resampling" else None


def _groups_with_unknown(attribute: str) -> int:
    """The attribute's known codes plus the unknown code, as :func:`fairbook.mitigations.training_groups` counts."""
    return len([c for c in ATTRIBUTES[attribute] if c != UNKNOWN]) + 1


def grid(attribute: str, mitigations=tuple(NAMES), **settings) -> list[SAM]:
    """FairMedFM's segmentation rows for ``attribute``, SAMed and its mitigations named as Table 2 names them,
    every one with the same ``settings`` (fields of :class:`SAM`); InD gets one decoder per group."""
    n_groups = _groups_with_unknown(attribute)
    return [SAM(NAMES[m], usage="samed", mitigation=m, decoders=n_groups if m == "ind" else 1, **settings)
            for m in mitigations]


def zero_shot(structures=("disc", "cup"), prompts=tuple(PROMPTS)) -> list[SAM]:
    """The pretrained start answering each prompt for each structure (FairMedFM's Fig. 4c), named
    ``"SAM <structure>, <prompt>"``."""
    return [SAM(f"SAM {s}, {p}", structure=s, prompt=p) for s in structures for p in prompts]


_PAPER = "FairMedFM (Jin et al., NeurIPS 2024 D&B)"
_CHAPTER = "15-segmentation-fairness"
#: FairMedFM's segmentation findings (Table 2, HAM10000, sex), as comparisons chapter 15 tests: SAMed fine-tuning
#: lifts the Dice of prompted SAM (83.55 to 90.92); FEBS narrows SAMed's gap (DSC_Δ 0.10 to 0.02) and resampling
#: keeps its Dice (90.92 to 91.51); InD lowers it (88.85).
CLAIMS = [
    Claim(_PAPER, "Table 2", "SAMed fine-tuning lifts prompted SAM's Dice", _CHAPTER, "SAMed", "SAM cup, box", "dsc"),
    Claim(_PAPER, "Table 2", "FEBS narrows SAMed's group gap in Dice", _CHAPTER, "SAMed+FEBS", "SAMed",
          "dsc_delta"),
    Claim(_PAPER, "Table 2", "Resampling does not lower SAMed's Dice", _CHAPTER, "SAMed+Resampling", "SAMed", "dsc",
          "not worse"),
    Claim(_PAPER, "Table 2", "Per-group decoders (InD) lower SAMed's Dice", _CHAPTER, "SAMed+InD", "SAMed", "dsc",
          "worse"),
]
