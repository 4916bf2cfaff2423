"""Token maps that explain an open_clip ViT image tower: attention rollout, Grad-CAM, patch-text similarity.

Every map is a float array of shape (B, gh, gw) on the model's patch grid (:func:`patch_grid`), one value per
image patch, row-major like the convolutional patch embedding. Masks given at the raw image resolution (the
optic disc and cup masks of SynthFairVLMed) are taken through the same resize and centre crop as the model's
preprocess and pooled onto that grid (:func:`mask_to_grid`), so that :func:`mass_inside` can report the share
of a map's mass that falls inside the disc, per image, for a case study by group.

Choices (see each function):

* rollout readout: CLS-pooled towers (``pool_type="tok"``, e.g. ViT-B-16) read the CLS row of the rollout;
  average-pooled towers (``pool_type="avg"``, fairbook-tiny) read the mean of the patch rows, because their
  image embedding is the mean of the final patch tokens; the CLS column is dropped and the map renormalised.
* gradient map: Grad-CAM (Selvaraju et al. 2017) on the tokens entering the last transformer block, with the
  cosine image-text similarity as the target score.
* gradient-weighted attention (Chefer, Gur & Wolf 2021): attention probabilities weighted by their gradients,
  accumulated over the blocks like rollout (:func:`gradient_attention_map`).
* routing maps of a Mixture-of-Experts block: :func:`routing_maps` reshapes any (B, L, M) per-token tensor;
  :func:`patch_routing` reads Fair-MoE's image patch router.

For the case-study chapter: :func:`sample_cases` (cases balanced by group and label), :func:`region_masks`,
:func:`region_shares` (share of each map inside the disc, and the flat-map level), :func:`share_table` and
:func:`share_differences` (bootstrap intervals over cases, spread over seeds) and :func:`dropped_shares`.

All model functions put the model in eval mode, run on the model's device and restore every module's
training flag afterwards. Bad input raises :class:`ExplainError` with one line naming the problem and the fix.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from open_clip.transform import CenterCropOrPad, ResizeKeepRatio
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import nn
from torchvision import transforms as T

HEAD_FUSIONS = ("mean", "max", "min")


class ExplainError(ValueError):
    """A model, image batch, text embedding, mask or preprocess that the explanation tools cannot use."""


# ------------------------------------------------------------------------------------------------ model, inputs
def _visual(model: nn.Module) -> VisionTransformer:
    """The open_clip ViT image tower of a CLIP model (``model.visual``) or the tower itself."""
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise ExplainError(
            f"{type(visual).__name__} is not an open_clip VisionTransformer: pass a ViT CLIP "
            "(e.g. create_clip('fairbook-tiny')) or its .visual tower"
        )
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        raise ExplainError("only ViT towers pooled by the CLS token ('tok') or the patch mean ('avg') are supported")
    return visual


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """(gh, gw): rows and columns of the patch grid of an open_clip ViT (image size // patch size)."""
    return tuple(int(g) for g in _visual(model).grid_size)


def _images(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The batch on the tower's device and dtype, after checking it is (B, 3, H, W) at the tower's input size."""
    size = tuple(visual.image_size)
    ok = isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3
    if not ok or tuple(images.shape[2:]) != size:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ExplainError(
            f"images have shape {shape}, expected a tensor (B, 3, {size[0]}, {size[1]}): pass them through the "
            "model's preprocess"
        )
    weight = visual.conv1.weight
    return images.detach().to(device=weight.device, dtype=weight.dtype)


def _text(visual: VisionTransformer, text_features, batch: int) -> torch.Tensor:
    """Text embeddings as a (B, D) tensor: one row for every image, or one row (or a 1-D vector) for all."""
    weight = visual.conv1.weight
    text = torch.as_tensor(text_features).detach().to(device=weight.device, dtype=weight.dtype)
    text = text[None] if text.ndim == 1 else text
    dim = int(visual.output_dim)
    if text.ndim != 2 or text.shape[1] != dim or text.shape[0] not in (1, batch):
        raise ExplainError(
            f"text_features have shape {tuple(text.shape)}, expected ({dim},), (1, {dim}) or ({batch}, {dim}): "
            "pass model.encode_text(tokenizer(prompts)) for one prompt or one per image"
        )
    return text.expand(batch, dim)


@contextlib.contextmanager
def _inference(model: nn.Module):
    """Eval mode (and no gradient checkpointing) for the duration; every module's own flags are restored after."""
    modes = [(module, module.training) for module in model.modules()]
    checkpointed = [m for m in model.modules() if getattr(m, "grad_checkpointing", False) is True]
    model.eval()
    for module in checkpointed:  # recomputation in backward would re-fire the capture hooks
        module.grad_checkpointing = False
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for module in checkpointed:
            module.grad_checkpointing = True


@contextlib.contextmanager
def _hooks(*handles):
    """Remove the given hook handles on exit, whatever happens."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _to_grid(values: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """(B, gh * gw) patch values (row-major, CLS already dropped) -> (B, gh, gw) float numpy array."""
    return values.detach().float().cpu().reshape(values.shape[0], *grid).numpy()


# ------------------------------------------------------------------------------------------- attention rollout
def _attention_probs(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_head)) per head for self-attention on x (B, L, E): (B, H, L, L).

    Q and K are recomputed from the block's ``in_proj`` weights on the attention input (``ln_1(x)`` in an
    open_clip ``ResidualAttentionBlock``), the scaled dot-product attention of Vaswani et al. 2017, eq. 1.
    """
    B, L, E = x.shape
    heads = attn.num_heads
    d = E // heads
    bias = attn.in_proj_bias[: 2 * E] if attn.in_proj_bias is not None else None
    q, k = F.linear(x, attn.in_proj_weight[: 2 * E], bias).chunk(2, dim=-1)
    q = q.reshape(B, L, heads, d).transpose(1, 2)
    k = k.reshape(B, L, heads, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)


def _attention_modules(visual: VisionTransformer) -> list[nn.MultiheadAttention]:
    modules = [getattr(block, "attn", None) for block in visual.transformer.resblocks]
    if not all(isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None for m in modules):
        raise ExplainError(
            "every transformer block needs an nn.MultiheadAttention .attn with packed in_proj weights "
            "(open_clip ResidualAttentionBlock); custom-attention blocks are not supported"
        )
    return modules


def attention_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Per-block attention probabilities of a ViT tower, a list of (B, H, L, L) CPU tensors (L = 1 + gh * gw).

    open_clip calls ``nn.MultiheadAttention`` with ``need_weights=False``, so a forward hook on each block's
    ``attn`` recomputes softmax(Q K^T / sqrt(d_head)) from the block's in_proj weights and the attention
    input; the forward pass itself is unchanged. Token 0 is CLS, then the patches row by row.
    """
    visual = _visual(model)
    x = _images(visual, images)
    found: list[torch.Tensor] = []

    def record(module, args, kwargs, output):
        query = args[0] if args else kwargs["query"]
        if kwargs.get("attn_mask") is not None:
            raise ExplainError("attention masks are not supported: explain an image tower, which has none")
        query = query if module.batch_first else query.transpose(0, 1)
        found.append(_attention_probs(module, query).float().cpu())

    handles = [m.register_forward_hook(record, with_kwargs=True) for m in _attention_modules(visual)]
    with _inference(model), torch.no_grad(), _hooks(*handles):
        visual(x)
    return found


def rollout(attentions, discard_ratio: float = 0.0, head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", sec. 3):
    R = Ã_n ... Ã_1 with Ã_l = row-normalised (A_l + I), A_l the head-fused attention of block l.

    ``attentions``: per-block (B, H, L, L) (or (H, L, L)) row-stochastic attention. ``head_fusion`` fuses heads
    by their mean (the paper), max or min. ``discard_ratio`` in [0, 1) zeroes the smallest ``int(ratio * L)``
    entries of every row of the fused attention before the identity is added (the noise filter of Gildenblat's
    vit-explain, applied per row here so that no row is emptied). Returns R, (B, L, L), rows summing to 1.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ExplainError(f"unknown head_fusion {head_fusion!r}: choose one of {', '.join(HEAD_FUSIONS)}")
    if not 0.0 <= float(discard_ratio) < 1.0:
        raise ExplainError(f"discard_ratio must lie in [0, 1), got {discard_ratio}")
    attentions = [torch.as_tensor(a, dtype=torch.float64) for a in attentions]
    if not attentions:
        raise ExplainError("no attention matrices given: pass one (B, H, L, L) tensor per block")
    attentions = [a[None] if a.ndim == 3 else a for a in attentions]
    B, _, L, _ = attentions[0].shape
    eye = torch.eye(L, dtype=torch.float64)
    result = eye.expand(B, L, L)
    for a in attentions:
        if a.ndim != 4 or a.shape[0] != B or a.shape[2:] != (L, L):
            raise ExplainError(f"attention of shape {tuple(a.shape)} does not match ({B}, H, {L}, {L})")
        fused = a.mean(1) if head_fusion == "mean" else a.amax(1) if head_fusion == "max" else a.amin(1)
        drop = int(discard_ratio * L)
        if drop:
            smallest = fused.topk(drop, dim=-1, largest=False).indices
            fused = fused.scatter(-1, smallest, 0.0)
        fused = fused + eye
        result = (fused / fused.sum(-1, keepdim=True)) @ result
    return result


def _readout(rolled: torch.Tensor, visual: VisionTransformer) -> torch.Tensor:
    """(B, L, L) rollout -> (B, gh * gw) patch weights summing to 1 (zeros when no mass reaches a patch)."""
    if visual.pool_type == "tok":
        patches = rolled[:, 0, 1:]  # the CLS output token is the image embedding
    else:
        patches = rolled[:, 1:, 1:].mean(1)  # the mean of the patch output tokens is the image embedding
    return patches / patches.sum(-1, keepdim=True).clamp_min(torch.finfo(patches.dtype).tiny)


def attention_rollout(model: nn.Module, images: torch.Tensor, discard_ratio: float = 0.0,
                      head_fusion: str = "mean") -> np.ndarray:
    """Attention-rollout map (Abnar & Zuidema 2020) of every image: (B, gh, gw), non-negative, each summing to 1.

    Readout: a CLS-pooled tower (``pool_type="tok"``, ViT-B-16) uses the CLS row of the rollout, as in the
    paper. An average-pooled tower (``pool_type="avg"``, fairbook-tiny) has no CLS readout; its embedding is
    the mean of the final patch tokens, so under rollout's linear-mixing assumption the flow from input token j
    into it is the mean of the patch rows, (1/N) sum_i R[i, j]; that is what is used. In both cases the column
    of the input CLS token (no location) is dropped and the map renormalised over the patches.
    See :func:`rollout` for ``discard_ratio`` and ``head_fusion``.
    """
    visual = _visual(model)
    rolled = rollout(attention_maps(model, images), discard_ratio, head_fusion)
    return _to_grid(_readout(rolled, visual), patch_grid(visual))


# ------------------------------------------------------------------------------------ gradient and similarity
def _attention_with_probs(module: nn.MultiheadAttention, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention output of ``module`` on ``query`` (B, L, E), computed from explicit probabilities so that
    they sit in the autograd graph: ``(out_proj(softmax(Q K^T / sqrt(d)) V), probabilities)``."""
    B, L, E = query.shape
    heads = module.num_heads
    probs = _attention_probs(module, query)
    bias = module.in_proj_bias[2 * E:] if module.in_proj_bias is not None else None
    v = F.linear(query, module.in_proj_weight[2 * E:], bias).reshape(B, L, heads, E // heads).transpose(1, 2)
    return module.out_proj((probs @ v).transpose(1, 2).reshape(B, L, E)), probs


def gradient_attention_map(model: nn.Module, images: torch.Tensor, text_features) -> np.ndarray:
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability",
    eqs. 5-6) for the target score y = cos(f(x), t): (B, gh, gw), non-negative.

    For every block, A_bar = mean over heads of (dy/dA * A)^+, and R <- R + A_bar R from R = I. The map is the
    relevance of each input patch for the pooled output: the CLS row of R - I for a CLS-pooled tower, the mean of
    the patch rows of R - I for an average-pooled one (as :func:`attention_rollout` reads out); the CLS column is
    dropped. The attention is recomputed from each block's weights with the probabilities in the autograd graph;
    the block outputs are unchanged (up to float rounding).
    """
    visual = _visual(model)
    x = _images(visual, images)
    text = _text(visual, text_features, x.shape[0])
    found: list[torch.Tensor] = []

    def replace(module, args, kwargs, output):
        query = args[0] if args else kwargs["query"]
        query = query if module.batch_first else query.transpose(0, 1)
        out, probs = _attention_with_probs(module, query)
        found.append(probs)
        return (out if module.batch_first else out.transpose(0, 1), None)

    handles = [m.register_forward_hook(replace, with_kwargs=True) for m in _attention_modules(visual)]
    with _inference(model), torch.enable_grad(), _hooks(*handles):
        features = visual(x)
        features = features[0] if isinstance(features, tuple) else features
        score = F.cosine_similarity(features, text, dim=-1)
        grads = torch.autograd.grad(score.sum(), found)
    B, _, L, _ = found[0].shape
    eye = torch.eye(L, dtype=torch.float64)
    relevance = eye.repeat(B, 1, 1)
    for probs, grad in zip(found, grads):
        weighted = (grad.double() * probs.detach().double()).clamp_min(0).mean(1)
        relevance = relevance + weighted @ relevance
    relevance = relevance - eye
    patches = relevance[:, 0, 1:] if visual.pool_type == "tok" else relevance[:, 1:, 1:].mean(1)
    return _to_grid(patches, patch_grid(visual))


def gradcam_map(model: nn.Module, images: torch.Tensor, text_features) -> np.ndarray:
    """Grad-CAM for a ViT (Selvaraju et al. 2017, eqs. 1-2) on the tokens entering the last block: (B, gh, gw).

    Target score y = cos(f(x), t): the cosine between the image embedding and the text embedding ``t``
    (e.g. the glaucoma prompt's; (D,) or (1, D) for every image, or (B, D)). With A the (N, C) patch tokens
    that the last transformer block reads (CLS excluded), the channel weights are the patch-averaged gradients
    alpha_c = (1/N) sum_k dy/dA_kc and the map is ReLU(sum_c alpha_c A_jc) for patch j. The last block's
    *input* is used, not its output, because in a CLS-pooled tower the output patch tokens do not reach the
    embedding (their gradient is zero). Only this score is differentiated; parameter gradients are untouched.
    In fairbook's planted-signal check (a label shown by one patch only) this channel-averaged map often misses
    the patch, while :func:`gradient_attention_map` and :func:`attention_rollout` find it; the case study
    chapter uses those two.
    """
    visual = _visual(model)
    x = _images(visual, images)
    text = _text(visual, text_features, x.shape[0])
    captured: dict[str, torch.Tensor] = {}

    def capture(module, args):
        tokens = args[0].detach().requires_grad_(True)
        captured["tokens"] = tokens
        return (tokens, *args[1:])

    handle = visual.transformer.resblocks[-1].register_forward_pre_hook(capture)
    with _inference(model), torch.enable_grad(), _hooks(handle):
        features = visual(x)
        features = features[0] if isinstance(features, tuple) else features
        score = F.cosine_similarity(features, text, dim=-1)
        (grad,) = torch.autograd.grad(score.sum(), captured["tokens"])
    tokens = captured["tokens"].detach()
    if not visual.transformer.batch_first:
        tokens, grad = tokens.transpose(0, 1), grad.transpose(0, 1)
    weights = grad[:, 1:].mean(1, keepdim=True)
    return _to_grid(torch.relu((weights * tokens[:, 1:]).sum(-1)), patch_grid(visual))


def image_text_similarity_map(model: nn.Module, images: torch.Tensor, text_features) -> np.ndarray:
    """Cosine between every patch token and a text embedding: (B, gh, gw), values in [-1, 1].

    Each final patch token goes through the same head as the pooled token, ``ln_post`` then ``proj`` (CLIP,
    Radford et al. 2021, the image encoder's final projection), and is compared with the text embedding by
    cosine similarity, the score CLIP's contrastive objective gives the whole image (Radford et al. 2021,
    fig. 3 pseudocode: logits = cosine of the projected, L2-normalised embeddings, times a temperature).
    ``text_features``: (D,) or (1, D) for every image, or (B, D).
    """
    visual = _visual(model)
    x = _images(visual, images)
    text = _text(visual, text_features, x.shape[0])
    captured: dict[str, torch.Tensor] = {}

    def capture(module, args, output):
        captured["tokens"] = output  # Transformer.forward returns (B, L, E) whatever its batch_first

    handle = visual.transformer.register_forward_hook(capture)
    with _inference(model), torch.no_grad(), _hooks(handle):
        visual(x)
        patches = visual.ln_post(captured["tokens"][:, 1:])
        if visual.proj is not None:
            patches = patches @ visual.proj
        similarity = F.cosine_similarity(patches, text[:, None, :], dim=-1)
    return _to_grid(similarity, patch_grid(visual))


# ------------------------------------------------------------------------------------------------ routing maps
def routing_maps(weights, grid: tuple[int, int]) -> np.ndarray:
    """Per-token weights of M experts, (B, L, M) with L = 1 + gh * gw (CLS first), as expert maps (B, M, gh, gw).

    The extension point for the router of a Mixture-of-Experts block (e.g. gate probabilities or top-k masks
    of a patched last block): the CLS token is dropped and the patch tokens are laid out row-major, like the
    patch embedding. ``grid`` is :func:`patch_grid` of the model.
    """
    weights = torch.as_tensor(weights)
    gh, gw = int(grid[0]), int(grid[1])
    if weights.ndim != 3 or weights.shape[1] != 1 + gh * gw:
        raise ExplainError(
            f"routing weights have shape {tuple(weights.shape)}, expected (B, {1 + gh * gw}, M): one row per token, "
            f"CLS first, for a {gh} x {gw} patch grid"
        )
    patches = weights[:, 1:].transpose(1, 2)  # (B, M, N)
    return patches.detach().float().cpu().reshape(weights.shape[0], -1, gh, gw).numpy()


# ------------------------------------------------------------------------------------------------- geometry
def upsample_map(maps, model: nn.Module) -> np.ndarray:
    """(B, gh, gw) patch maps -> (B, H, W) at the model's input size: each pixel takes the value of its patch
    (nearest-neighbour, exact: a patch is a patch_size square of the preprocessed image)."""
    visual = _visual(model)
    maps = np.asarray(maps, dtype=np.float64)
    grid = patch_grid(visual)
    if maps.ndim != 3 or maps.shape[1:] != grid:
        raise ExplainError(f"maps have shape {maps.shape}, expected (B, {grid[0]}, {grid[1]}) for this model")
    ph, pw = (int(p) for p in visual.patch_size)
    return np.repeat(np.repeat(maps, ph, axis=1), pw, axis=2)


def _geometry(preprocess, raw_hw: tuple[int, int]) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """The raw-image window (y0, y1, x0, x1) that the preprocess maps onto its output, and the output (h, w).

    Resizes scale the window onto a new pixel size (sizes taken by running the resize on a blank image, so
    torchvision's own rounding applies); centre crops shift it by torchvision's offset round((h - th) / 2), or
    by -((th - h) // 2) where they pad. Colour, tensor and normalisation steps do not move pixels.
    """
    h, w = raw_hw
    y0, y1, x0, x1 = 0.0, float(h), 0.0, float(w)
    for step in getattr(preprocess, "transforms", [preprocess]):
        if type(step).__name__.startswith("Random"):
            raise ExplainError(
                f"the preprocess contains {type(step).__name__}: pass the evaluation preprocess (preprocess_val)"
            )
        if isinstance(step, (T.Resize, ResizeKeepRatio)):
            w, h = step(Image.new("F", (w, h))).size
        elif isinstance(step, (T.CenterCrop, CenterCropOrPad)):
            size = step.size
            th, tw = (size, size) if isinstance(size, int) else (size[0], size[-1])
            top = round((h - th) / 2) if th <= h else -((th - h) // 2)
            left = round((w - tw) / 2) if tw <= w else -((tw - w) // 2)
            sy, sx = (y1 - y0) / h, (x1 - x0) / w
            y0, x0 = y0 + top * sy, x0 + left * sx
            y1, x1 = y0 + th * sy, x0 + tw * sx
            h, w = th, tw
    return (y0, y1, x0, x1), (h, w)


def _cell_weights(lo: float, hi: float, out_len: int, cell: int, raw_len: int) -> np.ndarray:
    """(out_len // cell, raw_len) overlap fractions: row k = share of output cell k (in raw coordinates
    [lo + k * cell * s, lo + (k + 1) * cell * s), s = (hi - lo) / out_len) covered by each raw pixel."""
    step = (hi - lo) / out_len * cell
    edges = lo + step * np.arange(out_len // cell + 1)
    pixels = np.arange(raw_len)[None, :]
    overlap = np.minimum(edges[1:, None], pixels + 1) - np.maximum(edges[:-1, None], pixels)
    return np.clip(overlap, 0.0, None) / step


def _masks(masks) -> np.ndarray:
    masks = np.asarray(masks, dtype=np.float64)
    masks = masks[None] if masks.ndim == 2 else masks
    if masks.ndim != 3 or masks.size == 0 or masks.min() < 0 or masks.max() > 1:
        raise ExplainError(
            f"masks must be (H, W) or (B, H, W) arrays with values in [0, 1], got shape {masks.shape}: "
            "pass disc_mask / cup_mask from the npz files"
        )
    return masks


def _pool_mask(masks, preprocess, cell: int) -> tuple[np.ndarray, tuple[int, int]]:
    masks = _masks(masks)
    (y0, y1, x0, x1), (h, w) = _geometry(preprocess, masks.shape[1:])
    rows = _cell_weights(y0, y1, h, cell, masks.shape[1])
    cols = _cell_weights(x0, x1, w, cell, masks.shape[2])
    pooled = rows @ masks @ cols.T  # (k, H) @ (B, H, W) @ (W, l)
    return np.clip(pooled, 0.0, 1.0), (h, w)  # rounding can give 1 + 1e-16


def transform_mask(masks, preprocess) -> np.ndarray:
    """Raw-resolution masks (H, W) or (B, H, W) taken through the preprocess's resize and centre crop:
    (B, S, S) at the model's input size, each pixel the fraction of its area inside the mask (exact area
    resampling instead of the image's bicubic kernel, so values stay in [0, 1]; padding counts as outside)."""
    return _pool_mask(masks, preprocess, 1)[0]


def mask_to_grid(masks, preprocess, model: nn.Module) -> np.ndarray:
    """Raw-resolution masks (H, W) or (B, H, W) -> (B, gh, gw): the fraction of each patch of the preprocessed
    image that lies inside the mask (same resize and centre crop as ``preprocess``, the model's
    preprocess_val; exact area overlap)."""
    visual = _visual(model)
    pooled, size = _pool_mask(masks, preprocess, int(visual.patch_size[0]))
    if size != tuple(visual.image_size) or visual.patch_size[0] != visual.patch_size[1]:
        raise ExplainError(
            f"the preprocess outputs {size[0]} x {size[1]} images but the model reads {tuple(visual.image_size)} "
            "with square patches: pass this model's own preprocess_val"
        )
    return pooled


def mass_inside(maps, masks) -> np.ndarray:
    """Share of each map's mass inside a mask, per image: sum_j m_j w_j / sum_j m_j with m = max(map, 0).

    ``maps``: (B, gh, gw) token maps (negative values count as zero); ``masks``: (B, gh, gw), or (1, gh, gw) or
    (gh, gw) for every image: the fraction of each patch inside the region (:func:`mask_to_grid`), so a patch
    half inside contributes half its mass. This is the "share of attention mass inside the optic disc" of the
    case study. Images whose map has no positive mass get NaN.
    """
    maps = np.clip(np.asarray(maps, dtype=np.float64), 0.0, None)
    masks = np.asarray(masks, dtype=np.float64)
    if maps.ndim == 3 and masks.shape in (maps.shape[1:], (1, *maps.shape[1:])):
        masks = np.broadcast_to(masks, maps.shape)  # one mask for every image
    if maps.ndim != 3 or masks.shape != maps.shape or maps.size == 0 or masks.min() < 0 or masks.max() > 1:
        raise ExplainError(
            f"maps {maps.shape} and masks {masks.shape} must both be (B, gh, gw) with masks in [0, 1]: "
            "pool raw masks with mask_to_grid"
        )
    total = maps.sum(axis=(1, 2))
    inside = (maps * masks).sum(axis=(1, 2))
    return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


# ---------------------------------------------------------------------------------------------- case studies
#: Token maps a case study can compute by name (:func:`token_maps`).
MAP_METHODS = ("rollout", "gradient-attention", "gradcam", "similarity")


def sample_cases(dataset, by, per_cell: int, seed: int = 0) -> np.ndarray:
    """Item indices of ``dataset`` (a :class:`fairbook.data.FairVLMed`): ``per_cell`` items drawn without
    replacement from every (group, label) cell, fewer where a cell is smaller; seeded, sorted. ``by``: an
    attribute name (its groups; unknown left out) or one integer code per item (negative codes left out).
    Equal label counts per group keep the label mix from differing between the groups being compared."""
    codes = np.asarray(dataset.groups(by) if isinstance(by, str) else by)
    labels = np.asarray(dataset.metadata["glaucoma"])
    if codes.shape != labels.shape:
        raise ExplainError(f"by has {codes.size} codes for {labels.size} items: pass an attribute name or one "
                           "code per item")
    rng = np.random.default_rng(seed)
    rows = []
    for code in np.unique(codes[codes >= 0]):
        for label in (0, 1):
            cell = np.flatnonzero((codes == code) & (labels == label))
            rows.append(rng.choice(cell, size=min(int(per_cell), len(cell)), replace=False))
    return np.sort(np.concatenate(rows)) if rows else np.empty(0, dtype=int)


def region_masks(dataset, rows, key: str = "disc_mask") -> np.ndarray:
    """The ``key`` masks (e.g. SynthFairVLMed's ``disc_mask``, at the raw image resolution) of items ``rows``:
    (B, H, W) floats in [0, 1]. The real Harvard-FairVLMed has no masks: that raises :class:`ExplainError`."""
    masks = []
    for row in np.asarray(rows, dtype=int):
        path = dataset.metadata["path"].iloc[row]
        with np.load(path) as npz:
            if key not in npz.files:
                raise ExplainError(f"{path} has no {key!r} array (the real Harvard-FairVLMed has no masks): region "
                                   "shares need SynthFairVLMed or masks added to the npz files")
            masks.append(np.asarray(npz[key], dtype=np.float64))
    return np.stack(masks)


def token_maps(model: nn.Module, images: torch.Tensor, method: str, text_features=None,
               batch_size: int = 64) -> np.ndarray:
    """(B, gh, gw) maps of ``method`` (:data:`MAP_METHODS`: :func:`attention_rollout`,
    :func:`gradient_attention_map`, :func:`gradcam_map`, :func:`image_text_similarity_map`) for a batch of
    preprocessed images, computed ``batch_size`` at a time.
    ``text_features`` (the target text embedding) is needed by "gradcam" and "similarity"."""
    if method not in MAP_METHODS:
        raise ExplainError(f"unknown map method {method!r}: choose one of {', '.join(MAP_METHODS)}")
    if method != "rollout" and text_features is None:
        raise ExplainError(f"method {method!r} needs text_features: pass the embedding of the target prompt")
    maps = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if method == "rollout":
            maps.append(attention_rollout(model, chunk))
        elif method == "gradient-attention":
            maps.append(gradient_attention_map(model, chunk, text_features))
        elif method == "gradcam":
            maps.append(gradcam_map(model, chunk, text_features))
        else:
            maps.append(image_text_similarity_map(model, chunk, text_features))
    return np.concatenate(maps)


def case_images(dataset, rows) -> torch.Tensor:
    """(B, 3, H, W) preprocessed images of items ``rows`` of ``dataset`` (its own preprocess, e.g. preprocess_val)."""
    return torch.stack([dataset[int(row)]["image"] for row in rows])


def decision_direction(model: nn.Module, tokenizer, prompts) -> torch.Tensor:
    """t+ - t-: the difference of the positive and negative class embeddings
    (:func:`fairbook.train.class_embeddings`). For a unit image embedding f, f . (t+ - t-) is the zero-shot logit
    difference divided by the logit scale, and cos(f, t+ - t-) is proportional to it, so a map whose target is
    this direction explains the model's glaucoma decision rather than its match with one prompt."""
    from fairbook.train import class_embeddings

    with torch.no_grad():
        negative, positive = class_embeddings(model, tokenizer, prompts)
    return positive - negative


def region_shares(model: nn.Module, images: torch.Tensor, masks, preprocess, methods=("rollout",),
                  target=None) -> pd.DataFrame:
    """Share of each map's mass inside a region, for every image and map method: one row per (method, item).

    ``masks``: the raw-resolution masks of the images (:func:`region_masks`), or one (H, W) mask for all of them,
    pooled onto the patch grid through
    ``preprocess`` (the model's preprocess_val, :func:`mask_to_grid`); ``target``: the text direction for the
    gradient and similarity maps (:func:`decision_direction`). Method "uniform" is the share of a flat map, i.e.
    the region's share of the image: the level a map that ignores the image would reach.
    """
    grid = mask_to_grid(masks, preprocess, model)
    frames = []
    for method in methods:
        maps = (np.ones((len(images), *grid.shape[1:])) if method == "uniform"
                else token_maps(model, images, method, target))
        frames.append(pd.DataFrame({"method": method, "item": np.arange(len(images)),
                                    "share": mass_inside(maps, grid)}))
    return pd.concat(frames, ignore_index=True)


def model_shares(models: Mapping[str, tuple[str, str, str]], seeds, images: torch.Tensor, masks, methods,
                 prompts: str = "fairmedfm") -> pd.DataFrame:
    """:func:`region_shares` of every trained model and seed: one row per (model, seed, method, item).

    ``models``: {name: (run folder, method, training attribute)} as :func:`fairbook.protocol.load_model` reads
    them; the target direction of the gradient and similarity maps is :func:`decision_direction` of the model
    with the ``prompts`` set of :data:`fairbook.train.PROMPT_SETS`.
    """
    from fairbook.protocol import load_model
    from fairbook.train import PROMPT_SETS

    frames = []
    for name, (run, method, attribute) in models.items():
        for seed in seeds:
            net, preprocess, tokenizer = load_model(run, method, attribute, seed)
            target = decision_direction(net, tokenizer, PROMPT_SETS[prompts])
            shares = region_shares(net, images, masks, preprocess, methods, target)
            frames.append(shares.assign(model=name, seed=seed))
    return pd.concat(frames, ignore_index=True)


def relative_shares(shares: pd.DataFrame) -> pd.DataFrame:
    """Each map's share divided by the flat map's share on the same case (method "uniform" of
    :func:`region_shares`): 1 means no concentration on the region, 3 three times the share a map that ignores
    the image would put there. Same rows as ``shares`` without the "uniform" ones, ready for :func:`share_table`."""
    keys = ["model", "seed", "case"]
    if "uniform" not in set(shares.get("method", [])):
        raise ExplainError("shares have no 'uniform' rows: compute region_shares with 'uniform' among the methods")
    flat = shares[shares["method"] == "uniform"].set_index(keys)["share"]
    maps = shares[shares["method"] != "uniform"]
    level = flat.reindex(pd.MultiIndex.from_frame(maps[keys])).to_numpy()
    return maps.assign(share=maps["share"].to_numpy() / level)


def _case_draws(per_case: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """{group: (n_boot, n) resampled case ids}: the cases of each group drawn with replacement, one row per
    resample; the same draws serve every model, so intervals and paired differences share them."""
    rng = np.random.default_rng(seed)
    draws = {}
    for group, ids in per_case.groupby("group", sort=False)["case"]:
        unique = np.unique(ids.to_numpy())
        draws[group] = unique[rng.integers(0, len(unique), size=(int(n_boot), len(unique)))]
    return draws


def _resampled_means(values: pd.Series, draws: np.ndarray) -> np.ndarray:
    """Mean of ``values`` (indexed by case) over each row of ``draws``; NaN cases are skipped."""
    return np.nanmean(values.reindex(draws.ravel()).to_numpy().reshape(draws.shape), axis=1)


def _per_case(shares: pd.DataFrame) -> pd.DataFrame:
    missing = {"model", "seed", "case", "group", "share"} - set(shares.columns)
    if missing:
        raise ExplainError(f"shares lack the column(s) {', '.join(sorted(missing))}; build one row per model, seed "
                           "and case with its group and share")
    return shares.groupby(["model", "group", "case"], sort=False)["share"].mean().reset_index()


def share_table(shares: pd.DataFrame, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Mean share of map mass inside a region, per model and group, with seed spread and a bootstrap interval.

    ``shares``: one row per (``model``, ``seed``, ``case``) with the case's ``group`` and its ``share``
    (:func:`mass_inside`). Returns one row per (model, group): ``n`` cases, ``share`` (mean over cases of the
    seed-mean share), ``std`` (sample std over seeds of the per-seed mean), and ``lo``/``hi``: the percentile
    interval of the share over ``n_boot`` resamples of the cases within the group (the same resamples for every
    model, so the intervals of two models describe the same case draws). Cases whose map had no mass (NaN
    share) are left out of that model's numbers.
    """
    per_case = _per_case(shares)
    draws, alpha, rows = _case_draws(per_case, n_boot, seed), (1.0 - level) / 2, []
    for (model, group), frame in per_case.groupby(["model", "group"], sort=False):
        values = frame.set_index("case")["share"]
        boot = _resampled_means(values, draws[group])
        per_seed = shares[(shares["model"] == model) & (shares["group"] == group)].groupby("seed")["share"].mean()
        rows.append({"model": model, "group": group, "n": int(values.notna().sum()), "share": float(values.mean()),
                     "std": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else float("nan"),
                     "lo": float(np.nanquantile(boot, alpha)), "hi": float(np.nanquantile(boot, 1 - alpha))})
    return pd.DataFrame(rows)


def share_differences(shares: pd.DataFrame, baseline: str, n_boot: int = 1000, level: float = 0.95,
                      seed: int = 0) -> pd.DataFrame:
    """Paired difference of region shares against ``baseline``, per model and group, on the same cases.

    For every case, the model's seed-mean share minus the baseline's; ``diff`` is the mean over the group's cases
    and ``lo``/``hi`` its percentile interval over ``n_boot`` resamples of those cases (paired: a resample
    takes both models' values of the case). That interval covers the choice of cases for fixed trained models;
    ``std`` is the sample std over seeds of the per-seed difference (seed k against the baseline's seed k), the
    training variation, which the interval does not contain. ``shares`` as for :func:`share_table`.
    """
    per_case = _per_case(shares)
    if baseline not in set(per_case["model"]):
        raise ExplainError(f"baseline {baseline!r} is not among the models {sorted(set(per_case['model']))}; "
                           "pass one of them")
    wide = per_case.pivot_table(index=["group", "case"], columns="model", values="share")
    by_seed = shares.groupby(["model", "group", "seed"])["share"].mean()
    draws, alpha, rows = _case_draws(per_case, n_boot, seed), (1.0 - level) / 2, []
    for model in [m for m in dict.fromkeys(per_case["model"]) if m != baseline]:
        for group in draws:
            diff = (wide.loc[group, model] - wide.loc[group, baseline])
            boot = _resampled_means(diff, draws[group])
            seeds = (by_seed.loc[(model, group)] - by_seed.loc[(baseline, group)]).dropna()
            rows.append({"model": model, "baseline": baseline, "group": group, "n": int(diff.notna().sum()),
                         "diff": float(diff.mean()), "std": float(seeds.std(ddof=1)) if len(seeds) > 1 else np.nan,
                         "lo": float(np.nanquantile(boot, alpha)), "hi": float(np.nanquantile(boot, 1 - alpha))})
    return pd.DataFrame(rows)


def share_gap(shares: pd.DataFrame, first: str, second: str, n_boot: int = 1000, level: float = 0.95,
              seed: int = 0) -> pd.DataFrame:
    """Difference of the mean ``share`` between two groups of cases, per model: ``first`` minus ``second``.

    ``shares`` as for :func:`share_table` (the ``share`` column may hold any per-case value, e.g. a score).
    ``gap`` is the difference of the group means of the seed-mean values; ``std`` the sample std over seeds of
    the per-seed gap; ``lo``/``hi`` its percentile interval over ``n_boot`` resamples that draw the cases of each
    group independently (the groups hold different cases).
    """
    per_case = _per_case(shares)
    missing = {first, second} - set(per_case["group"])
    if missing:
        raise ExplainError(f"no cases in group(s) {', '.join(sorted(missing))}; choose among "
                           f"{sorted(set(per_case['group']))}")
    draws, alpha, rows = _case_draws(per_case, n_boot, seed), (1.0 - level) / 2, []
    by_seed = shares.groupby(["model", "group", "seed"])["share"].mean()
    for model, frame in per_case.groupby("model", sort=False):
        values = {g: frame[frame["group"] == g].set_index("case")["share"] for g in (first, second)}
        boot = _resampled_means(values[first], draws[first]) - _resampled_means(values[second], draws[second])
        seeds = (by_seed.loc[(model, first)] - by_seed.loc[(model, second)]).dropna()
        rows.append({"model": model, "first": first, "second": second, "gap": float(values[first].mean()
                     - values[second].mean()), "std": float(seeds.std(ddof=1)) if len(seeds) > 1 else np.nan,
                     "lo": float(np.nanquantile(boot, alpha)), "hi": float(np.nanquantile(boot, 1 - alpha))})
    return pd.DataFrame(rows)


def dropped_shares(weights, dropped, grid) -> pd.DataFrame:
    """Share of the Top_r assignments that the capacity limit removed, inside the region and outside it: one row
    per (item, region) with ``region`` "inside" or "outside" and ``share``.

    ``weights``, ``dropped``: (B, M, gh, gw) from :func:`patch_routing` (an assignment is kept where its weight is
    positive, dropped where ``dropped`` is 1); ``grid``: (B, gh, gw) region fractions per patch
    (:func:`mask_to_grid`), so a patch partly inside counts with its inside fraction.
    """
    kept, lost = (np.asarray(weights) > 0).sum(1), (np.asarray(dropped) > 0).sum(1)
    grid = np.asarray(grid, dtype=float)
    if kept.shape != grid.shape or lost.shape != grid.shape:
        raise ExplainError(f"weights {np.shape(weights)}, dropped {np.shape(dropped)} and grid {grid.shape} do not "
                           "match: pass (B, M, gh, gw), (B, M, gh, gw) and (B, gh, gw) of the same images")
    frames = []
    for region, weight in (("inside", grid), ("outside", 1.0 - grid)):
        assigned = (weight * (kept + lost)).sum(axis=(1, 2))
        share = np.where(assigned > 0, (weight * lost).sum(axis=(1, 2)) / np.where(assigned > 0, assigned, 1.0),
                         np.nan)
        frames.append(pd.DataFrame({"item": np.arange(len(grid)), "region": region, "share": share}))
    return pd.concat(frames, ignore_index=True)


def patch_size(model: nn.Module) -> int:
    """Side of a (square) patch of the model's ViT tower, in pixels of the preprocessed image."""
    return int(_visual(model).patch_size[0])


def patch_routing(model: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Which image patches each expert of Fair-MoE's image patch MoE took, and which the capacity dropped.

    Runs the image tower of a model patched by :func:`fairbook.methods.fair_moe.add_fo_moe` and reads the ``EI``
    router's :class:`fairbook.methods.fair_moe.Routing`: returns ``(weights, dropped)``, each (B, M1, gh, gw)
    (:func:`routing_maps`):
    ``weights`` the kept gate weights ``W_hat`` (0 where Top_r or Top_c removed the assignment), ``dropped`` 1
    where Top_r assigned the patch to the expert and Top_c removed it.
    """
    from fairbook.methods.fair_moe import routers

    router = routers(model).get("EI")
    if router is None:
        raise ExplainError("the model has no image patch MoE: pass a Fair-MoE model "
                           "(fairbook.methods.fair_moe.add_fo_moe "
                           "with image=True, patch=True)")
    visual = _visual(model)
    with _inference(model), torch.no_grad():
        visual(_images(visual, images))
    routing, grid = router.routing, patch_grid(visual)
    return routing_maps(routing.routed.float(), grid), routing_maps(routing.dropped.float(), grid)


__all__ = [
    "ExplainError", "HEAD_FUSIONS", "MAP_METHODS", "attention_maps", "attention_rollout", "case_images",
    "decision_direction", "dropped_shares", "gradcam_map", "gradient_attention_map",
    "image_text_similarity_map", "mask_to_grid", "mass_inside", "model_shares", "patch_grid", "patch_routing",
    "patch_size", "region_masks", "region_shares", "relative_shares", "rollout", "routing_maps", "sample_cases",
    "share_differences", "share_gap", "share_table", "token_maps", "transform_mask", "upsample_map",
]
