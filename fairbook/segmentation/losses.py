"""Segmentation losses: the soft Dice loss and FEBS, FairSeg's fair error-bound scaling (Tian et al., "FairSeg",
ICLR 2024; FairMedFM's "+FEBS" rows, Jin et al., NeurIPS 2024 D&B, Table 2).

FEBS as FairSeg's ``FairDiceLoss`` computes it, per batch: for each group ``a`` in the batch,
``L_a = sum_c (1 - softDice_c)`` over that group's cases (every class, background included); the group weight is
``w_a = tanh((min_a' L_a' / L_a) ** gamma)``, so the group with the smallest loss gets ``tanh(1)`` and groups that
are segmented worse get smaller weights; each case's class probabilities are multiplied by its group's weight
before a class-averaged soft Dice loss, and the total is ``(1 - lam) * CE + lam * Dice`` with ``lam = 0.8``.

The minimum is over the groups present in the batch. FairSeg's released code keeps a weight slot for every group,
initialised to zero, so a group absent from the batch has ``L = 0``, the minimum is 0 and every weight becomes
``tanh(0) = 0``: the Dice term then has no gradient at all. ``faithful_to_code=True`` reproduces that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_ce_loss", "febs_loss", "febs_weights", "group_dice_losses", "soft_dice_loss"]

_EPS = 1e-5


def _soft_dice(probabilities: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Soft Dice per class over the given cases: ``(2 sum p g + eps) / (sum p + sum g + eps)``, shape ``(C,)``."""
    dims = (0, *range(2, probabilities.ndim))
    overlap = (probabilities * onehot).sum(dims)
    return (2 * overlap + _EPS) / (probabilities.sum(dims) + onehot.sum(dims) + _EPS)


def soft_dice_loss(probabilities: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Class-averaged soft Dice loss ``mean_c (1 - softDice_c)`` of ``N x C x H x W`` probabilities."""
    return (1 - _soft_dice(probabilities, onehot)).mean()


def group_dice_losses(probabilities: torch.Tensor, onehot: torch.Tensor, groups: torch.Tensor, n_groups: int
                      ) -> torch.Tensor:
    """``L_a = sum_c (1 - softDice_c)`` over each group's cases, 0 for a group absent from the batch, shape
    ``(n_groups,)``."""
    losses = probabilities.new_zeros(n_groups)
    for a in range(n_groups):
        member = groups == a
        if bool(member.any()):
            losses[a] = (1 - _soft_dice(probabilities[member], onehot[member])).sum()
    return losses


def febs_weights(group_losses: torch.Tensor, present: torch.Tensor, gamma: float = 1.0,
                 faithful_to_code: bool = False) -> torch.Tensor:
    """FEBS group weights ``tanh((min L / L_a) ** gamma)`` (module docstring), held constant (no gradient).

    ``present``: which groups have cases in the batch. The minimum is over the present groups; with
    ``faithful_to_code`` over every group, absent ones counting ``L = 0`` as the released code does. A group's
    weight is 0 when it is absent."""
    losses = group_losses.detach()
    pool = losses if faithful_to_code else losses[present]
    smallest = pool.min()
    ratio = smallest / losses.clamp(min=_EPS)
    return torch.where(present, torch.tanh(ratio ** gamma), torch.zeros_like(ratio))


def _probabilities(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probabilities = logits.float().softmax(1)
    return probabilities, F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).to(probabilities)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 0.8,
                 case_weights: torch.Tensor | None = None) -> torch.Tensor:
    """SAMed's (and FairSeg's) loss ``(1 - dice_weight) * CE + dice_weight * Dice`` for ``N x C x H x W`` logits
    and ``N x H x W`` class targets; ``case_weights`` (one per case) scale each case's probabilities before the
    Dice term, as FEBS does."""
    probabilities, onehot = _probabilities(logits, target)
    if case_weights is not None:
        probabilities = probabilities * case_weights.view(-1, *([1] * (logits.ndim - 1)))
    ce = F.cross_entropy(logits.float(), target.long())
    return (1 - dice_weight) * ce + dice_weight * soft_dice_loss(probabilities, onehot)


def febs_loss(logits: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, n_groups: int,
              gamma: float = 1.0, dice_weight: float = 0.8, faithful_to_code: bool = False) -> torch.Tensor:
    """FEBS's total loss, :func:`dice_ce_loss` with each case's probabilities scaled by its group's
    :func:`febs_weights`, for ``N x C x H x W`` logits, ``N x H x W`` class targets and one group number per
    case."""
    losses = group_dice_losses(*_probabilities(logits, target), groups, n_groups)
    present = torch.bincount(groups, minlength=n_groups) > 0
    weights = febs_weights(losses, present, gamma, faithful_to_code)
    return dice_ce_loss(logits, target, dice_weight, weights[groups])
