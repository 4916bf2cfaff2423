"""CLIP fine-tuned contrastively: the baseline every method of the handbook is measured against (chapter 11).

The model is a pretrained CLIP (Radford et al., ICML 2021), fine-tuned on (fundus image, note summary) pairs with
CLIP's symmetric InfoNCE loss (Fig. 3 of that paper), as the FairCLIP paper's baseline (Luo et al., CVPR 2024,
Table 2). It uses no sensitive attribute, so one model serves every attribute's comparison.
"""
from __future__ import annotations

from dataclasses import dataclass

from fairbook.methods.base import Method

__all__ = ["CLIP"]


@dataclass(frozen=True)
class CLIP(Method):
    """Plain contrastive fine-tuning: nothing added to the model or the loss."""

    name: str = "CLIP"
