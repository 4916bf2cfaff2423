"""Heads on top of an image encoder: a linear classifier for supervised fine-tuning and the linear probe, CLIP-Adapt's
trainable class prototypes, and a logistic regression on frozen features whose regularisation is chosen on
validation (the scikit-learn linear probe)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fairbook.models.clip import ModelError

__all__ = ["ImageClassifier", "PromptClassifier", "fit_logistic"]


class ImageClassifier(nn.Module):
    """CLIP image encoder followed by a linear head: logits = W z + b with the representation z = f(x)
    (supervised fine-tuning, LoRA, the linear probe).

    ``projection=True`` puts a trainable ``Linear(D, D)`` between encoder and head, z = P f(x): with a frozen
    encoder it gives an adversary on z something upstream to push on (LAFTR on a linear probe, fairbook's reading
    of a point FairMedFM leaves open). ``n_classes=1`` gives one logit for binary cross-entropy (glaucoma yes/no).

    The head starts at zero (weights and bias), so its first steps move it along the difference between the
    classes' features instead of having to undo a random start: with Adam each weight moves about ``lr`` per step,
    and at FairMedFM's lr of 2.5e-4 the few steps of the CPU default cannot overturn a random start of size
    1/sqrt(D) (a randomly started linear probe stayed near or below chance at 2 of 3 seeds).
    """

    def __init__(self, visual: nn.Module, n_classes: int = 1, projection: bool = False):
        super().__init__()
        self.visual = visual
        width = int(visual.output_dim)
        self.projection = nn.Linear(width, width) if projection else None
        self.head = nn.Linear(width, n_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The representation z the head classifies (and an adversary sees)."""
        z = self.visual(images)
        return self.projection(z) if self.projection is not None else z

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.head(features)
        return logits.squeeze(-1) if logits.shape[-1] == 1 else logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images))


class PromptClassifier(nn.Module):
    """CLIP-Adapt as FairMedFM uses it (Jin et al., FairMedFM, NeurIPS 2024 Datasets and Benchmarks, Sec. 3.2):
    the class-text embeddings become trainable prototypes, the CLIP model stays frozen, and cross-entropy runs on
    the scaled cosine logits ``s * cos(f(x), t_c)`` with CLIP's logit scale ``s``.

    ``prototypes``: the ``2 x D`` starting class embeddings, rows (negative, positive), e.g.
    :func:`fairbook.train.class_embeddings` of a prompt set. The forward returns one logit per image, the
    difference ``s cos(f, t_+) - s cos(f, t_-)``: its sigmoid is the positive class's softmax probability over
    the two classes, so binary cross-entropy on it equals the two-class cross-entropy.
    """

    def __init__(self, clip: nn.Module, prototypes: torch.Tensor):
        super().__init__()
        if prototypes.ndim != 2 or prototypes.shape[0] != 2:
            raise ModelError(f"PromptClassifier needs 2 x D class prototypes (negative, positive), got shape "
                             f"{tuple(prototypes.shape)}")
        self.clip = clip
        self.clip.requires_grad_(False)
        self.prototypes = nn.Parameter(prototypes.detach().clone().float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        logits = self.clip.logit_scale.exp().float() * features @ F.normalize(self.prototypes, dim=-1).T
        return logits[:, 1] - logits[:, 0]


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
