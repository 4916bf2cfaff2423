"""FairCLIP (Luo et al., "FairCLIP: Harnessing Fairness in Vision-Language Learning", CVPR 2024, arXiv 2403.19949).

FairCLIP fine-tunes CLIP contrastively with a Sinkhorn regulariser that pulls each group's distribution of
image-text similarity scores towards the whole batch's (the paper's method section, the optimal-transport objective).
The regulariser comes in two forms behind one switch, ``form``: ``"paper"`` (the objective as the paper states it)
and ``"code"`` (what the official repository computes, see :class:`FairCLIPRegulariser`). The reproduction of
Bakker et al. (arXiv 2509.06535) implemented the paper form as "A-FairCLIP" and found no fairness gain from either.

Distances use geomloss ``SamplesLoss("sinkhorn", p=2, blur=b, backend="tensorized")``: the cost is |x - y|^2 / 2
and, with ``debias=True`` (the default), the value is the Sinkhorn divergence, which tends to W2^2 / 2 as the blur
goes to 0. Scores are 1-D, so they are passed as (N, 1) point clouds.

The method on the harness is :class:`FairCLIP` (chapter 12): CLIP's model and recipe, plus the regulariser for
one attribute.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from geomloss import SamplesLoss
from torch import nn
from torch.utils.data import DataLoader, Subset

from fairbook.data.attributes import ATTRIBUTES, FILTER_ATTRIBUTES, UNKNOWN
from fairbook.methods.base import Claim, Method

__all__ = [
    "CLAIMS",
    "FORMS", "FairCLIP", "FairCLIPError", "FairCLIPRegulariser", "GroupBatches", "code_scores", "encode_groups",
    "paper_scores",
]

#: The two forms of the FairCLIP regulariser (see :class:`FairCLIPRegulariser`).
FORMS = ("paper", "code")


class FairCLIPError(ValueError):
    """Bad input to FairCLIP's regulariser or its group batches."""


# ------------------------------------------------------------------------------------------------------ FairCLIP
def _working_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (fp16/bf16 features are promoted before normalising and before Sinkhorn)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _normalised(features: torch.Tensor) -> torch.Tensor:
    features = _working_dtype(features)
    return features / features.norm(dim=-1, keepdim=True)


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise FairCLIPError(
            f"image and text features must both be (N, D) with the same shape, got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}; pass one row per image-text pair")


