"""Mitigations that work with any method: group-balanced resampling, GroupDRO and LAFTR.

* :func:`group_balanced_weights` / :func:`balanced_sampler`: resampling with per-sample weight 1 / group size, the
  "Resampling" mitigation of MEDFAIR (Zong et al., ICLR 2023) and FairMedFM (Jin et al., NeurIPS 2024 D&B, Tab. 2).
* :class:`GroupDRO`: the online group DRO algorithm of Sagawa et al. (ICLR 2020, Algorithm 1) with their optional
  group adjustment C / sqrt(n_g) (FairMedFM uses C = 1, appendix D.1.3; MEDFAIR uses step size 0.01).
* :class:`LAFTR`: an adversary that predicts the group from the representation, trained against the encoder
  through a reversed gradient, with the group-normalised L1 objective of Madras et al. (ICML 2018) in its
  demographic-parity and equalised-odds forms.
"""
from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn
from torch.utils.data import WeightedRandomSampler

from fairbook.data.attributes import ATTRIBUTES, UNKNOWN

__all__ = ["LAFTR", "LAFTR_FORMS", "RESAMPLE_BY", "GroupDRO", "MitigationError", "balanced_sampler", "cell_sampler",
           "group_balanced_weights", "laftr_adversary_objective", "reverse_gradient", "training_groups"]

#: What :func:`cell_sampler` balances: the attribute x label cells, or the attribute's groups only.
RESAMPLE_BY = ("attribute x label", "attribute")


class MitigationError(ValueError):
    """Bad input to a mitigation."""


