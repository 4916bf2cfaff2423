"""Heads on top of an image encoder: a linear classifier for supervised fine-tuning, and a logistic regression on
frozen features whose regularisation is chosen on validation (the linear probe)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ImageClassifier", "fit_logistic"]


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
