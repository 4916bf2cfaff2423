"""The one training loop (:func:`fit`) and its objectives: contrastive fine-tuning of CLIP on (SLO fundus image,
clinical note) pairs (:class:`Contrastive`) and cross-entropy on a classifier's logit (:class:`Classification`);
zero-shot scoring, features and the linear probe.

What the FairCLIP paper and code do (Luo et al., CVPR 2024; official repo Harvard-Ophthalmology-AI-Lab/FairCLIP),
and where fairbook departs from the code on purpose:

* Objective: the symmetric InfoNCE loss of CLIP (Radford et al., ICML 2021, Fig. 3),
  ``(CE(L_img, arange) + CE(L_txt, arange)) / 2`` with ``L_img = s * I T^T`` on L2-normalised features
  (:func:`clip_loss`). A fairness term plugs in through the ``regulariser`` hook of :class:`Contrastive`.
* Upstream recipe (:meth:`TrainConfig.preset` ``"fairclip"``): Adam, lr 1e-5, betas (0.1, 0.1), eps 1e-6,
  weight decay 6e-5, batch 32, 10 epochs, no schedule, only the image and text transformers trained
  (:func:`set_trainable` ``"transformers"``). Upstream keeps fp16 weights with an fp32 optimizer step; fairbook
  uses autocast + GradScaler instead, and only on CUDA.
* Model selection: upstream keeps the epoch with the best TEST AUC. fairbook never looks at the test split while
  training: the epoch is chosen on VALIDATION zero-shot AUC.
* Zero-shot scores (:func:`zero_shot_scores`): upstream takes ``softmax`` over the two raw cosines (no logit
  scale), which squeezes the probabilities towards 0.5: ``p = sigmoid(cos_pos - cos_neg)``, typically within
  0.45-0.55 because the two image-prompt cosines rarely differ by more than 0.2. fairbook multiplies the cosines
  by the learned logit scale, as CLIP's own zero-shot classifier does.
  ``use_logit_scale=False`` restores the upstream behaviour. AUC is identical either way (the positive-class
  probability is a monotone function of the cosine difference); thresholds, calibration and every
  thresholded fairness metric are not.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fairbook.files import temporary_sibling
from fairbook.models import fit_logistic, pick_device

__all__ = [
    "CLASSES", "FAIRCLIP_PROMPTS", "FAIRMEDFM_PROMPTS", "FAIRMEDFM_TEMPLATE", "PROMPT_SETS", "TRAINABLE_PARTS",
    "CheckpointError", "TrainConfig", "TrainError", "class_embeddings", "clip_loss", "extract_features",
    "Classification", "Contrastive", "Objective", "fit", "fit_and_score", "fusable", "group_numbers", "linear_probe",
    "load_checkpoint", "lr_factor", "regulariser_scale", "set_trainable", "validation_auc", "validation_criterion",
    "zero_shot_scores",
]

#: Class order of every prompt set and of the two-way softmax: index 1 is glaucoma.
CLASSES = ("negative", "positive")

#: Prompts of the official FairCLIP evaluation (one prompt per class).
FAIRCLIP_PROMPTS: dict[str, tuple[str, ...]] = {
    "negative": ("A photo of non-glaucoma",),
    "positive": ("A photo of glaucoma",),
}

#: FairMedFM's template for FairVLMed10k, filled with its class names {normal, glaucoma}.
FAIRMEDFM_TEMPLATE = "a scanning laser ophthalmoscope fundus image of a {}"
FAIRMEDFM_PROMPTS: dict[str, tuple[str, ...]] = {
    "negative": (FAIRMEDFM_TEMPLATE.format("normal"),),
    "positive": (FAIRMEDFM_TEMPLATE.format("glaucoma"),),
}

#: Named prompt sets, selectable by :attr:`TrainConfig.prompts`.
PROMPT_SETS: dict[str, dict[str, tuple[str, ...]]] = {"fairclip": FAIRCLIP_PROMPTS, "fairmedfm": FAIRMEDFM_PROMPTS}

_TEXT_TOWER = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")

#: Parameter-name prefixes that train for each choice of :func:`set_trainable` (open_clip ``CLIP`` names;
#: ``None`` = every parameter). ``"transformers"`` is the FairCLIP code's choice: its optimizer holds
#: ``model.transformer`` and ``model.visual`` only, so the token embedding, the text positional embedding,
#: ``ln_final``, the text projection and the logit scale stay at their pretrained values.
TRAINABLE_PARTS: dict[str, tuple[str, ...] | None] = {
    "as built": (),  # leave requires_grad as the method's model set it (a probe's frozen encoder, LoRA adapters)
    "all": None,
    "visual": ("visual.",),
    "text": _TEXT_TOWER,
    "transformers": ("visual.", "transformer."),
}

_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULES = ("none", "cosine")
_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature at 100 (Radford et al. 2021, Sec. 2.5)


class TrainError(ValueError):
    """A training or evaluation input that cannot be used; the message is one line naming the problem and fix."""


class CheckpointError(TrainError):
    """A checkpoint file that is missing, unreadable or does not fit the model."""


# ------------------------------------------------------------------------------------------------------------- loss
def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
              ) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3), the objective FairCLIP fine-tunes with.

    ``L = s * normalise(I) @ normalise(T)^T`` (an ``N x N`` matrix whose diagonal holds the matched pairs) and
    ``loss = (CE(L, arange(N)) + CE(L^T, arange(N))) / 2``. ``logit_scale`` is the multiplicative scale ``s``
    (``exp`` of the stored parameter), as open_clip's forward returns it. Computed in float32.
    """
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale * image @ text.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# ------------------------------------------------------------------------------------------------------ trainability
def set_trainable(model: nn.Module, parts: str = "all") -> int:
    """Set ``requires_grad`` so that only ``parts`` (a key of :data:`TRAINABLE_PARTS`) train; return how many
    parameters (elements) are trainable.

    ``"as built"``: the flags as the model was built with them (a method that freezes parts itself, e.g. a
    linear probe or LoRA). ``"all"``: everything, logit scale included. ``"visual"``: the image tower.
    ``"text"``: the text tower (token and positional embeddings, transformer, ``ln_final``, projection).
    ``"transformers"``: the upstream FairCLIP choice, the whole image tower plus the text transformer.
    """
    if parts not in TRAINABLE_PARTS:
        raise TrainError(f"unknown trainable parts {parts!r}: choose one of {', '.join(TRAINABLE_PARTS)}")
    prefixes = TRAINABLE_PARTS[parts]
    count = 0
    for name, param in model.named_parameters():
        if parts != "as built":
            param.requires_grad_(prefixes is None or name.startswith(prefixes))
        count += param.numel() if param.requires_grad else 0
    if count == 0:
        raise TrainError(f"trainable parts {parts!r} match no parameter of {type(model).__name__}: "
                         "use an open_clip CLIP model (visual, transformer, token_embedding, ...) or parts='all'")
    return count


