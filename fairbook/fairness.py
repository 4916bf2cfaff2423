"""Fairness losses and mitigations: the FairCLIP Sinkhorn regulariser, group-balanced resampling and GroupDRO.

* :class:`FairCLIPRegulariser` (Luo et al., "FairCLIP: Harnessing Fairness in Vision-Language Learning", CVPR 2024,
  arXiv 2403.19949) in two forms behind one switch, ``form``: ``"paper"`` (the objective as the paper states it)
  and ``"code"`` (what the official repository computes). See ``shared/reference/methods.md`` for the differences
  and the reproduction by Bakker et al. (arXiv 2509.06535), which implemented the paper form as "A-FairCLIP".
* :func:`group_balanced_weights` / :func:`balanced_sampler`: resampling with per-sample weight 1 / group size, the
  "Resampling" mitigation of MEDFAIR (Zong et al., ICLR 2023) and FairMedFM (Jin et al., NeurIPS 2024 D&B, Tab. 2).
* :class:`GroupDRO`: the online group DRO algorithm of Sagawa et al. (ICLR 2020, Algorithm 1) with their optional
  group adjustment C / sqrt(n_g) (FairMedFM uses C = 1, appendix D.1.3; MEDFAIR uses step size 0.01).

Distances use geomloss ``SamplesLoss("sinkhorn", p=2, blur=b, backend="tensorized")``: the cost is |x - y|^2 / 2
and, with ``debias=True`` (the default), the value is the Sinkhorn divergence, which tends to W2^2 / 2 as the blur
goes to 0. Scores are 1-D, so they are passed as (N, 1) point clouds.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd
import torch
from geomloss import SamplesLoss
from numpy.typing import ArrayLike
from torch import nn
from torch.utils.data import DataLoader, Subset, WeightedRandomSampler

from fairbook.data.attributes import ATTRIBUTES, FILTER_ATTRIBUTES, UNKNOWN

__all__ = [
    "FORMS", "FairnessError", "paper_scores", "code_scores", "FairCLIPRegulariser", "GroupBatches",
    "encode_groups", "regulariser_scale", "group_balanced_weights", "balanced_sampler", "GroupDRO",
]

#: The two forms of the FairCLIP regulariser (see :class:`FairCLIPRegulariser`).
FORMS = ("paper", "code")


class FairnessError(ValueError):
    """Bad input to a fairness loss or mitigation."""


# ------------------------------------------------------------------------------------------------------ FairCLIP
def _working_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (fp16/bf16 features are promoted before normalising and before Sinkhorn)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _normalised(features: torch.Tensor) -> torch.Tensor:
    features = _working_dtype(features)
    return features / features.norm(dim=-1, keepdim=True)


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise FairnessError(
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
        raise FairnessError(
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
            raise FairnessError(f"unknown FairCLIP form {form!r}; choose 'paper' (as published) or 'code' (as coded)")
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
        """The regulariser (a scalar tensor) for one batch; ``batch["attributes"]`` is the (N, 4) int64 code tensor
        (race, gender, ethnicity, language). ``group_features`` is required by, and only used by, the code form."""
        if self.form == "paper":
            return self._paper(image_features, text_features, batch)
        if not group_features:
            raise FairnessError("form='code' needs group_features={group: (image_features, text_features)}; "
                                "build them with GroupBatches and encode_groups")
        return self._code(image_features, text_features, logit_scale, group_features)

    def hook(self, model: nn.Module | None = None, dataset=None, batch_size: int = 32, seed: int = 0):
        """The regulariser as :func:`fairbook.train.fit_clip` calls it, ``hook(image, text, logit_scale, batch)``.

        The paper form needs nothing else. The code form draws one group-only batch per group of ``dataset``
        (the training set) at every step, as the official per-group loaders do (:class:`GroupBatches`), and
        encodes it with ``model`` under ``no_grad`` (:func:`encode_groups`).
        """
        if self.form == "paper":
            return self
        if model is None or dataset is None:
            raise FairnessError("form='code' draws per-group batches: pass hook(model, train_dataset)")
        batches = GroupBatches(dataset, self.attribute, batch_size=batch_size, seed=seed)

        def code_hook(image_features, text_features, logit_scale, batch):
            return self(image_features, text_features, logit_scale, batch, encode_groups(model, next(batches)))

        return code_hook

    def _paper(self, image_features: torch.Tensor, text_features: torch.Tensor, batch: Mapping) -> torch.Tensor:
        scores = paper_scores(image_features, text_features)
        codes = torch.as_tensor(batch["attributes"])
        if codes.ndim != 2 or len(codes) != len(scores):
            raise FairnessError(f"batch['attributes'] must be (N, {len(FILTER_ATTRIBUTES)}) with N = {len(scores)}, "
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


@torch.no_grad()
def regulariser_scale(model: nn.Module, dataset, hooks: Mapping[str, object], batch_size: int = 32,
                      seed: int = 0) -> pd.DataFrame:
    """Size of each loss hook against the contrastive loss on one shuffled training batch, before training: a check
    of the scale of a regulariser's weight (FairCLIP's lambda, FOL's weights).

    ``hooks``: name (e.g. the attribute) -> ``hook(image_features, text_features, logit_scale, batch)`` as
    :func:`fairbook.train.fit_clip` calls it. One row per hook: ``clip_loss``, ``regulariser``, ``share`` =
    regulariser / clip_loss, plus the hook's ``last_terms`` (e.g. FOL's ``F_EI`` ...) when it records them.
    The model's train/eval mode is left as it is. The batch, its augmentation and any sampling inside the hooks
    draw from generators seeded with ``seed`` (the global torch state is restored afterwards), so the table is
    the same at every execution for the same model.
    """
    from fairbook.train import _features, clip_loss

    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        batch = next(iter(DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                     generator=torch.Generator().manual_seed(seed))))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        image, text, scale = _features(model(batch["image"], batch["text"]))
        contrastive = float(clip_loss(image, text, scale))
        rows = []
        for name, hook in hooks.items():
            value = float(hook(image, text, scale, batch))
            rows.append({"name": name, "clip_loss": contrastive, "regulariser": value, "share": value / contrastive,
                         **getattr(hook, "last_terms", {})})
    return pd.DataFrame(rows)


class GroupBatches:
    """Endless source of one group-only batch per group, as the official FairCLIP code's per-group loaders.

    ``dataset`` must have ``groups(attribute)`` (codes per item, as :class:`fairbook.data.fairvlmed.FairVLMed`).
    Every known group present (unknown ``-1`` excluded) gets its own shuffled DataLoader over its items
    (``batch_size``, last batch kept, generator seeded with ``seed + code``); ``next()`` returns
    ``{group code: batch}`` and restarts a loader (new shuffle) when it runs out.
    """

    def __init__(self, dataset, attribute: str, batch_size: int = 32, seed: int = 0, num_workers: int = 0) -> None:
        if not hasattr(dataset, "groups"):
            raise FairnessError("dataset has no groups(attribute) method; use fairbook.data.fairvlmed.FairVLMed")
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


# ---------------------------------------------------------------------------------------------------- resampling
def group_balanced_weights(groups: ArrayLike) -> np.ndarray:
    """Per-sample weight 1 / (size of the sample's group), MEDFAIR's resampling weights.

    Each group's weights sum to 1, so all weights sum to the number of groups and a weighted draw picks every
    group with the same probability.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) == 0:
        raise FairnessError(f"groups must be a non-empty 1-D array of group codes, got shape {groups.shape}")
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def balanced_sampler(groups: ArrayLike, num_samples: int | None = None, seed: int = 0) -> WeightedRandomSampler:
    """WeightedRandomSampler (with replacement, seeded) drawing groups equally often; ``num_samples`` defaults to
    the number of samples (one "epoch"). Pass it as ``DataLoader(dataset, sampler=...)``."""
    weights = group_balanced_weights(groups)
    return WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double), num_samples or len(weights), replacement=True,
        generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------ GroupDRO
