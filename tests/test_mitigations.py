"""Mitigations: group-balanced resampling weights and GroupDRO against hand-worked values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fairbook.mitigations import GroupDRO, MitigationError, balanced_sampler, group_balanced_weights


# ------------------------------------------------------------------------------------------------- resampling
def test_group_balanced_weights_hand_case():
    weights = group_balanced_weights(["a", "a", "a", "b", "c", "c"])
    assert np.allclose(weights, [1 / 3, 1 / 3, 1 / 3, 1, 1 / 2, 1 / 2])
    assert weights.sum() == pytest.approx(3.0)


def test_balanced_sampler_draws_groups_equally_and_is_seeded():
    groups = np.array([0] * 90 + [1] * 10)
    draws = np.array(list(balanced_sampler(groups, num_samples=4000, seed=1)))
    minority_share = (groups[draws] == 1).mean()
    assert abs(minority_share - 0.5) < 0.04  # 0.1 without resampling; binomial sd at n=4000 is 0.008
    assert len(list(balanced_sampler(groups))) == 100
    assert list(balanced_sampler(groups, seed=1)) == list(balanced_sampler(groups, seed=1))


# --------------------------------------------------------------------------------------------------- GroupDRO
def test_group_dro_two_steps_by_hand():
    dro = GroupDRO(n_groups=3, eta=0.5)
    assert torch.allclose(dro.q, torch.full((3,), 1 / 3))

    losses = torch.tensor([1.0, 3.0, 1.0], requires_grad=True)  # group 0: mean 2, group 1: 1, group 2: absent
    loss = dro(losses, torch.tensor([0, 0, 1]))
    w = [math.exp(0.5 * 2), math.exp(0.5 * 1), 1.0]
    q1 = [x / sum(w) for x in w]
    assert dro.q.tolist() == pytest.approx(q1)
    assert loss.item() == pytest.approx(q1[0] * 2 + q1[1] * 1)
    loss.backward()  # q is constant: d loss / d loss_i = q_g / (group batch size)
    assert losses.grad.tolist() == pytest.approx([q1[0] / 2, q1[0] / 2, q1[1]])

    loss2 = dro(torch.tensor([4.0]), torch.tensor([2]))  # only group 2 present, loss 4
    w2 = [q1[0], q1[1], q1[2] * math.exp(0.5 * 4)]
    q2 = [x / sum(w2) for x in w2]
    assert dro.q.tolist() == pytest.approx(q2)
    assert loss2.item() == pytest.approx(q2[2] * 4)


def test_group_dro_adjustment_enters_q_only():
    dro = GroupDRO(n_groups=2, eta=1.0, adjustment=1.0, group_counts=[4, 100])
    loss = dro(torch.tensor([1.0, 1.0]), torch.tensor([0, 1]))
    w = [math.exp(1 + 1 / 2), math.exp(1 + 1 / 10)]
    q = [x / sum(w) for x in w]
    assert dro.q.tolist() == pytest.approx(q)
    assert loss.item() == pytest.approx(q[0] * 1 + q[1] * 1)
    with pytest.raises(MitigationError, match="needs group_counts"):
        GroupDRO(2, adjustment=1.0)
    with pytest.raises(MitigationError, match="0..1"):
        GroupDRO(2)(torch.ones(2), torch.tensor([0, -1]))
