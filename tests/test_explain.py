"""fairbook.explain: hand-worked rollouts, attention extraction checked against torch, Grad-CAM against finite
differences, the patch-text cosine against a manual computation, mask geometry worked out for fairbook-tiny."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from open_clip.transformer import VisionTransformer
from PIL import Image

from fairbook import explain as ex


@pytest.fixture(scope="module")
def tiny():
    from fairbook.models import create_clip

    torch.manual_seed(0)
    model, _, preprocess, tokenizer = create_clip("fairbook-tiny", device="cpu")
    with torch.no_grad():
        text = model.encode_text(tokenizer(["a scanning laser ophthalmoscopy image of glaucoma"]))
    return model, preprocess, text


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def _toy_vit(pool_type: str) -> VisionTransformer:
    """A 2 x 2-patch, one-block ViT (L = 5 tokens)."""
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=16, width=8, layers=1, heads=2, mlp_ratio=2.0,
                             output_dim=4, pool_type=pool_type)


# ------------------------------------------------------------------------------------------------ rollout
def test_rollout_hand_worked_cyclic_shift():
    # A = P (token i attends to i+1 mod 3) in both blocks: Ã = (P + I) / 2, R = (P^2 + 2P + I) / 4.
    P = torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]])
    R = ex.rollout([P[None], P[None]])[0]
    assert torch.allclose(R[0], torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
    assert torch.allclose(R[2], torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    assert torch.allclose(R.sum(-1), torch.ones(3, dtype=torch.float64))


def test_rollout_multiplies_later_blocks_on_the_left():
    # block 1: P (i reads i+1); block 2: E (every token reads token 0). R = Ã_E Ã_P; final token 0 =
    # 1/2 (token 0 after block 1) + 1/2 (token 0 after block 1) = 1/2 t0 + 1/2 t1 (the reverse order gives 3/4, 1/4).
    P = torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]])
    E = torch.tensor([[1.0, 0, 0], [1, 0, 0], [1, 0, 0]])
    R = ex.rollout([P[None], E[None]])[0]
    assert torch.allclose(R[0].float(), torch.tensor([0.5, 0.5, 0.0]))
    assert torch.allclose(R[1].float(), torch.tensor([0.25, 0.5, 0.25]))


def test_rollout_head_fusion_and_discard():
    P, I = torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]), torch.eye(3)  # noqa: E741 (the identity)
    two_heads = torch.stack([P, I])[None]  # (1, 2, 3, 3)
    # mean: (P + I) / 2 + I, rows sum to 2 -> P / 4 + 3 I / 4
    assert torch.allclose(ex.rollout([two_heads], head_fusion="mean")[0].float(), P / 4 + 3 * I / 4)
    # max: P + I (disjoint supports) + I -> (P + 2 I) / 3
    assert torch.allclose(ex.rollout([two_heads], head_fusion="max")[0].float(), (P + 2 * I) / 3)
    # discard_ratio 0.34 of L = 3 drops the smallest entry of each row: [0.5, 0.3, 0.2] -> [1.5, 0.3, 0] / 1.8
    A = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5]])
    R = ex.rollout([A[None]], discard_ratio=0.34)[0]
    assert torch.allclose(R[0].float(), torch.tensor([1.5, 0.3, 0.0]) / 1.8)


def test_attention_maps_match_torch_need_weights(tiny, images):
    model, _, _ = tiny
    found = ex.attention_maps(model, images)
    visual = model.visual
    assert len(found) == 4 and found[0].shape == (2, 3, 37, 37)
    with torch.no_grad():
        x = visual._embeds(images)
        for block, attention in zip(visual.transformer.resblocks, found):
            h = block.ln_1(x)
            _, expected = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
            torch.testing.assert_close(attention, expected, atol=1e-5, rtol=1e-4)
            x = block(x)
    torch.testing.assert_close(found[-1].sum(-1), torch.ones(2, 3, 37))


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_rollout_readout_hand_worked(monkeypatch, pool_type):
    # L = 5 (CLS + 2 x 2 patches), one block, both heads: CLS attends to patch 1 only, patch i to patch i+1.
    A = torch.zeros(5, 5)
    A[0, 1] = 1.0
    for i in range(1, 5):
        A[i, 1 + i % 4] = 1.0
    monkeypatch.setattr(ex, "attention_maps", lambda model, images: [A.expand(1, 2, 5, 5)])
    maps = ex.attention_rollout(_toy_vit(pool_type), torch.zeros(1, 3, 32, 32))
    # R = (A + I) / 2. CLS row: [0.5, 0.5, 0, 0, 0] -> all patch mass on patch 1 (top left).
    # Patch rows: each patch keeps 1/2 and gives 1/2 to its successor -> mean over rows is uniform.
    expected = [[1.0, 0.0], [0.0, 0.0]] if pool_type == "tok" else [[0.25, 0.25], [0.25, 0.25]]
    np.testing.assert_allclose(maps[0], expected, atol=1e-12)


def test_rollout_uniform_attention_and_real_maps(tiny, images):
    model, _, _ = tiny
    maps = ex.attention_rollout(model, images, discard_ratio=0.5, head_fusion="max")
    assert maps.shape == (2, 6, 6) and (maps >= 0).all()
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    # zero query/key projections: every attention row is uniform 1/L, so every readout is uniform over patches
    flat = copy.deepcopy(model)
    for block in flat.visual.transformer.resblocks:
        with torch.no_grad():
            block.attn.in_proj_weight[:384].zero_()
            block.attn.in_proj_bias[:384].zero_()
    np.testing.assert_allclose(ex.attention_maps(flat, images)[0][0, 0], 1 / 37, rtol=1e-5)
    for pool_type in ("avg", "tok"):
        flat.visual.pool_type = pool_type
        np.testing.assert_allclose(ex.attention_rollout(flat, images), 1 / 36, rtol=1e-5)


# ------------------------------------------------------------------------------------ similarity and gradcam
def test_similarity_map_matches_manual_cosine(tiny, images):
    model, _, text = tiny
    sim = ex.image_text_similarity_map(model, images, text)
    visual = model.visual
    with torch.no_grad():
        tokens = visual.transformer(visual._embeds(images))
        patch = visual.ln_post(tokens[1, 1 + 2 * 6 + 5]) @ visual.proj  # image 1, row 2, column 5
        expected = torch.dot(patch, text[0]) / (patch.norm() * text[0].norm())
    assert sim.shape == (2, 6, 6) and abs(sim).max() <= 1
    assert sim[1, 2, 5] == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("pool_type", ["avg", "tok"])
def test_gradcam_matches_finite_differences(tiny, images, pool_type):
    model, _, text = tiny
    model = copy.deepcopy(model).double()
    visual = model.visual
    visual.pool_type = pool_type
    x, t = images.double(), text.double()
    cam = ex.gradcam_map(model, x, t)
    assert cam.shape == (2, 6, 6) and (cam >= 0).all() and cam.max() > 0

    # Pre-ReLU Grad-CAM of patch j = sum_c mean_k(dy/dA_kc) A_jc = directional derivative of y along d with
    # d_k = A_j / N for every patch k (CLS row 0): check it by central differences.
    block = visual.transformer.resblocks[-1]
    state = {"shift": None}

    def hook(module, args):
        state["tokens"] = args[0].detach().clone()
        return (args[0] + state["shift"],) if state["shift"] is not None else None

    def score():
        with torch.no_grad():
            return torch.nn.functional.cosine_similarity(model.encode_image(x), t, dim=-1)

    handle = block.register_forward_pre_hook(hook)
    try:
        model.eval()
        score()
        tokens, eps, positive = state["tokens"], 1e-5, 0
        for j in (0, 14, 35):
            d = torch.zeros_like(tokens)
            d[:, 1:] = tokens[:, 1 + j][:, None, :] / 36
            state["shift"] = eps * d
            up = score()
            state["shift"] = -eps * d
            down = score()
            state["shift"] = None
            expected = ((up - down) / (2 * eps)).clamp_min(0).numpy()
            np.testing.assert_allclose(cam[:, j // 6, j % 6], expected, rtol=1e-4, atol=1e-9)
            positive += int((expected > 0).sum())
    finally:
        handle.remove()
    assert positive > 0  # the check covers unclipped patches, not only ReLU zeros


def test_training_mode_and_parameters_untouched(tiny, images):
    model, _, text = tiny
    model.train()
    try:
        ex.gradcam_map(model, images, text)
        ex.attention_rollout(model, images)
        assert all(m.training for m in model.modules())
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


# --------------------------------------------------------------------------------------------- mask geometry
def test_mask_geometry_for_tiny_preprocess(tiny):
    # SynthFairVLMed 128 x 166 -> Resize(96): 96 x int(96 * 166 / 128) = 96 x 124 -> CenterCrop: left = 14.
    # Raw column 83 (the middle) -> 83 * 124 / 166 - 14 = 48 = 3 patches of 16; raw columns < 18.74 are cut off.
    model, preprocess, _ = tiny
    assert ex.patch_grid(model) == (6, 6)
    left, top, margin = np.zeros((128, 166)), np.zeros((128, 166)), np.zeros((128, 166))
    left[:, :83], top[:64], margin[:, :18] = 1, 1, 1
    grids = ex.mask_to_grid(np.stack([np.ones((128, 166)), left, top, margin]), preprocess, model)
    np.testing.assert_allclose(grids[0], 1.0, atol=1e-12)
    np.testing.assert_allclose(grids[1], np.tile([1, 1, 1, 0, 0, 0], (6, 1)), atol=1e-12)
    np.testing.assert_allclose(grids[2], np.tile([[1], [1], [1], [0], [0], [0]], (1, 6)), atol=1e-12)
    np.testing.assert_allclose(grids[3], 0.0, atol=1e-12)
    # patch column 0 spans raw columns [18.74, 18.74 + 16 * 166 / 124); a mask of columns < 24 covers 5.26 / 21.42
    strip = np.zeros((128, 166))
    strip[:, :24] = 1
    share = (24 - 14 * 166 / 124) / (16 * 166 / 124)
    np.testing.assert_allclose(ex.mask_to_grid(strip, preprocess, model)[0, :, 0], share)
    # ViT-B-16 on the real 512 x 664 SLO: 224 x 290, left = 33; the centre column 332 lands on pixel 112
    from torchvision import transforms as T

    half = np.zeros((512, 664))
    half[:, :332] = 1
    big = ex.transform_mask(np.stack([np.ones((512, 664)), half]), T.Compose([T.Resize(224), T.CenterCrop(224)]))
    assert big.shape == (2, 224, 224) and big.min() >= 0 and big.max() <= 1
    np.testing.assert_allclose(big[0], 1.0)
    np.testing.assert_allclose(big[1, :, 111:113], [[1.0, 0.0]] * 224, atol=1e-12)


def test_mask_geometry_portrait_crop_and_letterbox_pad(tiny):
    import open_clip

    model, preprocess, _ = tiny
    # portrait 166 x 128: the crop is vertical, top = 14; raw rows < 18 are cut off, rows < 83 fill 3 patch rows
    top, margin = np.zeros((166, 128)), np.zeros((166, 128))
    top[:83], margin[:18] = 1, 1
    grids = ex.mask_to_grid(np.stack([top, margin]), preprocess, model)
    np.testing.assert_allclose(grids[0], np.tile([[1], [1], [1], [0], [0], [0]], (1, 6)), atol=1e-12)
    np.testing.assert_allclose(grids[1], 0.0, atol=1e-12)
    # resize_mode "longest": 128 x 166 -> 74 x 96, padded by 11 rows on top (and 11 below): the first and
    # last patch rows hold 16 - 11 = 5 image rows, so an all-ones mask covers 5/16 of them
    letterbox = open_clip.image_transform(96, is_train=False, resize_mode="longest")
    grid = ex.mask_to_grid(np.ones((128, 166)), letterbox, model)[0]
    np.testing.assert_allclose(grid, np.tile([[5 / 16], [1], [1], [1], [1], [5 / 16]], (1, 6)), atol=1e-12)
    pixels = letterbox(Image.fromarray(np.full((128, 166), 255.0, dtype=np.float32)))[0] * 0.26862954 + 0.48145466
    np.testing.assert_allclose(ex.transform_mask(np.ones((128, 166)), letterbox)[0], pixels.numpy(), atol=1e-5)


def test_transform_mask_agrees_with_the_image_preprocess(tiny):
    from fairbook.data.synthetic import render_fundus

    model, preprocess, _ = tiny
    _, disc, _ = render_fundus(np.random.default_rng(0), 0.5, 128, 166, 0.2)
    mine = ex.transform_mask(disc, preprocess)[0]
    # the real preprocess applied to the mask as an image, then un-normalised (channel 0)
    pixels = preprocess(Image.fromarray(disc.astype(np.float32) * 255))[0]
    theirs = (pixels * 0.26862954 + 0.48145466).numpy()
    assert mine.shape == (96, 96) and mine.sum() > 500
    assert np.abs(mine - theirs).mean() < 0.002 and np.abs(mine - theirs).max() < 0.15  # bicubic vs area at the rim
    assert mine.sum() == pytest.approx(theirs.sum(), rel=0.01)
    np.testing.assert_allclose(ex.upsample_map(ex.mask_to_grid(disc, preprocess, model), model).mean(), mine.mean())


def test_upsample_map_is_blockwise(tiny):
    model, _, _ = tiny
    maps = np.arange(36.0).reshape(1, 6, 6)
    up = ex.upsample_map(maps, model)
    assert up.shape == (1, 96, 96) and up[0, 17, 95] == 11 and up[0, 15, 16] == 1


# ------------------------------------------------------------------------------------- mass and routing maps
def test_mass_inside():
    mask = np.zeros((6, 6))
    mask[2:4, 2:4] = 1
    maps = np.zeros((4, 6, 6))
    maps[0, 2:4, 2:4] = [[1, 2], [3, 4]]  # entirely inside
    maps[1, 0, :] = 5  # entirely outside
    maps[2, 2, 2], maps[2, 0, 0], maps[2, 5, 5] = 2, 1, 1  # half inside
    maps[3] = -1  # no positive mass
    maps[3, 2, 2] = 1  # ... except inside: negatives do not count
    share = ex.mass_inside(maps, mask)
    np.testing.assert_allclose(share, [1.0, 0.0, 0.5, 1.0])
    half = np.full((1, 6, 6), 0.5)
    np.testing.assert_allclose(ex.mass_inside(np.ones((2, 6, 6)), half), [0.5, 0.5])  # (1, gh, gw) broadcasts
    assert np.isnan(ex.mass_inside(np.zeros((1, 6, 6)), mask))[0]


def test_routing_maps_round_trip():
    maps = torch.rand(2, 3, 6, 6)  # (B, M, gh, gw)
    tokens = maps.flatten(2).transpose(1, 2)  # (B, 36, M), row-major patches
    weights = torch.cat([torch.full((2, 1, 3), 9.0), tokens], dim=1)  # CLS first
    back = ex.routing_maps(weights, (6, 6))
    np.testing.assert_array_equal(back, maps.numpy())
    assert back[1, 2, 4, 1] == tokens[1, 4 * 6 + 1, 2]


# ------------------------------------------------------------------------------------------------ bad input
def _one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(ex.ExplainError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_inputs_give_one_line_errors(tiny, images):
    from torchvision import transforms as T

    model, preprocess, text = tiny
    _one_line_error("expected a tensor \\(B, 3, 96, 96\\)", ex.attention_rollout, model, torch.zeros(1, 3, 224, 224))
    _one_line_error("expected a tensor", ex.gradcam_map, model, images.numpy(), text)
    _one_line_error("not an open_clip VisionTransformer", ex.attention_rollout, torch.nn.Linear(3, 3), images)
    _one_line_error("text_features have shape", ex.image_text_similarity_map, model, images, torch.zeros(3, 128))
    _one_line_error("text_features have shape", ex.gradcam_map, model, images, torch.zeros(64))
    _one_line_error("unknown head_fusion", ex.attention_rollout, model, images, head_fusion="median")
    _one_line_error("discard_ratio", ex.attention_rollout, model, images, discard_ratio=1.0)
    _one_line_error("values in \\[0, 1\\]", ex.mask_to_grid, np.full((128, 166), 255), preprocess, model)
    _one_line_error("evaluation preprocess", ex.mask_to_grid, np.ones((128, 166)),
                    T.Compose([T.RandomResizedCrop(96), T.ToTensor()]), model)
    _one_line_error("preprocess outputs 64 x 64", ex.mask_to_grid, np.ones((128, 166)),
                    T.Compose([T.Resize(64), T.CenterCrop(64)]), model)
    _one_line_error("must both be \\(B, gh, gw\\)", ex.mass_inside, np.ones((2, 6, 6)), np.ones((2, 5, 5)))
    _one_line_error("expected \\(B, 37, M\\)", ex.routing_maps, torch.zeros(2, 36, 4), (6, 6))
    _one_line_error("expected \\(B, 6, 6\\)", ex.upsample_map, np.zeros((1, 5, 5)), model)


# ------------------------------------------------------------------------------------- gradient-weighted attention
def test_gradient_attention_keeps_the_forward_and_matches_hand_computation(tiny, images):
    """The hooked forward (attention recomputed with explicit probabilities) gives the tower's own output, and
    the map equals Chefer et al.'s recursion written out by hand from the recorded attentions and gradients."""
    model, _, text = tiny
    with torch.no_grad():
        expected = model.visual(images)
    found = []

    def replace(module, args, kwargs, output):
        out, probs = ex._attention_with_probs(module, args[0] if args else kwargs["query"])
        found.append(probs)
        return out, None

    handles = [m.register_forward_hook(replace, with_kwargs=True) for m in ex._attention_modules(model.visual)]
    with ex._hooks(*handles):
        got = model.visual(images)
        score = torch.nn.functional.cosine_similarity(got, text.expand(len(images), -1), dim=-1).sum()
        grads = torch.autograd.grad(score, found)
    torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=1e-4)
    L = found[0].shape[-1]
    relevance = torch.eye(L, dtype=torch.float64).repeat(len(images), 1, 1)
    for a, g in zip(found, grads):
        relevance = relevance + (a.detach().double() * g.double()).clamp_min(0).mean(1) @ relevance
    by_hand = (relevance - torch.eye(L, dtype=torch.float64))[:, 1:, 1:].mean(1)  # avg-pooled tower
    maps = ex.gradient_attention_map(model, images, text)
    np.testing.assert_allclose(maps.reshape(len(images), -1), by_hand.numpy(), rtol=1e-4, atol=1e-7)
    assert maps.min() >= 0 and maps.sum() > 0


