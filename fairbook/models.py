"""Model factory: one code path for the tiny default CLIP and the real open_clip backbones.

``create_clip("fairbook-tiny")`` builds the small randomly initialised CLIP defined in
``fairbook/configs/fairbook-tiny.json``; ``create_clip("ViT-B-16", pretrained="openai")`` builds the CLIP of
the FairCLIP paper (Luo et al., CVPR 2024, which fine-tunes CLIP ViT-B/16). Both go through
``open_clip.create_model_and_transforms`` and ``open_clip.get_tokenizer``.
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from torch import nn

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)


class ModelError(ValueError):
    """An unknown model name or an unusable model argument."""


def pick_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def create_clip(name: str = "fairbook-tiny", pretrained: str | None = None, device: str | torch.device | None = None):
    """(model, preprocess_train, preprocess_val, tokenizer) for an open_clip model name.

    ``name`` is an open_clip architecture (``open_clip.list_models()``) or a config in fairbook/configs
    (``fairbook-tiny``); ``pretrained`` an open_clip weight tag or file (None = random initialisation).
    The preprocess functions take a PIL image (FairVLMed: mode "F") and return a normalised 3 x S x S tensor.
    """
    if ":" not in name and name not in open_clip.list_models():
        raise ModelError(f"unknown model {name!r}; use 'fairbook-tiny' or a name from open_clip.list_models()")
    device = torch.device(device) if device is not None else pick_device()
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device, output_dict=True)
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)


class ImageClassifier(nn.Module):
    """CLIP image encoder followed by a linear head: logits = W f(x) + b (supervised fine-tuning / linear probe).

    ``n_classes=1`` gives one logit for binary cross-entropy (glaucoma yes/no).
    """

    def __init__(self, visual: nn.Module, n_classes: int = 1):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(int(visual.output_dim), n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.visual(images))
        return logits.squeeze(-1) if logits.shape[-1] == 1 else logits


def fit_logistic(X_train, y_train, X_val, y_val, Cs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0)):
    """L2 logistic regression whose inverse regularisation ``C`` is chosen on VALIDATION AUC, never on test.

    Returns the model fitted on the training split with the chosen ``C``; its ``C`` attribute and ``val_auc_``
    (a dict C -> validation AUC) record the choice.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    fits = {C: LogisticRegression(C=C, max_iter=2000).fit(X_train, y_train) for C in Cs}
    scores = {C: roc_auc_score(y_val, m.predict_proba(X_val)[:, 1]) for C, m in fits.items()}
    best = fits[max(scores, key=scores.get)]
    best.val_auc_ = scores
    return best


__all__ = ["CONFIG_DIR", "ImageClassifier", "ModelError", "create_clip", "fit_logistic", "pick_device"]