# ----------------------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Settings of :func:`fit`. The defaults suit the randomly initialised ``fairbook-tiny`` CLIP (AdamW with
    a cosine schedule, the usual recipe for training CLIP from scratch); :meth:`preset` ``"fairclip"`` gives the
    upstream FairCLIP fine-tuning recipe.

    ``schedule``: ``"none"`` (constant lr) or ``"cosine"`` (linear warmup over ``warmup_steps`` optimizer steps,
    then cosine decay to 0 at the last step; see :func:`lr_factor`). ``optimizer``: ``"adam"`` (weight decay
    added to the gradient, as ``torch.optim.Adam`` and upstream), ``"adamw"`` (decoupled decay) or ``"sgd"`` (plain
    SGD without momentum, as FairMedFM's released code; ``betas`` and ``eps`` are then unused).
    ``epochs=0`` trains nothing: the starting model is scored and kept as "epoch 0" (zero-shot use).
    ``grad_clip``: max global gradient norm, or None. ``trainable``: see :func:`set_trainable`. ``prompts``: the
    :data:`PROMPT_SETS` entry used for the validation zero-shot AUC. ``amp``: mixed precision (fp16 autocast +
    GradScaler); ``None`` means on exactly when CUDA is used, and it is never used on CPU.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup_steps: int = 20
    grad_clip: float | None = 1.0
    trainable: str = "all"
    prompts: str = "fairclip"
    seed: int = 0
    num_workers: int = 0
    amp: bool | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        choices = {"optimizer": _OPTIMIZERS, "schedule": _SCHEDULES, "trainable": tuple(TRAINABLE_PARTS),
                   "prompts": tuple(PROMPT_SETS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainError(f"TrainConfig.{name}={getattr(self, name)!r} is not valid: "
                                 f"choose one of {', '.join(allowed)}")
        if int(self.epochs) < 0 or int(self.batch_size) < 1:
            raise TrainError(f"TrainConfig needs epochs >= 0 and batch_size >= 1 (got {self.epochs} and "
                             f"{self.batch_size})")
        if self.lr <= 0 or len(self.betas) != 2 or self.warmup_steps < 0 or self.num_workers < 0:
            raise TrainError("TrainConfig needs lr > 0, two betas, warmup_steps >= 0 and num_workers >= 0; "
                             f"got lr={self.lr}, betas={self.betas}, warmup_steps={self.warmup_steps}, "
                             f"num_workers={self.num_workers}")

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields changed, e.g. ``config.replace(seed=1)``."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str = "default", **overrides) -> TrainConfig:
        """A named recipe with field overrides, e.g. ``TrainConfig.preset("fairclip", epochs=2)``.

        ``"default"``: the class defaults (tiny CLIP from scratch). ``"fairclip"``: the official FairCLIP
        fine-tuning script (Adam, lr 1e-5, betas (0.1, 0.1), eps 1e-6, weight decay 6e-5, batch 32, 10 epochs,
        no scheduler, no gradient clipping, only the two transformers trained, FairCLIP prompts). ``"fairmedfm"``:
        FairMedFM's paper recipe (Jin et al., NeurIPS 2024 D&B, appendix D: AdamW with torch's betas and eps,
        cosine schedule, weight decay 0.05, lr 2.5e-4 for the linear probe, CLIP-Adapt, resampling and GroupDRO),
        with the parts each usage trains left as the method built them. ``"fairmedfm-code"``: the same with the
        optimizer FairMedFM's released code really uses, plain SGD without momentum (its ``--optimizer`` flag is
        ignored); its class-weighted cross-entropy is :class:`fairbook.methods.FairMedFM`'s ``class_weighted``.
        ``"multifair"``: MultiFair's released training settings (AdamW lr 3e-5, batch 32, 10 epochs, constant lr,
        gradient norm clipped at 0.8; its auxiliary heads' own lr is :class:`fairbook.methods.MultiFair`'s
        ``head_lr``), with torch's AdamW betas and weight decay 0.01, which the release does not change.
        ``"samed"``: FairMedFM's SAMed fine-tuning (App. D.2: AdamW, lr 0.005, batch 16), with torch's AdamW betas
        and weight decay 0.01 (not stated) and a cosine schedule after 10 warmup steps (SAMed warms up, then decays
        polynomially), the parts the segmentation method trains left as it built them.
        """
        presets = {
            "default": {},
            "fairclip": dict(epochs=10, batch_size=32, lr=1e-5, weight_decay=6e-5, betas=(0.1, 0.1), eps=1e-6,
                             optimizer="adam", schedule="none", warmup_steps=0, grad_clip=None,
                             trainable="transformers", prompts="fairclip"),
            "fairmedfm": dict(optimizer="adamw", lr=2.5e-4, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8,
                              schedule="cosine", warmup_steps=0, grad_clip=None, trainable="as built",
                              prompts="fairmedfm"),
            "fairmedfm-code": dict(optimizer="sgd", lr=2.5e-4, weight_decay=0.05, schedule="cosine", warmup_steps=0,
                                   grad_clip=None, trainable="as built", prompts="fairmedfm"),
            "multifair": dict(epochs=10, batch_size=32, optimizer="adamw", lr=3e-5, weight_decay=0.01,
                              betas=(0.9, 0.999), eps=1e-8, schedule="none", warmup_steps=0, grad_clip=0.8,
                              trainable="as built"),
            "samed": dict(batch_size=16, optimizer="adamw", lr=5e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8,
                          schedule="cosine", warmup_steps=10, grad_clip=None, trainable="as built"),
        }
        if name not in presets:
            raise TrainError(f"unknown TrainConfig preset {name!r}: choose one of {', '.join(presets)}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TrainError(f"unknown TrainConfig field(s) {', '.join(unknown)}: valid fields are "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**{**presets[name], **overrides})


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based) of the ``"cosine"`` schedule: linear warmup
    ``(step + 1) / warmup_steps``, then ``(1 + cos(pi * t)) / 2`` with ``t`` going from 0 to 1 over the remaining
    steps (open_clip's ``cosine_lr`` shape)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / decay)))


def _optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.0, weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
               fused=fusable(params))


def fusable(params: list[nn.Parameter]) -> bool | None:
    """Whether Adam(W) can run its fused kernel on ``params`` (one pass over each tensor instead of about ten; on
    the tiny CLIP's 9.1 M parameters a CPU step takes 8 ms instead of 83 ms, see bench/README.md). The fused
    update is the same arithmetic, rounded differently (parameters differ by ~1e-8 after a few steps). None (the
    default kernel) for parameters on other devices."""
    return True if params and all(p.device.type in ("cpu", "cuda") for p in params) else None


# ----------------------------------------------------------------------------------------------------- zero-shot
def _device_of(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is None:
        return next(model.parameters()).device
    device = torch.device(device)
    model.to(device)
    return device


def _autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda")


def _tokens(tokenizer, texts, device: torch.device) -> torch.Tensor:
    """Token ids on ``device``: batches of a dataset built with a tokenizer already hold them, raw strings do not."""
    tokens = texts if isinstance(texts, torch.Tensor) else tokenizer(list(texts))
    return tokens.to(device, non_blocking=True)


@torch.no_grad()
def class_embeddings(model: nn.Module, tokenizer, prompts: Mapping[str, Sequence[str]],
                     device: str | torch.device | None = None) -> torch.Tensor:
    """``2 x D`` unit-norm class embeddings, rows in :data:`CLASSES` order, from a prompt ensemble.

    Each class embedding is the mean of the L2-normalised text embeddings of its prompts, normalised again
    (CLIP's prompt ensembling, Radford et al. 2021, Sec. 3.1.4). One prompt per class gives its own embedding.
    """
    missing = [c for c in CLASSES if not prompts.get(c)]
    if missing or isinstance(prompts.get("positive"), str) or isinstance(prompts.get("negative"), str):
        raise TrainError(f"prompts need non-empty lists under {' and '.join(CLASSES)} "
                         f"(e.g. fairbook.train.FAIRCLIP_PROMPTS); got keys {sorted(prompts)}")
    device = _device_of(model, device)
    rows = []
    with _autocast(device):
        for name in CLASSES:
            features = model.encode_text(_tokens(tokenizer, prompts[name], device)).float()
            rows.append(F.normalize(F.normalize(features, dim=-1).mean(0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_scores(model: nn.Module, tokenizer, loader, prompts: Mapping[str, Sequence[str]],
                     device: str | torch.device | None = None, use_logit_scale: bool = True
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y_true, y_score, attributes)`` of a loader of FairVLMed items: glaucoma probability from class prompts.

    ``p = softmax(s * cos(image, class embeddings))[positive]`` with ``s = exp(model.logit_scale)`` and the class
    embeddings of :func:`class_embeddings` (FairMedFM's zero-shot: positive-class probability of a softmax over
    class prompts). ``use_logit_scale=False`` is the official FairCLIP evaluation, a softmax over the raw cosines:
    as cosines differ by at most 2, its scores lie within ``sigmoid(+-2)`` = [0.12, 0.88] and in practice close
    to 0.5. ``attributes`` is the code matrix of the items (race, gender, ethnicity, language, age).
    ``device=None`` uses the model's device. The model's train/eval mode is restored afterwards.
    """
    device = _device_of(model, device)
    was_training = model.training
    model.eval()
    try:
        classes = class_embeddings(model, tokenizer, prompts, device).float().cpu()
        scale = float(model.logit_scale.float().exp()) if use_logit_scale else 1.0
    finally:
        model.train(was_training)
    features, labels, attributes = extract_features(model, loader, device)
    logits = scale * torch.from_numpy(features) @ classes.T
    return labels, logits.softmax(-1)[:, 1].numpy().astype(np.float64), attributes


def validation_auc(model: nn.Module, tokenizer, loader, prompts: Mapping[str, Sequence[str]],
                   device: str | torch.device | None = None) -> float:
    """Zero-shot ROC AUC on a validation loader (:func:`validation_criterion` of :func:`zero_shot_scores`).

    Not finite (NaN) when the scores are not, e.g. after a diverged update.
    """
    return validation_criterion(*zero_shot_scores(model, tokenizer, loader, prompts, device)[:2])


def validation_criterion(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """What :func:`fit` keeps the epoch on: the ROC AUC of the validation scores; NaN when a score is not finite
    (a diverged update), so that such an epoch is never kept."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y_true)) < 2:
        raise TrainError("the validation split has only one class, so its AUC is undefined: "
                         "use a validation set with both glaucoma and non-glaucoma samples")
    if not np.isfinite(y_score).all():
        return float("nan")
    return float(roc_auc_score(y_true, y_score))


# ------------------------------------------------------------------------------------------------------- training
def _features(outputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image features, text features, logit scale) of an open_clip forward (dict or tuple output)."""
    if isinstance(outputs, Mapping):
        return outputs["image_features"], outputs["text_features"], outputs["logit_scale"]
    return outputs[0], outputs[1], outputs[2]


def _to(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _save_checkpoint(path: Path, payload: dict) -> None:
    """``torch.save`` through a temporary sibling and a rename (atomic; leftovers of killed saves are removed)."""
    tmp = temporary_sibling(path)
    torch.save(payload, tmp)
    os.replace(tmp, path)


class Objective:
    """What the one training loop (:func:`fit`) minimises and how it scores a split. Every method trains through
    one of these, so the loop, the epoch choice and the checkpointing are the same for all.

    ``loss(model, batch)`` returns ``(objective, extra)``: the scalar to minimise and the part of it that a method
    term or a mitigation added (None when nothing is added), kept in the training record as ``reg_loss``.
    ``scores(model, loader)`` returns ``(y, p, codes)`` for a loader of FairVLMed items: labels, glaucoma
    probabilities and the items' attribute codes; the epoch is kept on their validation AUC. ``parts()`` lists
    modules the objective owns (GroupDRO's group weights, a LAFTR adversary): :func:`fit` moves them to the device
    and trains their parameters with the model's.
    """

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def scores(self, model: nn.Module, loader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def parts(self) -> list[nn.Module]:
        return []

    def criterion(self, scores) -> float:
        """What the epoch is kept on, from :meth:`scores` of the validation split: the ROC AUC by default
        (:func:`validation_criterion`); a segmentation objective keeps the mean Dice. Not finite (NaN) marks a
        diverged epoch, which is never kept."""
        return validation_criterion(*scores[:2])

    def record(self) -> dict:
        """What the objective kept while training, for the model's training record (e.g. MultiFair's per-step
        modulation factors); JSON-able, empty by default."""
        return {}


class Contrastive(Objective):
    """CLIP's symmetric InfoNCE on (image, note) pairs (:func:`clip_loss`), plus a method's term
    ``regulariser(image_features, text_features, logit_scale, batch)`` when given (FairCLIP's Sinkhorn distance,
    Fair-MoE's FOL); scored zero-shot with the class ``prompts`` (:func:`zero_shot_scores`). Batch ``text`` holds
    token ids or raw strings (tokenised here)."""

    def __init__(self, tokenizer, prompts: Mapping[str, Sequence[str]],
                 regulariser: Callable[..., torch.Tensor] | None = None):
        self.tokenizer, self.prompts, self.regulariser = tokenizer, prompts, regulariser

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = _tokens(self.tokenizer, batch["text"], batch["image"].device)
        image, text, scale = _features(model(batch["image"], tokens))
        loss = clip_loss(image, text, scale)
        if self.regulariser is None:
            return loss, None
        reg = self.regulariser(image, text, scale, batch)
        return loss + reg, reg

    def scores(self, model: nn.Module, loader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return zero_shot_scores(model, self.tokenizer, loader, self.prompts)


class Classification(Objective):
    """Binary cross-entropy on a classifier's glaucoma logit (``model(images)`` gives one logit per image, e.g.
    :class:`fairbook.models.ImageClassifier`), scored with its sigmoid.

    A mitigation sees the batch's groups: the codes of the attribute in column ``column`` of
    ``batch["attributes"]``, mapped through ``lookup`` when given (``lookup[code]``, the unknown code -1 read as
    the last entry), e.g. to number only the groups a training draw has.

    * ``reduce(losses, groups)`` replaces the mean of the per-sample losses (ERM), e.g.
      :class:`~fairbook.mitigations.GroupDRO`;
    * ``class_weights`` ``(w_0, w_1)`` weigh each sample's loss by its label (FairMedFM's released code uses
      ``w_c = N / (2 n_c)``, :meth:`fairbook.methods.FairMedFM.objective` with ``class_weighted``);
    * ``adversary(features, groups, labels)`` adds a term computed from the model's representation
      (``model.features``, classified by ``model.classify``), e.g. :class:`~fairbook.mitigations.LAFTR`.

    Mitigations that are ``nn.Module`` s are moved and trained with the model (:meth:`Objective.parts`); the
    adversary's term is the training record's ``reg_loss``.
    """

    def __init__(self, reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 column: int | None = None, adversary: Callable[..., torch.Tensor] | None = None,
                 lookup: Sequence[int] | None = None, class_weights: Sequence[float] | None = None):
        if (reduce is not None or adversary is not None) and column is None:
            raise TrainError("Classification(reduce=... or adversary=...) needs column=, the attribute column "
                             "whose groups it uses (fairbook.data.FILTER_ATTRIBUTES.index(attribute))")
        self.reduce, self.column, self.adversary = reduce, column, adversary
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.lookup = None if lookup is None else torch.as_tensor(lookup, dtype=torch.long)

    def groups(self, batch: dict) -> torch.Tensor:
        """The batch's group numbers for the mitigations."""
        return group_numbers(batch["attributes"][:, self.column], self.lookup)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.adversary is None:
            logits = _logits(model, batch["image"], batch.get("text"))
        else:
            features = model.features(batch["image"])
            logits = model.classify(features)
        losses = F.binary_cross_entropy_with_logits(logits.float(), batch["label"].float(), reduction="none")
        if self.class_weights is not None:
            losses = losses * self.class_weights.to(losses.device)[batch["label"]]
        if self.reduce is None and self.adversary is None:
            return losses.mean(), None
        groups = self.groups(batch)
        loss = losses.mean() if self.reduce is None else self.reduce(losses, groups)
        if self.adversary is None:
            return loss, None
        term = self.adversary(features.float(), groups, batch["label"])
        return loss + term, term

    def scores(self, model: nn.Module, loader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probabilities, labels, attributes = _per_image(
            model, loader, _device_of(model, None),
            lambda images, text=None: torch.sigmoid(_logits(model, images, text).float()).cpu().numpy().astype(
                np.float64), with_text=getattr(model, "reads_text", False))
        return labels, probabilities, attributes

    def parts(self) -> list[nn.Module]:
        return [m for m in (self.reduce, self.adversary) if isinstance(m, nn.Module)]


def group_numbers(codes: torch.Tensor, lookup: torch.Tensor | None) -> torch.Tensor:
    """Group numbers of attribute ``codes`` through ``lookup`` (``lookup[code]``, the unknown code -1 read as the
    last entry, as :func:`fairbook.mitigations.training_groups` numbers them); the codes themselves without one."""
    if lookup is None:
        return codes
    lookup = lookup.to(codes.device)
    return lookup[torch.where(codes < 0, torch.full_like(codes, len(lookup) - 1), codes)]


def _logits(model: nn.Module, images: torch.Tensor, text=None) -> torch.Tensor:
    """A classifier's glaucoma logits: ``model(images)``, or ``model(images, text)`` for a model that also reads
    the note (``reads_text``, e.g. :class:`fairbook.models.FusionClassifier`)."""
    return model(images, text) if getattr(model, "reads_text", False) else model(images)


def fit(model: nn.Module, train_ds, val_ds, config: TrainConfig, out_dir: str | os.PathLike,
        objective: Objective, sampler: torch.utils.data.Sampler | None = None, progress: bool = True) -> dict:
    """The one training loop: minimise ``objective`` on ``train_ds``, keeping the epoch with the best VALIDATION
    AUC of ``objective.scores`` on ``val_ds`` (:meth:`Objective.criterion`: the mean Dice for segmentation).

    Batches come from a shuffled loader seeded with ``config.seed``, or from ``sampler`` when given (e.g. the
    group-balanced resampler of :mod:`fairbook.mitigations`). ``config`` sets the optimiser, schedule, gradient
    clipping, mixed precision and which parameters train (:func:`set_trainable`); the objective's own modules
    (:meth:`Objective.parts`) train too. After each epoch (numbered from 1) the validation split is scored; when
    its AUC beats every earlier epoch (ties keep the earlier one) the model is saved atomically to
    ``out_dir/best.pt`` (``state_dict``, ``config``, ``epoch``, ``val_auc``), which is loaded back into ``model``
    at the end. With ``config.epochs == 0`` nothing trains: the start is scored and kept as epoch 0.

    Unlike the official FairCLIP script, which keeps the epoch with the best TEST AUC (and FairMedFM's, which
    reports the last epoch), the test split is never used here. Runs on :func:`fairbook.models.pick_device`;
    fp16 autocast + GradScaler only on CUDA. A trainable ``logit_scale`` is clamped to at most 100 after each
    step, as in CLIP. The ``requires_grad`` flags are left as ``config.trainable`` set them.

    Returns ``{"history": [{"epoch", "train_loss", "reg_loss", "val_auc", "seconds"}], "best_epoch",
    "best_val_auc", "checkpoint", "trainable_params", "steps", "device", "val_scores"}`` (``val_scores``: the
    kept epoch's validation ``(y, p, codes)``); ``train_loss`` is the mean objective, ``reg_loss`` the mean of
    the part a method term or mitigation added (0 without one); ``val_auc`` holds the objective's criterion (the
    mean Dice for segmentation); ``objective`` is :meth:`Objective.record` when it kept anything.
    """
    from tqdm.auto import tqdm

    device = pick_device()
    model.to(device)
    for part in objective.parts():
        part.to(device)
    torch.manual_seed(config.seed)
    if not config.epochs:   # the start is scored as it is: nothing needs to train (a frozen zero-shot model)
        config = config.replace(trainable="as built")
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        n_trainable = set_trainable(model, config.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    params += [p for part in objective.parts() for p in part.parameters() if p.requires_grad]
    optimizer = _optimizer(params, config) if params else None
    cuda = device.type == "cuda"
    amp = cuda and config.amp is not False
    loader_args = dict(batch_size=config.batch_size, num_workers=config.num_workers, pin_memory=cuda)
    if sampler is None:
        train_loader = DataLoader(train_ds, shuffle=True, generator=torch.Generator().manual_seed(config.seed),
                                  **loader_args)
    else:
        train_loader = DataLoader(train_ds, sampler=sampler, **loader_args)
    val_loader = DataLoader(val_ds, shuffle=False, **loader_args)
    total_steps = config.epochs * len(train_loader)
    scheduler = None
    if config.schedule == "cosine" and optimizer is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total_steps, config.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / "best.pt"
    clamp_scale = getattr(model, "logit_scale", None)
    clamp_scale = clamp_scale if isinstance(clamp_scale, nn.Parameter) and clamp_scale.requires_grad else None

    history: list[dict] = []
    best_epoch, best_auc = None, -math.inf
    for epoch in range(1, config.epochs + 1) if config.epochs else [0]:  # epochs=0: the start, untrained
        start = time.perf_counter()
        loss_sum = reg_sum = 0.0
        if epoch:
            model.train()
            bar = tqdm(train_loader, desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
            for batch in bar:
                batch = _to(batch, device)
                with _autocast(device, amp):
                    loss, extra = objective.loss(model, batch)
                    if extra is not None:
                        reg_sum += float(extra.detach())
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                if scheduler is not None:
                    scheduler.step()
                if clamp_scale is not None:
                    with torch.no_grad():
                        clamp_scale.clamp_(0.0, _MAX_LOGIT_SCALE)
                value = float(loss.detach())
                loss_sum += value
                bar.set_postfix(loss=f"{value:.4f}")
        val_scores = objective.scores(model, val_loader)
        val = objective.criterion(val_scores)
        n_batches = max(1, len(train_loader))
        history.append({"epoch": epoch, "train_loss": loss_sum / n_batches if epoch else math.nan,
                        "reg_loss": reg_sum / n_batches,
                        "val_auc": val, "seconds": time.perf_counter() - start})
        if math.isfinite(val) and val > best_auc:
            best_epoch, best_auc, best_scores = epoch, val, val_scores
            _save_checkpoint(checkpoint, {"state_dict": model.state_dict(), "config": dataclasses.asdict(config),
                                          "epoch": epoch, "val_auc": val})
    if best_epoch is None:
        raise TrainError("no epoch gave a finite validation AUC (training diverged): lower TrainConfig.lr or set "
                         "grad_clip, then train again")
    load_checkpoint(checkpoint, model)
    return {"history": history, "best_epoch": best_epoch, "best_val_auc": best_auc, "checkpoint": str(checkpoint),
            "trainable_params": n_trainable, "steps": total_steps, "device": str(device), "val_scores": best_scores,
            **({"objective": kept} if (kept := objective.record()) else {})}


def regulariser_scale(model: nn.Module, dataset, hooks: Mapping[str, object], batch_size: int = 32,
                      seed: int = 0) -> pd.DataFrame:
    """Size of each loss hook against the contrastive loss on one shuffled training batch, before training: a check
    of the scale of a regulariser's weight (FairCLIP's lambda, FOL's weights).

    ``hooks``: name (e.g. the attribute) -> ``hook(image_features, text_features, logit_scale, batch)`` as
    :class:`Contrastive` calls it. One row per hook: ``clip_loss``, ``regulariser``, ``share`` =
    regulariser / clip_loss, plus the hook's ``last_terms`` (e.g. FOL's ``F_EI`` ...) when it records them.
    The model's train/eval mode is left as it is. The batch, its augmentation and any sampling inside the hooks
    draw from generators seeded with ``seed`` (the global torch state is restored afterwards), so the table is
    the same at every execution for the same model.
    """
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        batch = next(iter(DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                     generator=torch.Generator().manual_seed(seed))))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        image, text, scale = _features(model(batch["image"], batch["text"]))
        contrastive = float(clip_loss(image, text, scale).detach())
        rows = []
        for name, hook in hooks.items():
            value = float(hook(image, text, scale, batch).detach())
            rows.append({"name": name, "clip_loss": contrastive, "regulariser": value, "share": value / contrastive,
                         **getattr(hook, "last_terms", {})})
    return pd.DataFrame(rows)


def fit_and_score(model: nn.Module, train_ds, val_ds, test_ds, config: TrainConfig, out_dir: str | os.PathLike,
                  objective: Objective, sampler: torch.utils.data.Sampler | None = None,
                  progress: bool = False) -> dict:
    """:func:`fit`, then the objective's scores of the kept epoch on the validation and test splits: one seed of
    one method in every chapter that trains.

    Returns :func:`fit`'s dict plus ``scores = {"validation": (y, p, codes), "test": (y, p, codes)}``, ready for
    :func:`fairbook.results.save` (the validation scores are those the kept epoch was chosen with). The test split
    is scored once, after training; nothing in the training or the epoch choice reads it. ``test_ds=None`` scores
    validation only (a model trained to choose a setting).
    """
    fit_result = fit(model, train_ds, val_ds, config, out_dir, objective, sampler, progress)
    fit_result["scores"] = {"validation": fit_result.pop("val_scores")}
    if test_ds is not None:
        fit_result["scores"]["test"] = objective.scores(model, DataLoader(test_ds, batch_size=64))
    return fit_result


def load_checkpoint(path: str | os.PathLike, model: nn.Module) -> dict:
    """Load a :func:`fit` checkpoint into ``model`` (``torch.load(weights_only=True)``, strict key and shape
    check) and return its metadata ``{"epoch", "val_auc", "config"}``.

    A missing, corrupt or incompatible file raises :class:`CheckpointError` with one line naming it and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train with fairbook.train.fit (it writes "
                              "out_dir/best.pt) or give the path of an existing best.pt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch raise many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path} ({type(exc).__name__}): the file is corrupt, "
                              "truncated or not a torch checkpoint; delete it and train again") from None
    state = payload.get("state_dict") if isinstance(payload, dict) else None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} is not a fairbook checkpoint (no state_dict entry): give a best.pt written "
                              "by fairbook.train.fit")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        problems = [f"{label} {len(keys)} (e.g. {keys[0]})" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)) if keys]
        raise CheckpointError(f"checkpoint {path} does not fit this {type(model).__name__} "
                              f"({'; '.join(problems)} tensors): create the model with the architecture it was "
                              "trained with, or train again")
    model.load_state_dict(state)
    return {key: payload.get(key) for key in ("epoch", "val_auc", "config")}


# --------------------------------------------------------------------------------------------------- linear probe
@torch.no_grad()
def extract_features(model: nn.Module, loader, device: str | torch.device | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X, y, attributes)``: L2-normalised ``model.encode_image`` features (float32, ``n x D``) of a loader of
    FairVLMed items, with their labels and attribute codes. The model's train/eval mode is restored."""
    device = _device_of(model, device)
    return _per_image(model, loader, device,
                      lambda images: F.normalize(model.encode_image(images).float(), dim=-1).cpu().numpy())


@torch.no_grad()
def _per_image(model: nn.Module, loader, device: torch.device, compute: Callable[..., np.ndarray],
               with_text: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``compute(images)`` (``compute(images, text)`` with ``with_text``) on every batch of a loader of FairVLMed
    items, in eval mode (restored afterwards) and under autocast on CUDA: ``(outputs, labels, attribute codes)``
    concatenated over the batches."""
    was_training = model.training
    model.eval()
    outputs, labels, attributes = [], [], []
    try:
        for batch in loader:
            inputs = [batch["image"].to(device, non_blocking=True)]
            if with_text:
                text = batch["text"]
                inputs.append(text.to(device, non_blocking=True) if isinstance(text, torch.Tensor) else text)
            with _autocast(device):
                outputs.append(compute(*inputs))
            labels.append(np.asarray(batch["label"]))
            attributes.append(np.asarray(batch["attributes"]))
    finally:
        model.train(was_training)
    if not outputs:
        raise TrainError("got an empty loader: give a DataLoader over a non-empty split")
    return np.concatenate(outputs), np.concatenate(labels), np.concatenate(attributes)


def linear_probe(model: nn.Module, train_loader, val_loader, test_loader,
                 Cs: Sequence[float] = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0),
                 device: str | torch.device | None = None) -> dict:
    """Linear probe on frozen CLIP image features (the linear-probe protocol of CLIP, Radford et al. 2021,
    Sec. 3.2, and of FairMedFM): an L2 logistic regression on normalised ``encode_image`` features whose ``C``
    is chosen by VALIDATION AUC (:func:`fairbook.models.fit_logistic`), never on test.

    The default ``Cs`` are larger than ``fit_logistic``'s because unit-norm features have small coordinates.
    Returns ``{"C", "val_auc_by_C", "classifier", "val": {...}, "test": {...}}`` where ``val`` and ``test`` hold
    ``y_true``, ``y_score`` (glaucoma probability) and ``attributes`` (codes), ready for :func:`save_predictions`.
    """
    X_train, y_train, _ = extract_features(model, train_loader, device)
    X_val, y_val, a_val = extract_features(model, val_loader, device)
    X_test, y_test, a_test = extract_features(model, test_loader, device)
    clf = fit_logistic(X_train, y_train, X_val, y_val, Cs)
    return {
        "C": float(clf.C), "val_auc_by_C": dict(clf.val_auc_), "classifier": clf,
        "val": {"y_true": y_val, "y_score": clf.predict_proba(X_val)[:, 1], "attributes": a_val},
        "test": {"y_true": y_test, "y_score": clf.predict_proba(X_test)[:, 1], "attributes": a_test},
    }