def _planted_vit(pool_type: str, layers: int, steps: int):
    """A small ViT trained so that cos(f(x), t) separates the labels, where the label only shows in patch (1, 2)
    of a 4 x 4 grid (+1 or -1 added to that patch's pixels, noise elsewhere). Returns the tower, t and test data."""
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, width=32, layers=layers, heads=2, mlp_ratio=2.0,
                            output_dim=8, pool_type=pool_type)
    target = torch.nn.functional.normalize(torch.ones(8), dim=0)
    generator = torch.Generator().manual_seed(1)

    def batch(n):
        x = torch.randn(n, 3, 32, 32, generator=generator)
        y = torch.randint(0, 2, (n,), generator=generator)
        x[:, :, 8:16, 16:24] += (2.0 * y - 1)[:, None, None, None]
        return x, y

    optimiser = torch.optim.Adam(vit.parameters(), lr=3e-3)
    for _ in range(steps):
        x, y = batch(64)
        logit = 10 * torch.nn.functional.cosine_similarity(vit(x), target[None], dim=-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y.float())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return vit, target, batch(200)


@pytest.mark.parametrize("pool_type, layers, steps, method, at_least", [
    ("avg", 2, 150, "gradient-attention", 0.95),   # fairbook-tiny's pooling
    ("avg", 2, 150, "rollout", 0.9),
    ("tok", 2, 400, "gradient-attention", 0.7),    # ViT-B/16's pooling
])
def test_planted_signal_is_found_where_it_was_planted(one_thread, pool_type, layers, steps, method, at_least):
    """The label depends only on patch (1, 2): for the positive images (where the evidence raises the target
    score) the map's largest value falls on that patch in most images, and its mass share there is several times
    the 1/16 a uniform map would give."""
    vit, target, (x, y) = _planted_vit(pool_type, layers, steps)
    with torch.no_grad():
        accuracy = ((torch.nn.functional.cosine_similarity(vit(x), target[None], dim=-1) > 0).long() == y)
    assert accuracy.float().mean() > 0.95  # the model did learn the planted rule
    positive = x[y == 1]
    maps = ex.token_maps(vit, positive, method, target)
    region = np.zeros((4, 4))
    region[1, 2] = 1
    hits = (maps.reshape(len(maps), -1).argmax(1) == 1 * 4 + 2).mean()
    assert hits >= at_least
    assert np.nanmean(ex.mass_inside(maps, region)) > 2.5 / 16


