"""FairCLIP: the regulariser in both forms against hand-worked values and an exact W2, its group batches, and
the scale check of a loss hook."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fairbook.methods.fairclip import (
    FairCLIPError,
    FairCLIPRegulariser,
    GroupBatches,
    code_scores,
    paper_scores,
)
from fairbook.train import regulariser_scale

# Sinkhorn settings close to the unregularised limit: tiny blur, slow epsilon-scaling so the iterations converge.
CONVERGED = {"blur": 1e-4, "scaling": 0.99}


def half_w2_squared(x: torch.Tensor, y: torch.Tensor) -> float:
    """W2^2 / 2 between the uniform empirical distributions of two 1-D samples of any sizes n and m.

    Their quantile functions are step functions on the grids k/n and k/m; on the common grid of step 1/lcm(n, m)
    both are constant, so repeating each sorted sample lcm/n (lcm/m) times gives two equal-size samples whose
    sorted, paired squared differences average to W2^2.
    """
    n, m = len(x), len(y)
    lcm = n * m // math.gcd(n, m)
    xs = x.double().sort().values.repeat_interleave(lcm // n)
    ys = y.double().sort().values.repeat_interleave(lcm // m)
    return float(((xs - ys) ** 2).mean() / 2)


def features_with_cosines(scores: torch.Tensor, dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features (s, sqrt(1 - s^2), 0...) and text features (1, 0, ...): the cosine of pair i is s_i exactly,
    with non-unit norms so the normalisation is exercised."""
    image = torch.zeros(len(scores), dim, dtype=torch.float64)
    image[:, 0], image[:, 1] = scores, (1 - scores**2).sqrt()
    text = torch.zeros_like(image)
    text[:, 0] = 1.0
    return 3.0 * image, 0.5 * text


def batch_for(attribute_column: int, codes: list[int]) -> dict:
    attributes = torch.zeros(len(codes), 4, dtype=torch.int64)
    attributes[:, attribute_column] = torch.tensor(codes)
    return {"attributes": attributes}


# ------------------------------------------------------------------------------------------------- paper form
def test_paper_scores_are_matched_pair_cosines():
    generator = torch.Generator().manual_seed(0)
    image, text = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    expected = torch.nn.functional.cosine_similarity(image, text, dim=1)
    assert torch.allclose(paper_scores(image, text), expected, atol=1e-6)


def test_paper_form_matches_closed_form_for_groups_of_different_sizes():
    # batch of 12: race groups of 6 (Asian), 4 (Black) and 2 (White) samples; sizes 12 vs 6/4/2 need the lcm grid
    scores = torch.tensor([0.9, -0.3, 0.5, 0.1, 0.7, -0.8, 0.2, 0.6, -0.1, 0.35, 0.0, -0.55], dtype=torch.float64)
    codes = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    image, text = features_with_cosines(scores)
    lam = 2.0
    regulariser = FairCLIPRegulariser("race", lam=lam, **CONVERGED)
    value = float(regulariser(image, text, 100.0, batch_for(0, codes)))
    group_index = torch.tensor(codes)
    expected = lam * sum(half_w2_squared(scores, scores[group_index == g]) for g in (0, 1, 2))
    assert expected > 0.05
    assert value == pytest.approx(expected, rel=1e-5)
    assert not regulariser.skipped


def test_paper_form_is_zero_for_identical_distributions():
    # each gender group holds the same multiset of scores, so both equal the batch distribution (sizes 8 vs 4)
    half = torch.tensor([0.8, -0.2, 0.4, 0.1], dtype=torch.float64)
    scores = torch.cat([half, half.flip(0)])
    image, text = features_with_cosines(scores)
    regulariser = FairCLIPRegulariser("gender", lam=1.0, **CONVERGED)
    value = float(regulariser(image, text, 1.0, batch_for(1, [0, 0, 0, 0, 1, 1, 1, 1])))
    assert abs(value) < 1e-9
    shifted = FairCLIPRegulariser("gender", lam=1.0, **CONVERGED)
    image2, text2 = features_with_cosines(torch.cat([half, half - 0.5]))
    assert float(shifted(image2, text2, 1.0, batch_for(1, [0, 0, 0, 0, 1, 1, 1, 1]))) > 0.01


