"""Fair-MoE (fairbook.methods.fair_moe): Top_r / Top_c routing, the patch and feature MoEs, patching a CLIP, FOL
and routing diagnostics."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from fairbook.data.fairvlmed import FairVLMed
from fairbook.data.synthetic import SynthConfig, generate
from fairbook.methods import fair_moe as moe
from fairbook.methods.fair_moe import (
    FairnessOrientedLoss,
    FeatureMoE,
    MoEError,
    PatchMoE,
    RoutingLog,
    add_fo_moe,
    expert_capacity,
    group_variance_gap,
    moe_parameter_names,
    routers,
    split_rows,
    top_c_mask,
    top_r_mask,
)
from fairbook.methods.fairclip import FairCLIPRegulariser
from fairbook.train import PROMPT_SETS, Contrastive, TrainConfig, clip_loss, fit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(clip):
    tokenizer = clip[3]
    torch.manual_seed(1)
    notes = ["a photo of glaucoma", "no glaucoma", "cup to disc ratio 0.7 with rim thinning", "normal " * 90,
             "visual field loss", "stable"]
    attributes = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [2, 0, 1, 1], [0, 1, 0, 0], [1, 0, 0, 2], [2, 1, 1, 0]])
    return torch.randn(6, 3, 96, 96), tokenizer(notes), attributes


def _mlp(dim: int = 8) -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))


# --------------------------------------------------------------------------------------------------- routing masks
# One sample, four tokens, three experts. Top_r with K1 = 2 keeps each token's two largest weights; capacity
# ceil(0.75 * 4 * 2 / 3) = 2 then keeps, per expert, the two largest of the weights Top_r routed to it:
#   expert 0 gets t0 .6, t1 .5, t2 .2, t3 .45 -> keeps t0, t1 (t2, t3 dropped)
#   expert 1 gets t0 .3, t2 .7, t3 .35      -> keeps t2, t3 (t0 dropped)
#   expert 2 gets t1 .4                     -> keeps t1
WEIGHTS = torch.tensor([[[0.60, 0.30, 0.10],
                         [0.50, 0.10, 0.40],
                         [0.20, 0.70, 0.10],
                         [0.45, 0.35, 0.20]]])
TOP_R = torch.tensor([[[1, 1, 0], [1, 0, 1], [1, 1, 0], [1, 1, 0]]], dtype=torch.bool)
FINAL = torch.tensor([[[1, 0, 0], [1, 0, 1], [0, 1, 0], [0, 1, 0]]], dtype=torch.bool)


def test_top_r_and_top_c_match_hand_worked_example():
    capacity = expert_capacity(0.75, 4, 2, 3)
    assert capacity == 2
    top_r = top_r_mask(WEIGHTS, 2)
    assert torch.equal(top_r, TOP_R)
    final = top_c_mask(WEIGHTS, top_r, capacity)
    assert torch.equal(final, FINAL)
    dropped = top_r & ~final
    assert dropped.nonzero().tolist() == [[0, 0, 1], [0, 2, 0], [0, 3, 0]]


def test_expert_capacity_uses_real_length_and_rounds_up():
    assert expert_capacity(0.8, 197, 3, 10) == 48      # official code: int(47.28) = 47 for every tower
    assert expert_capacity(0.8, 77, 3, 10) == 19       # text
    assert expert_capacity(0.8, 37, 3, 10) == 9        # fairbook-tiny image: 6 x 6 patches + class token
    assert expert_capacity(0.8, 25, 3, 10) == 6        # 6.000000000000001 in floats must not become 7
    assert expert_capacity(0.01, 4, 1, 10) == 1


@pytest.mark.parametrize("length", [37, 77, 197])
def test_capacity_respected_for_random_inputs(length):
    layer = PatchMoE(_mlp(16), n_experts=10, top_k=3, capacity=0.8)
    torch.manual_seed(length)
    layer(torch.randn(5, length, 16))
    routing = layer.routing
    cap = expert_capacity(0.8, length, 3, 10)
    assert routing.gate.shape == (5, length, 10)
    assert int(routing.mask.sum(dim=1).max()) <= cap
    assert torch.equal(routing.top_r.sum(-1), torch.full((5, length), 3))
    assert not bool((routing.mask & ~routing.top_r).any())
    # every expert column is full or keeps all that Top_r sent it
    sent, kept = routing.top_r.sum(1), routing.mask.sum(1)
    assert torch.equal(kept, sent.clamp(max=cap))
    assert torch.equal(routing.dropped.sum(1), sent - kept)
    torch.testing.assert_close(routing.routed, routing.gate * routing.mask)
    torch.testing.assert_close(routing.gate.sum(-1), torch.ones(5, length))


def test_dense_limit_equals_softmax_mixture():
    layer = PatchMoE(_mlp(), n_experts=4, top_k=4, capacity=10.0)
    with torch.no_grad():
        for expert in layer.experts:      # make the copies differ
            for p in expert.parameters():
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 7, 8)
    weights = layer.gate(x).softmax(-1)
    expected = sum(weights[..., j, None] * layer.experts[j](x) for j in range(4))
    torch.testing.assert_close(layer(x), expected)
    assert bool(layer.routing.mask.all())


def test_single_expert_reproduces_mlp_and_block(clip):
    mlp = _mlp()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(PatchMoE(mlp, n_experts=1, top_k=1, capacity=1.0)(x), mlp(x))
    block = copy.deepcopy(clip[0].visual.transformer.resblocks[-1])
    tokens = torch.randn(2, 37, block.ln_2.normalized_shape[0])
    expected = block(tokens)
    block.mlp = PatchMoE(block.mlp, n_experts=1, top_k=1, capacity=1.0)
    torch.testing.assert_close(block(tokens), expected)


def test_experts_start_as_copies_and_output_scales_by_kept_mass():
    mlp = _mlp()
    layer = PatchMoE(mlp, n_experts=5, top_k=2, capacity=10.0)
    for expert in layer.experts:
        assert expert is not mlp
        torch.testing.assert_close(expert[0].weight, mlp[0].weight)
    x = torch.randn(2, 6, 8)
    out = layer(x)
    mass = layer.routing.routed.sum(-1, keepdim=True)
    torch.testing.assert_close(out, mass * mlp(x))
    renormalised = PatchMoE(mlp, n_experts=5, top_k=2, capacity=10.0, renormalise=True)
    torch.testing.assert_close(renormalised(x), mlp(x))


def _open_clip_mlp(dim: int = 8, hidden: int = 32) -> nn.Sequential:
    from collections import OrderedDict

    torch.manual_seed(3)
    return nn.Sequential(OrderedDict(c_fc=nn.Linear(dim, hidden), gelu=nn.GELU(), c_proj=nn.Linear(hidden, dim)))


def test_low_rank_experts_start_as_the_mlp_and_count_their_parameters():
    mlp = _open_clip_mlp()
    x = torch.randn(2, 5, 8)
    single = PatchMoE(mlp, n_experts=1, top_k=1, capacity=1.0, expert_rank=2)
    torch.testing.assert_close(single(x), mlp(x))  # B = D = 0 at the start
    layer = PatchMoE(mlp, n_experts=4, top_k=2, capacity=10.0, expert_rank=3)
    own = sum(p.numel() for p in layer.experts.parameters()) - sum(p.numel() for p in mlp.parameters())
    assert own == 4 * 3 * 2 * (8 + 32)  # M1 * r * 2 * (d + h)
    assert layer.c_fc is mlp.c_fc
    # a hand-computed expert: give expert 1 non-zero updates and compare with the formula
    with torch.no_grad():
        layer.experts.fc_up[1].normal_()
        layer.experts.proj_up[1].normal_()
    e = layer.experts
    hidden = torch.nn.functional.gelu(mlp.c_fc(x) + x @ e.fc_down[1].T @ e.fc_up[1].T)
    expected = mlp.c_proj(hidden) + hidden @ e.proj_down[1].T @ e.proj_up[1].T
    torch.testing.assert_close(e[1](x), expected)
    torch.testing.assert_close(e[0](x), mlp(x))  # the others are untouched
    with pytest.raises(MoEError, match="positive integer"):
        PatchMoE(mlp, n_experts=2, top_k=1, expert_rank=0)
    with pytest.raises(MoEError, match="c_fc and c_proj"):
        PatchMoE(_mlp(), n_experts=2, top_k=1, expert_rank=2)


def test_low_rank_experts_learn_and_patch_a_clip(clip):
    model = add_fo_moe(copy.deepcopy(clip[0]), expert_rank=4)
    layer = model.visual.transformer.resblocks[-1].mlp
    assert isinstance(layer.experts, moe.LowRankExperts) and model.fo_moe_config["expert_rank"] == 4
    images = torch.randn(2, 3, 96, 96)
    model.encode_image(images).sum().backward()
    assert layer.experts.fc_up.grad.abs().sum() > 0  # the zero-initialised factors receive gradient


def test_code_form_subtracts_input():
    mlp = _mlp()
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(PatchMoE(mlp, 1, 1, 1.0, subtract_input=True)(x), mlp(x) - x)


def test_patch_moe_seq_first_layout_matches_batch_first():
    mlp = _mlp()
    first = PatchMoE(mlp, 4, 2, 0.5)
    second = copy.deepcopy(first)
    second.batch_first = False
    x = torch.randn(3, 9, 8)
    torch.testing.assert_close(second(x.transpose(0, 1)).transpose(0, 1), first(x))
    assert torch.equal(second.routing.mask, first.routing.mask)


def test_feature_moe_forms():
    x = torch.randn(5, 16)
    paper = FeatureMoE(16, n_experts=4, top_k=2)
    out = paper(x)
    routing = paper.routing
    assert torch.equal(routing.mask.sum(-1), torch.full((5,), 2))
    torch.testing.assert_close(out, routing.routed.sum(-1, keepdim=True) * x)   # identity experts at init
    torch.testing.assert_close(FeatureMoE(16, 4, 2, renormalise=True)(x), x)
    code = FeatureMoE(16, n_experts=3, form="code")
    out = code(x)
    assert isinstance(code.gate[1], moe.QuickGELU) and bool(code.routing.mask.all())
    weights = code.gate(x).softmax(-1)
    torch.testing.assert_close(out, sum(weights[:, j, None] * code.experts[j](x) for j in range(3)))


def test_bad_settings_raise_one_line_errors(clip, model):
    with pytest.raises(MoEError, match="top_k <= n_experts"):
        PatchMoE(_mlp(), n_experts=2, top_k=3)
    with pytest.raises(MoEError, match="capacity factor C must be > 0"):
        PatchMoE(_mlp(), capacity=0.0)
    with pytest.raises(MoEError, match="top_k <= n_experts"):
        add_fo_moe(model, feature_experts=2, feature_top_k=3)
    with pytest.raises(MoEError, match="unknown Fair-MoE form"):
        add_fo_moe(model, form="official")
    with pytest.raises(MoEError, match="feature_experts='race'"):
        add_fo_moe(model, form="code")
    with pytest.raises(MoEError, match="open_clip CLIP"):
        add_fo_moe(nn.Linear(2, 2))
    add_fo_moe(model, text=False)
    with pytest.raises(MoEError, match="already has Fair-MoE"):
        add_fo_moe(model)
    with pytest.raises(MoEError, match="unknown router"):
        FairnessOrientedLoss(model, "race", weights={"EX": 1.0})
    with pytest.raises(MoEError, match="unknown router"):
        FairnessOrientedLoss(model, "race", weights={"ET": 1.0})     # text tower not patched
    with pytest.raises(MoEError, match="no Fair-MoE layers"):
        FairnessOrientedLoss(clip[0], "race")
    with pytest.raises(MoEError, match="unknown attribute"):
        FairnessOrientedLoss(model, "maritalstatus")
    assert issubclass(MoEError, ValueError)


# -------------------------------------------------------------------------------------------------------- patching
def test_patched_clip_keeps_interface_names_and_zero_shot(clip, model, inputs):
    image, tokens, _ = inputs
    before = {k: v for k, v in model.state_dict().items()}
    ref_image, ref_text = model.encode_image(image), model.encode_text(tokens)
    add_fo_moe(model, capacity=4.0, renormalise=True)   # no capacity drop, weights sum to 1: exact at init
    out = model(image, tokens)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    torch.testing.assert_close(model.encode_image(image), ref_image)
    torch.testing.assert_close(model.encode_text(tokens), ref_text)
    torch.testing.assert_close(out["text_features"], torch.nn.functional.normalize(ref_text, dim=-1))
    state = model.state_dict()
    replaced = [k for k in before if k not in state]
    assert replaced and all(".resblocks.3.mlp." in k for k in replaced)
    assert all(torch.equal(state[k], v) for k, v in before.items() if k in state)
    assert "visual.transformer.resblocks.3.mlp.experts.9.c_fc.weight" in state
    assert "transformer.feature_moe.gate.0.weight" in state and "visual.feature_moe.experts.3.weight" in state
    assert set(routers(model)) == {"EI", "ET", "FI", "FT"}


def test_paper_feature_moe_preserves_directions(model, inputs):
    image, tokens, _ = inputs
    ref = model(image, tokens)
    add_fo_moe(model, patch=False)
    out = model(image, tokens)
    torch.testing.assert_close(out["image_features"], ref["image_features"])
    torch.testing.assert_close(out["text_features"], ref["text_features"])
    assert set(routers(model)) == {"FI", "FT"}


def test_ablation_switches_and_parameter_names(clip):
    base = clip[0]
    image_only = add_fo_moe(copy.deepcopy(base), text=False, feature=False)
    assert set(routers(image_only)) == {"EI"}
    names = moe_parameter_names(image_only)
    assert names and all(n.startswith("visual.transformer.resblocks.3.mlp.") for n in names)
    layer = image_only.visual.transformer.resblocks[-1].mlp
    mlp_params = sum(p.numel() for p in base.visual.transformer.resblocks[-1].mlp.parameters())
    gate_params = sum(p.numel() for p in layer.gate.parameters())
    extra = sum(p.numel() for p in image_only.parameters()) - sum(p.numel() for p in base.parameters())
    assert extra == 9 * mlp_params + gate_params == sum(image_only.get_parameter(n).numel() for n in names) - mlp_params
    full = add_fo_moe(copy.deepcopy(base), form="code", feature_experts="race")
    assert full.transformer.feature_moe.n_experts == 3 and full.visual.feature_moe.top_k == 3
    patch = full.visual.transformer.resblocks[-1].mlp
    assert patch.subtract_input
    # the official experts: the block MLP's weights with ReLU instead of GELU
    mlp = base.visual.transformer.resblocks[-1].mlp
    expert = patch.experts[0]
    assert isinstance(expert.gelu, torch.nn.ReLU) and not isinstance(mlp.gelu, torch.nn.ReLU)
    assert torch.equal(expert.c_fc.weight, mlp.c_fc.weight) and torch.equal(expert.c_proj.weight, mlp.c_proj.weight)
    x = torch.randn(4, mlp.c_fc.in_features)
    torch.testing.assert_close(expert(x), mlp.c_proj(torch.relu(mlp.c_fc(x))))
    # and the official feature experts: Linear(D, 4D)-ReLU-Linear(4D, D)
    feature = full.visual.feature_moe.experts[0]
    dim = full.visual.output_dim
    assert [type(m) for m in feature] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert (feature[0].in_features, feature[0].out_features, feature[2].out_features) == (dim, 4 * dim, dim)
    assert not isinstance(add_fo_moe(copy.deepcopy(base)).visual.transformer.resblocks[-1].mlp.experts[0].gelu,
                          torch.nn.ReLU)  # the paper form keeps the MLP as it is


def test_deepcopy_after_forward_and_text_binding(model, inputs):
    image, tokens, _ = inputs
    add_fo_moe(model)
    model(image, tokens)
    twin = copy.deepcopy(model)
    assert twin.encode_text.__self__ is twin and twin.transformer.feature_moe.routing is None
    with torch.no_grad():
        twin.transformer.feature_moe.experts[0].weight.mul_(3.0)
    twin.encode_text(tokens)
    assert twin.transformer.feature_moe.routing is not None and model.transformer.feature_moe.routing.samples == 6


# ------------------------------------------------------------------------------------------------------------- FOL
def test_fol_hand_worked_values():
    # group 0 rows [[1,0],[0,1]], group 1 rows [[.5,.5],[.5,.5]]: every column of the batch has population
    # variance 0.125; group 0's columns 0.25, group 1's 0.
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]])
    groups = split_rows(rows, torch.tensor([0, 0, 1, 1]), (0, 1, 2))
    assert set(groups) == {0, 1}
    # paper: 2 experts x ((0.125 - 0.25)^2 + 0.125^2) = 0.0625
    assert group_variance_gap(rows, groups).item() == pytest.approx(0.0625)
    # code, unbiased variances: batch columns 0.5 / 3 = 1/6, group 0's 0.5 / 1, group 1's 0:
    # (1/6 - 1/2)^2 + (1/6 - 0)^2 = 1/9 + 1/36 = 5/36
    assert group_variance_gap(rows, groups, form="code").item() == pytest.approx(5 / 36)
    # expert variances off in opposite directions: the paper form counts each expert, the code form only the means
    a = torch.tensor([[1.0, 0.5], [0.0, 0.5]])
    b = torch.tensor([[0.5, 1.0], [0.5, 0.0]])
    mixed = torch.cat([a, b])
    split = {0: a, 1: b}
    # code: batch mean variance 1/6, each group's (0.5 + 0) / 2 = 1/4: 2 x (1/6 - 1/4)^2 = 1/72 (the divisor alone)
    assert group_variance_gap(mixed, split, "code").item() == pytest.approx(1 / 72)
    # paper: each group has one expert at 0.25 and one at 0, the batch 0.125 for both: 2 x 2 x 0.125^2
    assert group_variance_gap(mixed, split, "paper").item() == pytest.approx(0.0625)


def test_fol_zero_for_identical_group_distributions_and_skips_small_groups():
    torch.manual_seed(0)
    block = torch.rand(7, 5).softmax(-1)
    rows = torch.cat([block, block, block])
    groups = split_rows(rows, torch.tensor([0] * 7 + [1] * 7 + [2] * 7), (0, 1, 2))
    assert group_variance_gap(rows, groups).item() == pytest.approx(0.0, abs=1e-12)
    one_row = {0: rows[:1], 1: rows[1:]}
    assert group_variance_gap(rows, one_row).item() == pytest.approx(
        (rows.var(0, correction=0) - rows[1:].var(0, correction=0)).pow(2).sum().item())
    assert group_variance_gap(rows[:1], {0: rows}).item() == 0.0


def test_fol_on_patched_clip_matches_its_terms(model, inputs):
    image, tokens, attributes = inputs
    attributes = attributes.clone()
    attributes[5, 0] = -1   # unknown race: in the batch rows, in no group
    add_fo_moe(model)
    out = model(image, tokens)
    fol = FairnessOrientedLoss(model, "race", weights={"EI": 2.0, "FT": 1.0, "ET": 0.0})
    value = fol(out["image_features"], out["text_features"], out["logit_scale"], {"attributes": attributes})
    rows, sample = routers(model)["EI"].routing.rows()
    assert rows.shape == (6 * 37, 10)
    # 37 tokens x 3 picks = 111 assignments > 10 experts x 9 slots, so some expert is full (pigeonhole)
    assert int(routers(model)["EI"].routing.mask.sum(1).max()) == expert_capacity(0.8, 37, 3, 10) == 9
    assert int(routers(model)["ET"].routing.mask.sum(1).max()) == expert_capacity(0.8, 77, 3, 10) == 19
    codes = attributes[:, 0][sample]
    by_hand = 0.0
    for g in (0, 1, 2):
        group = rows[codes == g]
        by_hand += (rows.var(0, correction=0) - group.var(0, correction=0)).pow(2).sum().detach()
    assert set(fol.last_terms) == {"F_EI", "F_FT"}
    assert fol.last_terms["F_EI"] == pytest.approx(2.0 * by_hand.item(), rel=1e-5)
    assert value.item() == pytest.approx(fol.last_terms["F_EI"] + fol.last_terms["F_FT"], rel=1e-5)
    assert value.item() > 0
    with pytest.raises(MoEError, match="no routing for this batch"):
        fol(out["image_features"][:2], out["text_features"][:2], out["logit_scale"], {"attributes": attributes[:2]})


def test_fol_per_group_batches_and_code_distance(model, inputs):
    image, tokens, attributes = inputs
    add_fo_moe(model)
    race = attributes[:, 0]
    group_batch = {int(g): {"image": image[race == g], "text": tokens[race == g]} for g in (0, 1, 2)}
    out = model(image, tokens)
    distance = FairCLIPRegulariser("race", lam=1.0, form="code")
    fol = FairnessOrientedLoss(model, "race", weights={"FI": 1.0}, distance=distance,
                               group_batches=iter([group_batch]))
    value = fol(out["image_features"], out["text_features"], out["logit_scale"], {"attributes": attributes})
    # the group-only batches hold exactly the batch's group rows, so F_FI equals the batch form's value
    rows = routers(model)["FI"].routing  # overwritten by the last group forward
    assert rows.samples == 2
    batch_form = FairnessOrientedLoss(model, "race", weights={"FI": 1.0})
    model(image, tokens)
    expected = batch_form(out["image_features"], out["text_features"], out["logit_scale"], {"attributes": attributes})
    assert fol.last_terms["F_FI"] == pytest.approx(expected.item(), rel=1e-5)
    assert fol.last_terms["distance"] > 0
    assert value.item() == pytest.approx(fol.last_terms["F_FI"] + fol.last_terms["distance"], rel=1e-5)
    with pytest.raises(MoEError, match="needs group_batches"):
        FairnessOrientedLoss(model, "race", distance=distance)


def test_gradients_reach_every_gate(model, inputs):
    image, tokens, attributes = inputs
    add_fo_moe(model)
    fol = FairnessOrientedLoss(model, "race", distance=FairCLIPRegulariser("race", lam=1e-2))
    out = model(image, tokens)
    loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
    loss = loss + fol(out["image_features"], out["text_features"], out["logit_scale"], {"attributes": attributes})
    loss.backward()
    for name, router in routers(model).items():
        grad = router.gate[0].weight.grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    names = set(moe_parameter_names(model))
    assert all(p.grad is not None for n, p in model.named_parameters() if n in names and ".gate." in n)


# ----------------------------------------------------------------------------------------------------- diagnostics
def test_routing_log_matches_recorded_routing(model, inputs):
    image, tokens, attributes = inputs
    add_fo_moe(model)
    log = RoutingLog("race")
    with torch.no_grad():
        for half in (slice(0, 3), slice(3, 6)):
            model(image[half], tokens[half])
            log.update(model, attributes[half])
    frame = log.frame()
    assert list(frame.columns) == ["router", "group", "expert", "rows", "load", "dropped", "gate_mean", "gate_var"]
    assert set(frame["group"]) == {"Asian", "Black", "White", "all"}
    sums = frame.groupby(["router", "group"])["load"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0)
    assert (frame[frame.router.isin(["FI", "FT"])]["dropped"].fillna(0.0) == 0).all()   # NaN: never chosen
    # recompute the White rows of the text patch router from a fresh forward of the whole batch
    with torch.no_grad():
        model(image, tokens)
    routing = routers(model)["ET"].routing
    white = attributes[:, 0] == 2
    mask, top_r, routed = routing.mask[white], routing.top_r[white], routing.routed[white].reshape(-1, 10).double()
    rows = frame[(frame.router == "ET") & (frame.group == "White")].sort_values("expert")
    assert (rows["rows"] == int(white.sum()) * 77).all()
    load = mask.sum((0, 1)).double() / mask.sum()
    np.testing.assert_allclose(rows["load"], load.numpy(), rtol=1e-9)
    sent = top_r.sum((0, 1)).double()
    np.testing.assert_allclose(rows["dropped"], ((sent - mask.sum((0, 1))) / sent).numpy(), rtol=1e-9)
    np.testing.assert_allclose(rows["gate_var"], routed.var(0, correction=0).numpy(), rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------- fit
def test_fit_runs_on_patched_model(tmp_path, clip):
    model, preprocess_train, preprocess_val, tokenizer = clip
    model = add_fo_moe(copy.deepcopy(model))
    root = tmp_path / "synth"
    generate(root, SynthConfig.preset("default", n_train=32, n_val=32, n_test=8), progress=False)
    train_ds = Subset(FairVLMed(root, "Training", preprocess_train, tokenizer), range(32))
    val_ds = FairVLMed(root, "Validation", preprocess_val, tokenizer)
    gates = {name: r.gate[0].weight.detach().clone() for name, r in routers(model).items()}
    fol = FairnessOrientedLoss(model, "race", distance=FairCLIPRegulariser("race"))
    config = TrainConfig(epochs=1, batch_size=16, warmup_steps=1, trainable="transformers")
    objective = Contrastive(tokenizer, PROMPT_SETS[config.prompts], fol)
    result = fit(model, train_ds, val_ds, config, tmp_path / "run", objective, progress=False)
    assert result["steps"] == 2 and math.isfinite(result["history"][0]["train_loss"])
    assert result["history"][0]["reg_loss"] > 0
    for name, router in routers(model).items():
        assert not torch.equal(router.gate[0].weight, gates[name]), name