# ------------------------------------------------------------------------------------------------- case studies
def test_sample_cases_balances_groups_and_labels(smoke_data):
    from fairbook.data.fairvlmed import FairVLMed

    test = FairVLMed(smoke_data, "Test")
    rows = ex.sample_cases(test, "race", per_cell=3, seed=0)
    cells = test.metadata.iloc[rows].groupby(["race", "glaucoma"]).size()
    available = test.metadata.groupby(["race", "glaucoma"]).size()
    assert (cells == available.clip(upper=3)).all() and len(set(rows)) == len(rows)
    np.testing.assert_array_equal(rows, ex.sample_cases(test, "race", per_cell=3, seed=0))
    masks = ex.region_masks(test, rows[:2])
    assert masks.shape == (2, 128, 166) and set(np.unique(masks)) <= {0.0, 1.0} and masks.sum() > 0
    _one_line_error("has no 'vessel_mask' array", ex.region_masks, test, rows[:1], "vessel_mask")


def test_share_table_hand_worked():
    import pandas as pd

    shares = pd.DataFrame({
        "model": ["A"] * 6, "seed": [0, 0, 0, 1, 1, 1], "case": [1, 2, 3, 1, 2, 3],
        "group": ["g", "g", "h", "g", "g", "h"], "share": [0.2, 0.4, 0.9, 0.4, 0.6, 0.7]})
    table = ex.share_table(shares, n_boot=200, seed=0).set_index("group")
    # group g: case means 0.3 and 0.5 -> 0.4; seed means 0.3 and 0.5 -> std 0.1414
    assert table.loc["g", "share"] == pytest.approx(0.4) and table.loc["g", "n"] == 2
    assert table.loc["g", "std"] == pytest.approx(np.std([0.3, 0.5], ddof=1))
    assert 0.3 <= table.loc["g", "lo"] <= 0.4 <= table.loc["g", "hi"] <= 0.5
    # group h: one case -> every resample is that case
    assert table.loc["h", "share"] == pytest.approx(0.8) and table.loc["h", "lo"] == table.loc["h", "hi"] == 0.8
    _one_line_error("lack the column", ex.share_table, shares.drop(columns="seed"))