def test_paper_form_skips_and_counts_absent_groups_and_ignores_unknown():
    scores = torch.tensor([0.9, 0.1, -0.4, 0.6, 0.3], dtype=torch.float64)
    image, text = features_with_cosines(scores)
    codes = [0, 0, 2, -1, 2]  # English x2, Other x2, one Unknown; Spanish (1) absent
    regulariser = FairCLIPRegulariser("language", lam=1.0, **CONVERGED)
    batch = batch_for(3, codes)
    value = float(regulariser(image, text, 1.0, batch))
    regulariser(image, text, 1.0, batch)
    assert dict(regulariser.skipped) == {1: 2}
    index = torch.tensor(codes)
    expected = half_w2_squared(scores, scores[index == 0]) + half_w2_squared(scores, scores[index == 2])
    assert value == pytest.approx(expected, rel=1e-5)


def test_paper_form_gradients_reach_both_features():
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(8, 6, generator=generator, requires_grad=True)
    text = torch.randn(8, 6, generator=generator, requires_grad=True)
    regulariser = FairCLIPRegulariser("gender", lam=1.0)
    loss = regulariser(image, text, 100.0, batch_for(1, [0, 1, 0, 0, 1, 1, 0, 0]))
    loss.backward()
    assert loss.item() > 0
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------------------- code form
def test_code_scores_are_diagonal_of_logit_product():
    generator = torch.Generator().manual_seed(2)
    image, text = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    scale = 7.0
    image_n, text_n = image / image.norm(dim=1, keepdim=True), text / text.norm(dim=1, keepdim=True)
    logits_per_image = scale * image_n @ text_n.T
    logits_per_text = scale * text_n @ image_n.T
    expected = torch.diag(logits_per_image @ logits_per_text.T)
    assert torch.allclose(code_scores(image, text, scale), expected, rtol=1e-5)
    assert not torch.allclose(expected, torch.diag(logits_per_image))


def test_code_form_normalises_group_scores_by_their_sum():
    # one-hot image = text features: the cosine matrix is the identity, L = scale * I and every score is scale^2.
    # batch side (4 samples, scale 2): s = 4 each; group 0 (2 samples): s_g = [4, 4] / 8 = [0.5, 0.5];
    # group 1 (4 samples): [0.25] * 4. Between Dirac masses the Sinkhorn divergence is exactly |a - b|^2 / 2.
    eye = torch.eye(4, dtype=torch.float64)
    group_features = {0: (eye[:2], eye[:2]), 1: (eye, eye)}
    regulariser = FairCLIPRegulariser("gender", lam=0.5, form="code", blur=1e-4)
    value = float(regulariser(eye, eye, 2.0, batch_for(1, [0, 0, 1, 1]), group_features=group_features))
    expected = 0.5 * ((4 - 0.5) ** 2 / 2 + (4 - 0.25) ** 2 / 2)  # = 6.578125; without normalisation it would be 0
    assert value == pytest.approx(expected, rel=1e-6)


def test_code_form_gradient_reaches_only_the_batch_side():
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(6, 4, generator=generator, requires_grad=True)
    text = torch.randn(6, 4, generator=generator, requires_grad=True)
    group_image = torch.randn(3, 4, generator=generator, requires_grad=True)
    group_text = torch.randn(3, 4, generator=generator, requires_grad=True)
    regulariser = FairCLIPRegulariser("race", lam=1.0, form="code")
    loss = regulariser(image, text, 10.0, {"attributes": torch.zeros(6, 4, dtype=torch.int64)},
                       group_features={2: (group_image, group_text)})
    loss.backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    assert group_image.grad is None and group_text.grad is None


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(FairCLIPError, match="choose 'paper'"):
        FairCLIPRegulariser("race", form="official")
    with pytest.raises(FairCLIPError, match="unknown attribute"):
        FairCLIPRegulariser("maritalstatus")
    eye = torch.eye(3)
    with pytest.raises(FairCLIPError, match="needs group_features"):
        FairCLIPRegulariser("race", form="code")(eye, eye, 1.0, batch_for(0, [0, 1, 2]))
    with pytest.raises(FairCLIPError, match="batch\\['attributes'\\]"):
        FairCLIPRegulariser("race")(eye, eye, 1.0, batch_for(0, [0, 1]))