# ---------------------------------------------------------------------------------------------------- resampling
def group_balanced_weights(groups: ArrayLike) -> np.ndarray:
    """Per-sample weight 1 / (size of the sample's group), MEDFAIR's resampling weights.

    Each group's weights sum to 1, so all weights sum to the number of groups and a weighted draw picks every
    group with the same probability.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) == 0:
        raise MitigationError(f"groups must be a non-empty 1-D array of group codes, got shape {groups.shape}")
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def balanced_sampler(groups: ArrayLike, num_samples: int | None = None, seed: int = 0) -> WeightedRandomSampler:
    """WeightedRandomSampler (with replacement, seeded) drawing groups equally often; ``num_samples`` defaults to
    the number of samples (one "epoch"). Pass it as ``DataLoader(dataset, sampler=...)``."""
    weights = group_balanced_weights(groups)
    return WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double), num_samples or len(weights), replacement=True,
        generator=torch.Generator().manual_seed(seed))


def cell_sampler(metadata, attribute: str, by: str = "attribute x label", seed: int = 0) -> WeightedRandomSampler:
    """:func:`balanced_sampler` over a training split's ``metadata`` (a FairVLMed split's table): the cells are the
    ``attribute``'s groups crossed with the glaucoma label (``by="attribute x label"``, MEDFAIR's and FairMedFM's
    resampling) or the groups alone (``by="attribute"``); the unknown code is a group of its own."""
    if by not in RESAMPLE_BY:
        raise MitigationError(f"resampling by {by!r} is not known: choose one of {', '.join(RESAMPLE_BY)}")
    cells = metadata[attribute].astype(str)
    if by == "attribute x label":
        cells = cells + " x " + metadata["glaucoma"].astype(str)
    return balanced_sampler(cells.to_numpy(), seed=seed)


def training_groups(codes: ArrayLike, attribute: str) -> tuple[np.ndarray, np.ndarray]:
    """``(lookup, counts)`` numbering the groups that a training draw's ``attribute`` ``codes`` hold, for a
    mitigation that keeps one entry per group (GroupDRO's weights, LAFTR's softmax, MultiFair's group statistics).

    Codes run over the attribute's ``n_known`` known codes plus the unknown code -1, which is a group of its own (so
    that no sample leaves the objective). ``lookup[code]`` is the group number of a code (-1: absent from the
    draw), the unknown code read as the last entry ``lookup[n_known]`` (:func:`fairbook.train.group_numbers`), and
    ``counts[k]`` the number of samples of group ``k``."""
    n_known = len([code for code in ATTRIBUTES[attribute] if code != UNKNOWN])
    codes = np.asarray(codes)
    codes = np.where(codes < 0, n_known, codes)
    present, counts = np.unique(codes, return_counts=True)
    lookup = np.full(n_known + 1, -1)
    lookup[present] = np.arange(len(present))
    return lookup, counts


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
            raise MitigationError("GroupDRO adjustment C / sqrt(n_g) needs group_counts (training samples per group)")
        counts = torch.ones(n_groups) if group_counts is None else torch.as_tensor(group_counts, dtype=torch.float)
        if counts.shape != (n_groups,) or bool((counts <= 0).any()):
            raise MitigationError(f"group_counts must hold {n_groups} positive counts, got {counts.tolist()}")
        self.n_groups, self.eta = n_groups, float(eta)
        self.register_buffer("q", torch.full((n_groups,), 1.0 / n_groups))
        self.register_buffer("adjust", float(adjustment) / counts.sqrt())

    def group_losses(self, losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Mean loss of each group in the batch, 0 for absent groups (differentiable)."""
        groups = torch.as_tensor(groups, device=losses.device)
        if losses.ndim != 1 or groups.shape != losses.shape:
            raise MitigationError(f"pass per-sample losses (reduction='none') and one group code per sample, got "
                                f"shapes {tuple(losses.shape)} and {tuple(groups.shape)}")
        if len(groups) and (int(groups.min()) < 0 or int(groups.max()) >= self.n_groups):
            raise MitigationError(f"group codes must lie in 0..{self.n_groups - 1}; remap or drop unknown (-1) samples")
        sums = losses.new_zeros(self.n_groups).index_add(0, groups, losses)
        counts = torch.bincount(groups, minlength=self.n_groups).to(losses.dtype)
        return sums / counts.clamp(min=1)

    def forward(self, losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        group_loss = self.group_losses(losses, groups)
        q = self.q * torch.exp(self.eta * (group_loss.detach().to(self.q) + self.adjust))
        self.q = q / q.sum()
        return (self.q.to(group_loss) * group_loss).sum()


# --------------------------------------------------------------------------------------------------------- LAFTR
class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient times -1 backward (Ganin & Lempitsky, ICML 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged, with its gradient reversed on the way back: one backward pass then trains an adversary
    to maximise what the layers below it minimise."""
    return _ReverseGradient.apply(x)


LAFTR_FORMS = ("dp", "eo")


def laftr_adversary_objective(probabilities: torch.Tensor, groups: torch.Tensor, labels: torch.Tensor,
                              form: str = "dp") -> torch.Tensor:
    """LAFTR's adversarial objective (Madras et al., ICML 2018), which the adversary maximises and the encoder
    minimises: one minus the adversary's group-normalised L1 error.

    ``probabilities``: the adversary's ``n x G`` softmax over the ``G`` groups; the L1 error of a sample of group
    ``a`` is ``1 - p_a`` (for two groups, the paper's ``|h(z) - a|``). ``"dp"`` (demographic parity) averages
    the errors within each group, weight ``1 / |D_a|``, i.e. ``1 / p(a)``; ``"eo"`` (equalised odds) within each
    (group, label) cell, weight ``1 / p(a, y)``. The objective is
    ``K - (2 / G) * sum over cells of the mean error``, ``K`` = 1 for dp and 2 for eo, which is the paper's for
    ``G = 2``; cells absent from the batch are left out.
    """
    if form not in LAFTR_FORMS:
        raise MitigationError(f"LAFTR form {form!r} is not known: choose dp (demographic parity) or eo "
                              "(equalised odds)")
    n_groups = probabilities.shape[1]
    errors = 1.0 - probabilities.gather(1, groups.long().view(-1, 1)).squeeze(1)
    cells = groups.long() if form == "dp" else groups.long() * 2 + labels.long()
    n_cells = n_groups * (1 if form == "dp" else 2)
    sums = errors.new_zeros(n_cells).index_add(0, cells, errors)
    counts = torch.bincount(cells, minlength=n_cells)
    present = counts > 0
    mean_errors = sums[present] / counts[present].to(errors.dtype)
    return (1.0 if form == "dp" else 2.0) - 2.0 / n_groups * mean_errors.sum()


class LAFTR(nn.Module):
    """LAFTR (Madras et al., ICML 2018) as a term of the classifier's loss, as FairMedFM runs it (Table 2, LAFTR
    rows; adversarial coefficient 0.1).

    An adversary (``Linear``, or an MLP with ``hidden`` units) reads the representation ``z`` through
    :func:`reverse_gradient` (the equalised-odds adversary reads ``[z, y]``, as in the paper) and predicts the
    group with a softmax; the term added to the classifier's loss is ``-coefficient * L_adv`` with ``L_adv`` =
    :func:`laftr_adversary_objective`. One backward pass then moves the adversary up ``L_adv`` (it learns to
    tell the groups apart) and the encoder down it (it hides them): LAFTR's min-max by simultaneous gradient
    steps, where MEDFAIR's implementation alternates an adversary step and an encoder step.
    """

    def __init__(self, dim: int, n_groups: int, form: str = "dp", coefficient: float = 0.1,
                 hidden: int | None = None):
        super().__init__()
        if form not in LAFTR_FORMS:
            raise MitigationError(f"LAFTR form {form!r} is not known: choose dp or eo")
        if n_groups < 2:
            raise MitigationError(f"LAFTR needs at least two groups to tell apart, got {n_groups}")
        self.form, self.coefficient = form, float(coefficient)
        width = dim + (1 if form == "eo" else 0)
        self.adversary = (nn.Linear(width, n_groups) if hidden is None else
                          nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, n_groups)))

    def forward(self, features: torch.Tensor, groups: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen = reverse_gradient(features)
        if self.form == "eo":
            seen = torch.cat([seen, labels.to(seen.dtype).view(-1, 1)], dim=1)
        probabilities = self.adversary(seen).float().softmax(-1)
        return -self.coefficient * laftr_adversary_objective(probabilities, groups, labels, self.form)