def test_patch_routing_reads_the_image_patch_router(tiny, images):
    from fairbook.methods.fair_moe import add_fo_moe, routers

    model = add_fo_moe(copy.deepcopy(tiny[0]), n_experts=4, top_k=2, capacity=0.5)
    weights, dropped = ex.patch_routing(model, images)
    assert weights.shape == dropped.shape == (2, 4, 6, 6)
    routing = routers(model)["EI"].routing
    np.testing.assert_allclose(weights, ex.routing_maps(routing.routed, (6, 6)))
    assert ((weights > 0).sum(1) <= 2).all() and dropped.sum() > 0  # at most K1 kept; C = 0.5 drops some
    assert not ((weights > 0) & (dropped > 0)).any()  # an assignment is kept or dropped, not both
    _one_line_error("has no image patch MoE", ex.patch_routing, tiny[0], images)


def test_share_differences_are_paired_by_case_and_seed():
    import pandas as pd

    # two cases of group g, two seeds; B = A + 0.1 on every case and seed except seed 1 of case 2 (+0.3)
    a = pd.DataFrame({"model": "A", "seed": [0, 0, 1, 1], "case": [1, 2, 1, 2], "group": "g",
                      "share": [0.2, 0.5, 0.3, 0.4]})
    b = a.assign(model="B", share=a["share"] + [0.1, 0.1, 0.1, 0.3])
    table = ex.share_differences(pd.concat([a, b]), baseline="A", n_boot=300, seed=0)
    row = table.iloc[0]
    # per case (seed mean): case 1 +0.1, case 2 +0.2 -> 0.15; per seed: +0.1 and +0.2 -> std 0.0707
    assert (row["model"], row["baseline"], row["n"]) == ("B", "A", 2)
    assert row["diff"] == pytest.approx(0.15) and row["std"] == pytest.approx(np.std([0.1, 0.2], ddof=1))
    assert row["lo"] == pytest.approx(0.1) and row["hi"] == pytest.approx(0.2)  # resamples of 2 cases
    _one_line_error("baseline 'C' is not among", ex.share_differences, a, "C")