# ---------------------------------------------------------------------------------------------- group batches
class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, codes: list[int]) -> None:
        self.codes = np.array(codes)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "group": int(self.codes[index])}

    def groups(self, attribute: str) -> np.ndarray:
        return self.codes


def test_group_batches_are_group_only_cycle_and_cover_each_group():
    codes = [0, 1, 0, 2, 1, 0, -1, 0, 0]  # group 0: 5 items, group 1: 2, group 2: 1, one unknown
    source = GroupBatches(TinyDataset(codes), "race", batch_size=2, seed=0)
    steps = [next(source) for _ in range(4)]
    assert all(set(step) == {0, 1, 2} for step in steps)
    for step in steps:
        for group, batch in step.items():
            assert set(batch["group"].tolist()) == {group}
    # group 0 has 5 items in batches of 2, 2, 1: the first three steps cover it exactly once, step 4 restarts
    first_pass = torch.cat([step[0]["index"] for step in steps[:3]]).tolist()
    assert sorted(first_pass) == [0, 2, 5, 7, 8]
    assert [len(step[0]["index"]) for step in steps] == [2, 2, 1, 2]
    again = [next(GroupBatches(TinyDataset(codes), "race", batch_size=2, seed=0))[0]["index"].tolist()]
    assert again[0] == steps[0][0]["index"].tolist()


def test_hook_is_the_regulariser_for_the_paper_form_and_needs_data_for_the_code_form():
    paper = FairCLIPRegulariser("race")
    assert paper.hook() is paper
    with pytest.raises(FairCLIPError, match="pass hook\\(model, train_dataset\\)"):
        FairCLIPRegulariser("race", form="code").hook()


def test_regulariser_scale_is_the_weighted_term_over_the_clip_loss():
    from fairbook.models import create_clip
    from fairbook.train import clip_loss

    torch.manual_seed(0)
    model, *_ = create_clip("fairbook-tiny", device="cpu")
    n = 12
    generator = torch.Generator().manual_seed(1)
    items = [{"image": torch.randn(3, 96, 96, generator=generator),
              "text": torch.randint(1, 400, (77,), generator=generator),
              "label": torch.tensor(i % 2), "attributes": torch.tensor([i % 3, i % 2, 0, 0])} for i in range(n)]
    hooks = {a: FairCLIPRegulariser(a, lam=10.0).hook() for a in ("race", "gender")}
    table = regulariser_scale(model, items, hooks, batch_size=n)
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}  # batch_size = n: the whole set
    with torch.no_grad():
        out = model(batch["image"], batch["text"])
        loss = float(clip_loss(out["image_features"], out["text_features"], out["logit_scale"]))
        race = float(FairCLIPRegulariser("race", lam=10.0)(out["image_features"], out["text_features"],
                                                           out["logit_scale"], batch))
    row = table.set_index("name").loc["race"]
    assert row["clip_loss"] == pytest.approx(loss, rel=1e-5)
    assert row["regulariser"] == pytest.approx(race, rel=1e-4) and row["share"] == pytest.approx(race / loss, rel=1e-4)


def test_regulariser_scale_is_reproducible_under_random_augmentation():
    """Items that draw from torch's global generator (as torchvision's random crops do) give the same table at
    every call with the same seed, and the caller's generator state is left as it was."""
    from fairbook.models import create_clip

    torch.manual_seed(0)
    model, *_ = create_clip("fairbook-tiny", device="cpu")

    class Augmented(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"image": torch.randn(3, 96, 96), "text": torch.full((77,), 5 + i), "label": torch.tensor(i % 2),
                    "attributes": torch.tensor([i % 3, i % 2, 0, 0])}

    hooks = {"race": FairCLIPRegulariser("race", lam=10.0).hook()}
    state = torch.get_rng_state()
    first = regulariser_scale(model, Augmented(), hooks, batch_size=8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)  # move the global generator on
    again = regulariser_scale(model, Augmented(), hooks, batch_size=8, seed=3)
    other = regulariser_scale(model, Augmented(), hooks, batch_size=8, seed=4)
    pd.testing.assert_frame_equal(first, again)
    assert first.loc[0, "regulariser"] != other.loc[0, "regulariser"]
