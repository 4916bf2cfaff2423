"""Prompted segmentation on the one training loop (:func:`fairbook.train.fit`): SAM answering a prompt made from
each case's ground-truth mask, its fine-tuning as SAMed does it, and FairMedFM's segmentation mitigations.

* :class:`PromptedCases` wraps a :class:`fairbook.data.FairSeg` split: each item gains the binary ``target`` of
  one structure (``"disc"``, ``"cup"`` or ``"rim"``; FairSeg's classes are rim and cup) and the prompt
  (:func:`fairbook.segmentation.make_prompt`) made from that target at the model's input size, seeded per case.
* :class:`PromptedSAM` runs ``transformers.SamModel`` on the prompts and returns one mask logit per pixel at the
  input size. SAMed-style fine-tuning (Zhang & Liu, "Customized Segment Anything Model for Medical Image
  Segmentation", 2023; FairMedFM's "SAMed" rows) puts LoRA on the image encoder's ``qkv`` projections (peft) and
  tunes the mask decoder; the prompt encoder stays frozen. InD (FairMedFM's "+InD") gives each group its own mask
  decoder (``decoders=n_groups``), each started from the same pretrained decoder.
* :class:`Segmentation` is the objective: SAMed's loss ``0.2 CE + 0.8 Dice`` on the two classes (background,
  structure), or FEBS's (:func:`fairbook.segmentation.losses.febs_loss`), and the epoch kept on the mean
  validation Dice. Resampling is :func:`fairbook.mitigations.cell_sampler` over the attribute's groups
  (``by="attribute"``: segmentation cases have no class label to cross them with).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fairbook.models.adapters import add_lora
from fairbook.segmentation.losses import dice_ce_loss, febs_loss
from fairbook.segmentation.metrics import dice, iou
from fairbook.segmentation.prompts import PROMPTS, make_prompt
from fairbook.train import Objective, group_numbers

__all__ = ["POINT_SLOTS", "STRUCTURES", "PromptedCases", "PromptedSAM", "Segmentation", "structure_mask"]

#: Structures a prompt can target, from FairSeg's classes (0 background, 1 rim, 2 cup).
STRUCTURES = {"disc": (1, 2), "cup": (2,), "rim": (1,)}


def structure_mask(mask, structure: str):
    """The binary mask of ``structure`` (a key of :data:`STRUCTURES`) in a FairSeg class mask (array or tensor)."""
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}: choose one of {', '.join(STRUCTURES)}")
    classes = STRUCTURES[structure]
    if isinstance(mask, torch.Tensor):
        return torch.isin(mask, torch.tensor(classes, device=mask.device))
    return np.isin(mask, classes)


#: Point slots of every item: the most points a prompt has (five); unused slots carry SAM's padding label -10.
POINT_SLOTS = 5


class PromptedCases(torch.utils.data.Dataset):
    """A FairSeg split with one structure's target and a prompt per case (module docstring).

    ``structure``: a key of :data:`STRUCTURES`, or several joined by ``+`` (``"disc+cup"``: every case appears once
    per structure, item ``k * i + j`` being case ``i`` with structure ``j``; a pretraining corpus that teaches both).
    ``prompt``: a key of :data:`fairbook.segmentation.PROMPTS`, or ``"mixed"`` (each item draws one of them, as
    SAM is trained with boxes and clicks alike). The prompt of item ``i`` is drawn with the seed ``(seed, i)``, the
    same at every epoch and run. Every item carries ``box`` (4), ``points`` (5 x 2), ``point_labels`` (5; 1 a
    click, -10 an unused slot) and ``use_box``, so that cases with different prompts share a batch. A case whose
    structure is empty gets the whole image as its box (a prompt that points at nothing in particular). Items are
    deterministic, so when ``cases`` keeps its items in memory (``FairSeg(keep_items=True)``) these are kept too.
    """

    def __init__(self, cases, structure: str = "disc", prompt: str = "box", seed: int = 0):
        if prompt not in (*PROMPTS, "mixed"):
            raise ValueError(f"unknown prompt {prompt!r}: choose one of {', '.join(PROMPTS)} or mixed")
        self.structures = structure.split("+")
        for name in self.structures:
            structure_mask(np.zeros(1), name)
        self.cases, self.structure, self.prompt, self.seed = cases, structure, prompt, seed
        k = len(self.structures)
        self.metadata = cases.metadata.iloc[np.repeat(np.arange(len(cases)), k)].reset_index(drop=True)
        self._kept: dict[int, dict] | None = {} if getattr(cases, "keeps_items", False) else None

    def __len__(self) -> int:
        return len(self.cases) * len(self.structures)

    def __getitem__(self, index: int) -> dict:
        if self._kept is not None and index in self._kept:
            return dict(self._kept[index])
        item = self._prompted(index)
        if self._kept is not None:
            self._kept[index] = item
        return dict(item)

    def _prompted(self, index: int) -> dict:
        case, part = divmod(index, len(self.structures))
        item = dict(self.cases[case])
        target = structure_mask(item.pop("mask"), self.structures[part])
        item["target"] = target.float()
        rng = np.random.default_rng((self.seed, index))
        kind = self.prompt if self.prompt != "mixed" else list(PROMPTS)[int(rng.integers(len(PROMPTS)))]
        size = target.shape[-1]
        if target.any():
            prompt = make_prompt(kind, target.numpy(), rng)
        else:
            prompt = {"box": np.array([0, 0, size - 1, size - 1])}
        points, labels = np.zeros((POINT_SLOTS, 2)), np.full(POINT_SLOTS, -10)
        if "points" in prompt:
            points[:len(prompt["points"])], labels[:len(prompt["points"])] = prompt["points"], prompt["labels"]
        item.update(box=torch.as_tensor(prompt.get("box", np.zeros(4)), dtype=torch.float32),
                    points=torch.as_tensor(points, dtype=torch.float32), point_labels=torch.as_tensor(labels),
                    use_box=torch.tensor("box" in prompt))
        return item


class PromptedSAM(nn.Module):
    """A ``transformers.SamModel`` answering the prompts of a batch of :class:`PromptedCases` with one mask logit
    per pixel at the input size (``forward(batch) -> N x S x S``).

    ``lora_rank``: LoRA of that rank on the image encoder's ``qkv`` projections, the image encoder otherwise frozen
    (SAMed); None trains nothing in the image encoder. ``train_decoder``: the mask decoder trains. The prompt
    encoder is always frozen. ``decoders``: the number of mask decoders (InD: one per group, numbered like
    ``batch["group"]``), each a copy of the model's own. The image is encoded once per batch; the decoder runs on
    the cases of each (decoder, box or clicks) in turn.
    """

    def __init__(self, sam: nn.Module, lora_rank: int | None = None, train_decoder: bool = True,
                 decoders: int = 1):
        super().__init__()
        self.sam = sam
        sam.requires_grad_(False)
        if lora_rank:
            sam.vision_encoder = add_lora(sam.vision_encoder, lora_rank, lora_rank, targets=["qkv"])
        self.decoders = nn.ModuleList([sam.mask_decoder] + [copy.deepcopy(sam.mask_decoder)
                                                             for _ in range(decoders - 1)])
        self.decoders.requires_grad_(train_decoder)

    def forward(self, batch: dict) -> torch.Tensor:
        images = batch["image"]
        embeddings = self.sam.vision_encoder(images)[0]
        groups = torch.zeros(len(images), dtype=torch.long, device=images.device)
        if len(self.decoders) > 1:   # InD: each case goes to its group's decoder
            groups = batch["group"]
        masks = None
        for g, decoder in enumerate(self.decoders):
            self.sam.mask_decoder = decoder
            for use_box in (True, False):
                rows = torch.nonzero((groups == g) & (batch["use_box"] == use_box)).flatten()
                if not len(rows):
                    continue
                prompt = ({"input_boxes": batch["box"][rows, None]} if use_box else
                          {"input_points": batch["points"][rows, None],
                           "input_labels": batch["point_labels"][rows, None]})
                part = self.sam(image_embeddings=embeddings[rows], multimask_output=False, **prompt).pred_masks
                masks = part.new_zeros((len(images), *part.shape[1:])) if masks is None else masks
                masks = masks.index_copy(0, rows, part)
        self.sam.mask_decoder = self.decoders[0]  # what state_dict saves under sam.mask_decoder
        return F.interpolate(masks[:, 0, :1].float(), size=images.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0]


class Segmentation(Objective):
    """SAMed's loss on a :class:`PromptedSAM`'s logits, ``(1 - dice_weight) CE + dice_weight Dice`` over the two
    classes (background, structure), or FEBS's (``febs=True``: group weights on the Dice term, with ``gamma`` and
    ``faithful_to_code`` as :func:`~fairbook.segmentation.losses.febs_loss`); groups come from column ``column`` of
    ``batch["attributes"]`` through ``lookup`` (FEBS, InD). Scored by the per-case Dice at the input size; the
    epoch is kept on its mean."""

    def __init__(self, febs: bool = False, column: int | None = None, lookup=None, n_groups: int = 1,
                 gamma: float = 1.0, dice_weight: float = 0.8, faithful_to_code: bool = False):
        self.febs, self.column, self.n_groups = febs, column, n_groups
        self.lookup = None if lookup is None else torch.as_tensor(lookup, dtype=torch.long)
        self.gamma, self.dice_weight, self.faithful_to_code = gamma, dice_weight, faithful_to_code

    def groups(self, batch: dict) -> torch.Tensor:
        if self.column is None:
            return torch.zeros(len(batch["image"]), dtype=torch.long, device=batch["image"].device)
        return group_numbers(batch["attributes"][:, self.column], self.lookup)

    def _logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model({**batch, "group": self.groups(batch)})

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, None]:
        logits = self._logits(model, batch)
        two = torch.stack([torch.zeros_like(logits), logits], dim=1)   # softmax over them = (1 - p, p)
        target = batch["target"].long()
        if self.febs:
            return febs_loss(two, target, self.groups(batch), self.n_groups, self.gamma, self.dice_weight,
                             self.faithful_to_code), None
        return dice_ce_loss(two, target, self.dice_weight), None

    @torch.no_grad()
    def scores(self, model: nn.Module, loader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(dice, iou, attribute codes)`` per case, the prediction thresholded at logit 0."""
        was_training = model.training
        model.eval()
        out = {"dice": [], "iou": [], "codes": []}
        device = next(model.parameters()).device
        try:
            for batch in loader:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                predicted = (self._logits(model, batch) > 0).cpu().numpy()
                target = batch["target"].cpu().numpy() > 0
                out["dice"].append(dice(predicted, target))
                out["iou"].append(iou(predicted, target))
                out["codes"].append(batch["attributes"].cpu().numpy())
        finally:
            model.train(was_training)
        return tuple(np.concatenate(out[k]) for k in ("dice", "iou", "codes"))

    @torch.no_grad()
    def masks(self, model: nn.Module, cases, indices) -> dict[str, np.ndarray]:
        """The items ``indices`` of ``cases`` (a :class:`PromptedCases`) with the model's answer: ``image`` (the
        first channel, as the model saw it), ``target`` and ``predicted`` (boolean masks), for a gallery."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        batch = torch.utils.data.default_collate([cases[int(i)] for i in indices])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        try:
            predicted = (self._logits(model, batch) > 0).cpu().numpy()
        finally:
            model.train(was_training)
        return {"image": batch["image"][:, 0].cpu().numpy(), "target": batch["target"].cpu().numpy() > 0,
                "predicted": predicted}

    def criterion(self, scores) -> float:
        values = np.asarray(scores[0], float)
        return float(values.mean()) if np.isfinite(values).all() else float("nan")