def paper_scores(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Matched-pair similarity of each sample: cos(image_i, text_i), the diagonal of the similarity matrix of
    L2-normalised features (the "similarity scores" whose distribution the FairCLIP paper aligns across groups)."""
    _check_features(image_features, text_features)
    return (_normalised(image_features) * _normalised(text_features)).sum(dim=1)


def code_scores(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale) -> torch.Tensor:
    """Per-sample score of the official FairCLIP code: ``diag(L_img @ L_txt.T)``.

    ``L_img = logit_scale * img @ txt.T`` (normalised features) and ``L_txt = L_img.T`` are the CLIP logits, so the
    score of sample i is ``sum_j L_img[i, j] * L_txt[i, j] = sum_j L[i, j] L[j, i]``: it is quadratic in the logit
    scale and sums over the whole batch, unlike the matched-pair cosine of :func:`paper_scores`.
    ``logit_scale`` is the multiplier (``exp`` of the learned temperature, as open_clip's forward returns it).
    """
    _check_features(image_features, text_features)
    logits_per_image = logit_scale * _normalised(image_features) @ _normalised(text_features).T
    logits_per_text = logits_per_image.T
    return (logits_per_image * logits_per_text).sum(dim=1)


def _attribute_column(attribute: str) -> int:
    if attribute not in FILTER_ATTRIBUTES:
        raise FairCLIPError(
            f"unknown attribute {attribute!r} for batch['attributes']; choose one of: {', '.join(FILTER_ATTRIBUTES)}")
    return FILTER_ATTRIBUTES.index(attribute)


class FairCLIPRegulariser:
    """FairCLIP's Sinkhorn regulariser, added to the CLIP loss as ``loss + regulariser(...)``.

    ``form="paper"`` (default; the objective of the FairCLIP paper, method section): with ``s`` the matched-pair
    cosines of the batch (:func:`paper_scores`) and ``s[g]`` those of the samples of group ``g`` of ``attribute``,

        loss = lam * sum_g Sinkhorn(s, s[g])

    over the known groups present in the batch (``-1``/unknown is no group; its samples still count in ``s``).
    A declared group absent from the batch is skipped and counted in :attr:`skipped` (group code -> calls).
    Gradients reach both image and text features through both sides of each distance.

    ``form="code"`` (the official implementation): ``s = code_scores(batch)`` carries gradient; for each group a
    separate group-only batch (``group_features[g] = (image_features, text_features)``, e.g. from
    :class:`GroupBatches` + :func:`encode_groups`) gives ``s_g = code_scores(group)`` under ``no_grad``, divided by
    its sum; ``loss = lam * sum_g Sinkhorn(s, s_g / sum(s_g))``. The two sides sit on very different scales: ``s``
    grows like ``logit_scale^2`` times a sum over the batch (thousands for CLIP's scale 100) while ``s_g / sum(s_g)``
    sums to 1 (values near 1 / group batch size). The distance is then close to ``mean(s^2) / 2`` for every group,
    i.e. mostly a penalty on the size of ``s`` rather than a comparison of groups. The reproduction of Bakker et al.
    (arXiv 2509.06535) flags this mismatch and found no fairness gain from either form.

    ``lam`` 1e-6 is the official script value; ``blur`` defaults to the argparse default 1e-4 (the scripts pass
    1e-6). ``scaling`` is geomloss's epsilon-scaling ratio; its default 0.5 (used upstream) stops before the
    Sinkhorn iterations converge at small blur. Measured on 100 random 1-D samples (32 uniform scores against a
    random half of them, blur 1e-2 to 1e-4), relative error to the exact W2^2 / 2: scaling 0.5 median ~30 %
    (max ~75 %), 0.9 median ~4 % (max ~38 %), 0.99 with blur <= 1e-3 below 0.02 %. Use 0.99 (about 10x more
    iterations) when the value itself matters, e.g. for plots or checks.
    """

    def __init__(
        self, attribute: str, lam: float = 1e-6, blur: float = 1e-4, form: str = "paper", scaling: float = 0.5,
    ) -> None:
        if form not in FORMS:
            raise FairCLIPError(f"unknown FairCLIP form {form!r}; choose 'paper' (as published) or 'code' (as coded)")
        self.attribute, self.column = attribute, _attribute_column(attribute)
        self.groups = tuple(code for code in ATTRIBUTES[attribute] if code != UNKNOWN)
        self.lam, self.form = float(lam), form
        self.sinkhorn = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, backend="tensorized")
        self.skipped: Counter[int] = Counter()

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sinkhorn divergence between the empirical distributions of two 1-D score vectors."""
        return self.sinkhorn(x[:, None], y[:, None].to(x))

    def __call__(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, batch: Mapping,
        group_features: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The regulariser (a scalar tensor) for one batch; ``batch["attributes"]`` is the (N, 5) int64 code tensor
        (race, gender, ethnicity, language, age). ``group_features`` is required by, and only used by, the code form."""
        if self.form == "paper":
            return self._paper(image_features, text_features, batch)
        if not group_features:
            raise FairCLIPError("form='code' needs group_features={group: (image_features, text_features)}; "
                                "build them with GroupBatches and encode_groups")
        return self._code(image_features, text_features, logit_scale, group_features)

    def hook(self, model: nn.Module | None = None, dataset=None, batch_size: int = 32, seed: int = 0):
        """The regulariser as :func:`fairbook.train.fit` calls it, ``hook(image, text, logit_scale, batch)``.

        The paper form needs nothing else. The code form draws one group-only batch per group of ``dataset``
        (the training set) at every step, as the official per-group loaders do (:class:`GroupBatches`), and
        encodes it with ``model`` under ``no_grad`` (:func:`encode_groups`).
        """
        if self.form == "paper":
            return self
        if model is None or dataset is None:
            raise FairCLIPError("form='code' draws per-group batches: pass hook(model, train_dataset)")
        batches = GroupBatches(dataset, self.attribute, batch_size=batch_size, seed=seed)

        def code_hook(image_features, text_features, logit_scale, batch):
            return self(image_features, text_features, logit_scale, batch, encode_groups(model, next(batches)))

        return code_hook

    def _paper(self, image_features: torch.Tensor, text_features: torch.Tensor, batch: Mapping) -> torch.Tensor:
        scores = paper_scores(image_features, text_features)
        codes = torch.as_tensor(batch["attributes"])
        if codes.ndim != 2 or len(codes) != len(scores):
            raise FairCLIPError(f"batch['attributes'] must be (N, {len(FILTER_ATTRIBUTES)}) with N = {len(scores)}, "
                                f"got {tuple(codes.shape)}; pass the batch the features came from")
        codes = codes[:, self.column].to(scores.device)
        total = scores.new_zeros(())
        for group in self.groups:
            in_group = codes == group
            if not bool(in_group.any()):
                self.skipped[group] += 1
                continue
            total = total + self.distance(scores, scores[in_group])
        return self.lam * total

    def _code(self, image_features, text_features, logit_scale, group_features) -> torch.Tensor:
        scores = code_scores(image_features, text_features, logit_scale)
        total = scores.new_zeros(())
        for group_image, group_text in group_features.values():
            with torch.no_grad():
                group_scores = code_scores(group_image, group_text, logit_scale)
                group_scores = group_scores / group_scores.sum()
            total = total + self.distance(scores, group_scores)
        return self.lam * total


class GroupBatches:
    """Endless source of one group-only batch per group, as the official FairCLIP code's per-group loaders.

    ``dataset`` must have ``groups(attribute)`` (codes per item, as :class:`fairbook.data.fairvlmed.FairVLMed`).
    Every known group present (unknown ``-1`` excluded) gets its own shuffled DataLoader over its items
    (``batch_size``, last batch kept, generator seeded with ``seed + code``); ``next()`` returns
    ``{group code: batch}`` and restarts a loader (new shuffle) when it runs out.
    """

    def __init__(self, dataset, attribute: str, batch_size: int = 32, seed: int = 0, num_workers: int = 0) -> None:
        if not hasattr(dataset, "groups"):
            raise FairCLIPError("dataset has no groups(attribute) method; use fairbook.data.fairvlmed.FairVLMed")
        codes = np.asarray(dataset.groups(attribute))
        self.loaders = {
            int(code): DataLoader(
                Subset(dataset, np.flatnonzero(codes == code).tolist()), batch_size=batch_size, shuffle=True,
                generator=torch.Generator().manual_seed(seed + int(code)), num_workers=num_workers)
            for code in np.unique(codes) if code != UNKNOWN
        }
        self._iterators: dict[int, Iterator] = {}

    def __iter__(self) -> GroupBatches:
        return self

    def __next__(self) -> dict[int, dict]:
        return {group: self._next(group) for group in self.loaders}

    def _next(self, group: int):
        try:
            return next(self._iterators[group])
        except (KeyError, StopIteration):
            self._iterators[group] = iter(self.loaders[group])
            return next(self._iterators[group])


def encode_groups(model: nn.Module, batches: Mapping[int, Mapping], device=None) -> dict[int, tuple]:
    """``{group: (image_features, text_features)}`` of :class:`GroupBatches` output, under ``torch.no_grad``.

    Uses open_clip's ``model.encode_image(batch["image"])`` and ``model.encode_text(batch["text"])`` (tokens);
    the model's train/eval mode is left as it is.
    """
    device = device if device is not None else next(model.parameters()).device
    with torch.no_grad():
        return {group: (model.encode_image(batch["image"].to(device)), model.encode_text(batch["text"].to(device)))
                for group, batch in batches.items()}


@dataclass(frozen=True)
class FairCLIP(Method):
    """FairCLIP on the harness (chapter 12): CLIP's model, recipe and training draw, plus
    :class:`FairCLIPRegulariser` for the training attribute (weight ``lam``, Sinkhorn ``blur``, ``form``).

    The code form draws its per-group batches (:class:`GroupBatches`) of the recipe's batch size with the seed.
    """

    name: str = "FairCLIP"
    lam: float = 100.0
    blur: float = 1e-4
    form: str = "paper"

    uses_attribute = True

    def regulariser(self, model: nn.Module, train, attribute: str, seed: int, batch_size: int):
        loss = FairCLIPRegulariser(attribute, lam=self.lam, blur=self.blur, form=self.form)
        return loss.hook(model, train, batch_size, seed)


_PAPER = "FairCLIP (Luo et al., CVPR 2024)"
#: FairCLIP's main claim on Harvard-FairVLMed, as comparisons chapter 12 tests.
CLAIMS = [
    Claim(_PAPER, "Sec. 5, results on Harvard-FairVLMed", "FairCLIP raises ES-AUC over CLIP", "12-fairclip",
          "FairCLIP", "CLIP", "es_auc"),
    Claim(_PAPER, "Sec. 5, results on Harvard-FairVLMed", "FairCLIP does not lower AUC", "12-fairclip",
          "FairCLIP", "CLIP", "auc", "not worse"),
]