def test_dropped_shares_inside_and_outside_hand_worked():
    # 2 experts, 2 x 2 patches, K1 = 2 assignments per patch; 1 = kept weight > 0 or dropped
    weights = np.zeros((1, 2, 2, 2))
    dropped = np.zeros((1, 2, 2, 2))
    weights[0, :, 0, 0] = 0.5                          # patch (0, 0): both kept
    weights[0, 0, 0, 1], dropped[0, 1, 0, 1] = 0.5, 1  # patch (0, 1): one kept, one dropped
    dropped[0, :, 1, 0] = 1                            # patch (1, 0): both dropped
    weights[0, :, 1, 1] = 0.5                          # patch (1, 1): both kept
    grid = np.array([[[1.0, 0.5], [0.0, 0.0]]])        # (0, 0) inside, (0, 1) half inside
    table = ex.dropped_shares(weights, dropped, grid).set_index("region")["share"]
    assert table["inside"] == pytest.approx(0.5 * 1 / (1 * 2 + 0.5 * 2))  # 0.5 dropped of 3 weighted assignments
    assert table["outside"] == pytest.approx((0.5 * 1 + 2) / (0.5 * 2 + 2 + 2))  # 2.5 of 5
    _one_line_error("do not match", ex.dropped_shares, weights, dropped, grid[0])