class GroupDRO(nn.Module):
    """Online group DRO (Sagawa et al., ICLR 2020, Algorithm 1) on per-sample losses.

    Per batch: ``l_g`` = mean loss of group ``g``'s samples (0 when absent);
    ``q_g <- q_g * exp(eta * (l_g + C / sqrt(n_g)))``, then ``q <- q / sum(q)``; the returned loss is
    ``sum_g q_g l_g`` with the updated ``q`` held constant (no gradient through ``q``). ``q`` starts uniform and is
    a buffer (:attr:`q`, saved in ``state_dict``); every call updates it, so call it on training batches only.
    The group adjustment ``C = adjustment`` (0 = off; FairMedFM uses 1) needs ``group_counts`` (training size of
    each group); it is added for every group, present or not, and only enters ``q`` (as a constant inside
    ``sum_g q_g (l_g + C / sqrt(n_g))`` it would not change the gradient).
    """

    q: torch.Tensor

    def __init__(
        self, n_groups: int, eta: float = 0.01, adjustment: float = 0.0, group_counts: ArrayLike | None = None,
    ) -> None:
        super().__init__()
        if adjustment and group_counts is None:
            raise FairnessError("GroupDRO adjustment C / sqrt(n_g) needs group_counts (training samples per group)")
        counts = torch.ones(n_groups) if group_counts is None else torch.as_tensor(group_counts, dtype=torch.float)
        if counts.shape != (n_groups,) or bool((counts <= 0).any()):
            raise FairnessError(f"group_counts must hold {n_groups} positive counts, got {counts.tolist()}")
        self.n_groups, self.eta = n_groups, float(eta)
        self.register_buffer("q", torch.full((n_groups,), 1.0 / n_groups))
        self.register_buffer("adjust", float(adjustment) / counts.sqrt())

    def group_losses(self, losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Mean loss of each group in the batch, 0 for absent groups (differentiable)."""
        groups = torch.as_tensor(groups, device=losses.device)
        if losses.ndim != 1 or groups.shape != losses.shape:
            raise FairnessError(f"pass per-sample losses (reduction='none') and one group code per sample, got "
                                f"shapes {tuple(losses.shape)} and {tuple(groups.shape)}")
        if len(groups) and (int(groups.min()) < 0 or int(groups.max()) >= self.n_groups):
            raise FairnessError(f"group codes must lie in 0..{self.n_groups - 1}; remap or drop unknown (-1) samples")
        sums = losses.new_zeros(self.n_groups).index_add(0, groups, losses)
        counts = torch.bincount(groups, minlength=self.n_groups).to(losses.dtype)
        return sums / counts.clamp(min=1)

    def forward(self, losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        group_loss = self.group_losses(losses, groups)
        q = self.q * torch.exp(self.eta * (group_loss.detach().to(self.q) + self.adjust))
        self.q = q / q.sum()
        return (self.q.to(group_loss) * group_loss).sum()