def test_share_gap_hand_worked_and_sample_cases_by_codes(smoke_data):
    import pandas as pd

    from fairbook.data.fairvlmed import FairVLMed

    # marked cases 1, 2 (values 0.6, 0.8 at seed 0; 0.7, 0.9 at seed 1); unmarked case 3 (0.5, 0.5)
    shares = pd.DataFrame({"model": "A", "seed": [0, 0, 0, 1, 1, 1], "case": [1, 2, 3, 1, 2, 3],
                           "group": ["m", "m", "u", "m", "m", "u"], "share": [0.6, 0.8, 0.5, 0.7, 0.9, 0.5]})
    row = ex.share_gap(shares, "m", "u", n_boot=400).iloc[0]
    assert row["gap"] == pytest.approx(0.75 - 0.5) and row["std"] == pytest.approx(np.std([0.2, 0.3], ddof=1))
    assert row["lo"] == pytest.approx(0.15) and row["hi"] == pytest.approx(0.35)  # case means 0.65 or 0.85
    _one_line_error("no cases in group", ex.share_gap, shares, "m", "x")
    test = FairVLMed(smoke_data, "Test")
    codes = np.where(test.metadata["race"] == 1, test.metadata["gender"], -1)
    rows = ex.sample_cases(test, codes, per_cell=2, seed=0)
    assert (test.metadata["race"].iloc[rows] == 1).all() and len(rows) == 8  # 2 genders x 2 labels x 2
    _one_line_error("codes for", ex.sample_cases, test, codes[:-1], 2)


def test_relative_shares_divide_by_the_flat_map_of_the_same_case():
    import pandas as pd

    shares = pd.DataFrame({"model": "A", "seed": 0, "case": [1, 2, 1, 2], "group": "g",
                           "method": ["uniform", "uniform", "rollout", "rollout"], "share": [0.1, 0.2, 0.3, 0.3]})
    relative = ex.relative_shares(shares)
    assert relative["method"].tolist() == ["rollout", "rollout"]
    np.testing.assert_allclose(relative["share"], [3.0, 1.5])
    _one_line_error("no 'uniform' rows", ex.relative_shares, shares[shares["method"] == "rollout"])
