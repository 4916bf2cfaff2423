"""Fair-MoE for open_clip CLIP: the FO-MoE layers, the FOL loss and per-group routing diagnostics.

Paper: Wang, Tong, Wu, Liu & Liu, "Fair-MoE: Medical Fairness-Oriented Mixture of Experts in Vision-Language
Models" (section 2, Fig. 1-2; ablations in Tables 2-4), and its official repository. Each component has one switch,
``form``: ``"paper"`` (the equations as published, fairbook's default) or ``"code"`` (the official code's quirks).

* :class:`PatchMoE` (Sec. 2.1, "Patch Embedding-based MoE"): replaces the MLP of the LAST residual block of a
  tower. ``W = softmax(G(I))``, ``W_hat = Top_c(Top_r(W, K1), C (N+1) K1 / M1)``, output ``sum_j W_hat_j E_j(I)``.
* :class:`FeatureMoE` (Sec. 2.1, "Feature-based MoE"): after each encoder, ``I3 = sum_b W_hat_b E_b(I0)`` with
  ``W_hat = Top_r(softmax(G(I0)), k2)``.
* :class:`LowRankExperts`: a fairbook option (``expert_rank``), not in the paper or the code: the M1 patch
  experts share the block's MLP and each adds rank-r updates, so that FO-MoE adds few parameters.
* :func:`add_fo_moe`: patches a CLIP in place (image/text x patch/feature, the ablations of Table 4 b-c).
* :class:`FairnessOrientedLoss` (Sec. 2.2, FOL): ``F_EI + F_ET + F_FI + F_FT + L_distance`` with
  ``F_r = sum_p sum_j (Var(O_j) - Var(O_{p,j}))^2``; the distance is
  :class:`fairbook.methods.fairclip.FairCLIPRegulariser`.
* :class:`RoutingLog` / :func:`routing_frame`: expert load, capacity drops and gate variance per group.
* :class:`FairMoE`: the method on the harness (chapters 13 and 20-22): which layers, which loss.

Not reproduced from the official snapshot (ablation leftovers): only its text routers feed FOL
(``weights={"ET": w, "FT": w}`` gives that) and its image feature MoE is missing from the optimizer (stays random).
Its hard-coded capacity of 197 tokens is replaced by the real sequence length (:func:`expert_capacity`).

Router names follow the paper's loss terms: ``EI``/``ET`` the patch MoEs of the image/text encoder, ``FI``/``FT``
the feature MoEs.

Where the pooled feature comes from matters for the patch MoE: the MLP acts token by token after the last
attention, so only the tokens that are pooled reach the encoder output directly. For the text tower that is the
EOT token alone (open_clip's ``argmax`` pooling); for ViT-B/16 (``pool_type="tok"``) the class token alone; for
``fairbook-tiny`` (average pooling) every patch token. The other tokens still matter through capacity (they
compete for an expert's slots, so they can push a pooled token out) and through the FOL statistics.
"""
from __future__ import annotations

import copy
import math
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from fairbook.data.attributes import ATTRIBUTES, FILTER_ATTRIBUTES, UNKNOWN, decode
from fairbook.methods.base import Claim, Method, MethodError
from fairbook.methods.fairclip import FairCLIP, FairCLIPRegulariser

__all__ = [
    "CLAIMS", "TABLE4",
    "FORMS", "ROUTERS", "FairMoE", "FairnessOrientedLoss", "FeatureMoE", "LowRankExperts", "MoEError", "PatchMoE",
    "Routing", "RoutingLog", "add_fo_moe", "expert_capacity", "fol", "group_variance_gap", "moe_parameter_names",
    "routers", "routing_frame", "split_rows", "top_c_mask", "top_r_mask",
]

#: Router names: patch MoE of the image / text encoder, feature MoE after the image / text encoder (Sec. 2.2).
ROUTERS = ("EI", "ET", "FI", "FT")
#: ``"paper"``: as published; ``"code"``: as the official repository computes it.
FORMS = ("paper", "code")
#: fairbook's feature-MoE size in paper form (the paper gives no M2 or k2).
PAPER_FEATURE_EXPERTS, PAPER_FEATURE_TOP_K = 4, 2


class MoEError(ValueError):
    """A Fair-MoE setting or input that cannot be used; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------- routing
def expert_capacity(capacity: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """Tokens one expert may take per sample: ``ceil(C (N+1) K1 / M1)``, the ``k`` of ``Top_c`` (Sec. 2.1).

    ``n_tokens`` is the real sequence length ``N + 1`` of the input (e.g. 197 for ViT-B/16, 77 for text). The
    official code hard-codes ``int(197 * C * K1 / M1)`` = 47 for every tower (text and ViT-L/14 included) and
    rounds down; fairbook rounds up (48 for ViT-B/16 at C = 0.8, K1 = 3, M1 = 10) so that ``C K1 / M1 >= 1``
    never drops a token. A 1e-9 slack keeps float error (0.8 * 25 * 3 / 10 = 6.000000000000001) from adding one.
    """
    return max(1, math.ceil(capacity * n_tokens * top_k / n_experts - 1e-9))


def top_r_mask(weights: torch.Tensor, k: int) -> torch.Tensor:
    """``Top_r(W, k)`` of Sec. 2.1 as a mask: True at the ``k`` largest weights of each row (last dimension)."""
    index = weights.topk(k, dim=-1).indices
    return torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, index, True)


def top_c_mask(weights: torch.Tensor, keep: torch.Tensor, capacity: int) -> torch.Tensor:
    """``Top_c(Top_r(W), capacity)`` of Sec. 2.1 as a mask, for ``(B, L, M)`` weights of ``L`` tokens.

    For each sample and expert (a column of the sample's ``L x M`` matrix) at most ``capacity`` tokens survive:
    those with the largest weight for that expert among the tokens that ``keep`` (the ``Top_r`` mask) routes to
    it. The result is a subset of ``keep``; ties are broken by ``torch.topk``.
    """
    scores = weights.masked_fill(~keep, float("-inf"))
    index = scores.topk(min(capacity, weights.shape[1]), dim=1).indices
    return torch.zeros_like(keep).scatter_(1, index, True) & keep


@dataclass
class Routing:
    """What a router computed in its last forward (Fig. 2 notation).

    ``gate``: the softmax weights ``W`` (``(B, L, M)`` for a patch router, ``(B, M)`` for a feature router);
    ``routed``: ``W_hat`` (``W`` where ``mask`` is True, 0 elsewhere; renormalised if the router does so), the
    matrix FOL calls ``O``; ``top_r``: the ``Top_r`` mask; ``mask``: the final mask (``Top_c`` applied).
    ``routed`` keeps its autograd graph during training, which is what FOL needs.
    """

    gate: torch.Tensor
    routed: torch.Tensor
    top_r: torch.Tensor
    mask: torch.Tensor

    @property
    def dropped(self) -> torch.Tensor:
        """Assignments removed by capacity: kept by ``Top_r`` for an expert, then cut by ``Top_c``."""
        return self.top_r & ~self.mask

    @property
    def samples(self) -> int:
        return self.gate.shape[0]

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(O, sample)``: one row of routed weights per token (patch router: every token of every sample) or
        per sample (feature router), and the batch index of the sample each row belongs to."""
        n_experts = self.routed.shape[-1]
        per_sample = self.routed[0].numel() // n_experts
        sample = torch.arange(self.samples, device=self.routed.device).repeat_interleave(per_sample)
        return self.routed.reshape(-1, n_experts), sample


class _LastRouting:
    """Holder of a router's last :class:`Routing`. Copies and pickles as empty: the tensors may carry an autograd
    graph, which ``copy.deepcopy`` refuses, and a stale routing is no part of a model's state."""

    def __init__(self) -> None:
        self.value: Routing | None = None

    def __deepcopy__(self, memo) -> _LastRouting:
        return _LastRouting()

    def __getstate__(self) -> dict:
        return {"value": None}


def _check_routing(n_experts: int, top_k: int, capacity: float = 1.0) -> None:
    if int(n_experts) < 1 or not 1 <= int(top_k) <= int(n_experts):
        raise MoEError(f"need 1 <= top_k <= n_experts, got top_k={top_k} and n_experts={n_experts}; "
                       "lower top_k or add experts")
    if not capacity > 0:
        raise MoEError(f"capacity factor C must be > 0, got {capacity}; the paper uses 0.8")


def _gate(dim: int, n_experts: int, activation: nn.Module) -> nn.Sequential:
    """Gate MLP ``Linear(d, d/4) - activation - Linear(d/4, M)`` (official code; the paper says only "a MLP")."""
    hidden = max(1, dim // 4)
    return nn.Sequential(nn.Linear(dim, hidden), activation, nn.Linear(hidden, n_experts))


class _Router(nn.Module):
    """Shared parts of the two MoE layers: the recorded routing."""

    def __init__(self) -> None:
        super().__init__()
        self._last = _LastRouting()

    @property
    def routing(self) -> Routing | None:
        """The :class:`Routing` of the last forward (None before the first)."""
        return self._last.value

    def clear_routing(self) -> None:
        """Drop the recorded routing (and the autograd graph it may hold)."""
        self._last.value = None


# ---------------------------------------------------------------------------------------------------- patch MoE
class LowRankExperts(nn.Module):
    """M1 patch experts that share one MLP and differ by low-rank updates (fairbook option, not in the paper).

    Expert j is the block's MLP with its two linear layers changed by rank-r products, as in LoRA (Hu et al.
    2022, eq. 3): ``c_fc(x) + x A_j^T B_j^T`` and ``c_proj(h) + h C_j^T D_j^T``. ``B_j`` and ``D_j`` start at zero, so
    every expert starts equal to the pretrained MLP, as the paper's copies do. The shared MLP is trained too. Extra
    parameters: ``M1 * r * 2 * (d + h)`` for width d and hidden size h, against ``(M1 - 1) * (2 d h + d + h)`` for
    full copies (ViT-B/16 image tower, M1 = 10, r = 64: 4.9 M instead of 42.5 M). The experts' compute is that of
    full copies. ``experts[j]`` is expert j as a callable.
    """

    def __init__(self, mlp: nn.Module, n_experts: int, rank: int) -> None:
        super().__init__()
        fc, proj = getattr(mlp, "c_fc", None), getattr(mlp, "c_proj", None)
        if not (isinstance(fc, nn.Linear) and isinstance(proj, nn.Linear)):
            raise MoEError(f"low-rank experts need an MLP with nn.Linear c_fc and c_proj (open_clip's), got "
                           f"{type(mlp).__name__}; use full experts (expert_rank=None)")
        if int(rank) < 1:
            raise MoEError(f"expert_rank must be a positive integer, got {rank}; or None for full experts")
        self.mlp, self.rank = mlp, int(rank)
        d, h, m, r = fc.in_features, fc.out_features, int(n_experts), int(rank)

        def down(n_in: int) -> nn.Parameter:  # LoRA's A: random, scaled like nn.Linear's default init
            return nn.Parameter(torch.empty(m, r, n_in).uniform_(-1, 1).mul_(n_in ** -0.5).to(fc.weight))

        self.fc_down, self.fc_up = down(d), nn.Parameter(torch.zeros(m, h, r).to(fc.weight))
        self.proj_down, self.proj_up = down(h), nn.Parameter(torch.zeros(m, d, r).to(fc.weight))

    def __len__(self) -> int:
        return self.fc_down.shape[0]

    def __getitem__(self, j: int):
        return lambda x: self.expert(j, x)

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def expert(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``j`` applied to tokens ``x`` (..., d): the shared MLP's layers in order, with the updates."""
        for name, layer in self.mlp.named_children():
            y = layer(x)
            if name == "c_fc":
                y = y + (x @ self.fc_down[j].T.to(x.dtype)) @ self.fc_up[j].T.to(x.dtype)
            elif name == "c_proj":
                y = y + (x @ self.proj_down[j].T.to(x.dtype)) @ self.proj_up[j].T.to(x.dtype)
            x = y
        return x


class PatchMoE(_Router):
    """Patch Embedding-based MoE (Sec. 2.1, Fig. 2), a drop-in replacement for a transformer block's MLP.

    ``M1 = n_experts`` experts, each a deep copy of ``mlp`` (so they start identical to the pretrained MLP, as in
    the official code); gate ``Linear(d, d/4)-ReLU-Linear(d/4, M1)`` with a softmax over experts:
    ``W = softmax(G(I))`` (``I``: the ``N+1`` tokens of a sample), ``W_hat = Top_c(Top_r(W, K1), capacity)`` with
    ``capacity = ceil(C (N+1) K1 / M1)`` (:func:`expert_capacity`, real ``N+1``), and the output of a token is
    ``sum_j W_hat_j E_j(token)``.

    * Weights are not renormalised after ``Top_r``/``Top_c`` (paper equation and official code), so at
      initialisation the layer returns ``s * MLP(x)`` with ``s`` the kept gate mass (about ``K1 / M1`` for a fresh,
      near-uniform gate, and 0 for a token that capacity cut from all its experts): patching a pretrained CLIP
      changes its outputs before any training. ``renormalise=True`` divides each token's kept weights by their
      sum (a fairbook option; with identical experts and no capacity drop the layer then equals the MLP).
    * ``subtract_input=True`` is the official code's ``output - input``: the block becomes
      ``x + sum_j W_hat_j E_j(ln x) - ln x`` (with ``ln`` the block's ``ln_2``); default False (paper form).
    * ``relu_experts=True`` is the official code's expert, ``Linear(d, 4d)-ReLU-Linear(4d, d)`` initialised from the
      block's MLP: the copies keep its weights but use ReLU where the MLP has GELU; default False (paper form:
      the MLP as it is).
    * Text: padding tokens after EOT are routed like any token and compete for capacity (as in the official
      code). With the causal mask they never change the EOT token's attention output, but they can take an
      expert's slots and so drop real tokens, EOT included; they also count as FOL rows.

    * ``expert_rank=r`` replaces the copies by :class:`LowRankExperts` (fairbook option; default None: full
      copies, as in the paper and the code).

    Dispatch gathers, for each expert, only the tokens routed to it, so the expert compute is about ``K1``
    MLPs per token rather than ``M1``. :attr:`routing` holds the last forward's :class:`Routing`.
    """

    def __init__(self, mlp: nn.Module, n_experts: int = 10, top_k: int = 3, capacity: float = 0.8,
                 subtract_input: bool = False, renormalise: bool = False, batch_first: bool = True,
                 expert_rank: int | None = None, relu_experts: bool = False) -> None:
        super().__init__()
        _check_routing(n_experts, top_k, capacity)
        linear = next((m for m in mlp.modules() if isinstance(m, nn.Linear)), None)
        if linear is None:
            raise MoEError(f"cannot find the width of {type(mlp).__name__}: pass a block MLP that starts with an "
                           "nn.Linear (open_clip's mlp.c_fc)")
        dim = linear.in_features
        self.n_experts, self.top_k, self.capacity = int(n_experts), int(top_k), float(capacity)
        self.subtract_input, self.renormalise, self.batch_first = subtract_input, renormalise, batch_first
        mlp = _with_relu(mlp) if relu_experts else mlp
        if expert_rank is None:
            self.experts = nn.ModuleList(copy.deepcopy(mlp) for _ in range(self.n_experts))
        else:
            self.experts = LowRankExperts(mlp, self.n_experts, expert_rank)
        self.gate = _gate(dim, self.n_experts, nn.ReLU()).to(linear.weight)

    @property
    def c_fc(self) -> nn.Module:
        """The first expert's (or the shared MLP's) ``c_fc``: open_clip reads ``resblocks[0].mlp.c_fc`` for the
        tower's weight dtype, which is this layer when a tower has a single block."""
        return self.experts.mlp.c_fc if isinstance(self.experts, LowRankExperts) else self.experts[0].c_fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x if self.batch_first else x.transpose(0, 1)
        batch, length, dim = tokens.shape
        gate = self.gate(tokens).float().softmax(-1)
        top_r = top_r_mask(gate, self.top_k)
        mask = top_c_mask(gate, top_r, expert_capacity(self.capacity, length, self.top_k, self.n_experts))
        routed = gate * mask
        if self.renormalise:
            routed = routed / routed.sum(-1, keepdim=True).clamp_min(1e-12)
        self._last.value = Routing(gate, routed, top_r, mask)
        out = self._dispatch(tokens.reshape(-1, dim), routed.reshape(-1, self.n_experts),
                             mask.reshape(-1, self.n_experts)).reshape(batch, length, dim)
        if self.subtract_input:
            out = out - tokens
        return out if self.batch_first else out.transpose(0, 1)

    def _dispatch(self, flat: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``sum_j weights[:, j] * E_j(flat)`` over the rows each expert is routed, computing only those rows."""
        out = torch.zeros_like(flat)
        for j, expert in enumerate(self.experts):
            index = mask[:, j].nonzero().squeeze(1)
            if index.numel():
                y = expert(flat.index_select(0, index))
                out = out.index_add(0, index, (y * weights[index, j, None].to(y.dtype)).to(out.dtype))
        return out


def _with_relu(mlp: nn.Module) -> nn.Module:
    """A copy of ``mlp`` whose GELU activations (open_clip's ``gelu`` child, GELU or QuickGELU) are ReLU."""
    mlp = copy.deepcopy(mlp)
    for module in list(mlp.modules()):
        for name, child in module.named_children():
            if isinstance(child, (nn.GELU, QuickGELU)):
                setattr(module, name, nn.ReLU())
    return mlp


# -------------------------------------------------------------------------------------------------- feature MoE
class FeatureMoE(_Router):
    """Feature-based MoE (Sec. 2.1, Fig. 2): ``I3 = sum_b W_hat_b E_b(I0)`` on the encoder output ``I0`` (R^D).

    ``form="paper"``: ``W_hat = Top_r(softmax(G(I0)), k2)`` with gate ``Linear(D, D/4)-ReLU-Linear(D/4, M2)``.
    The paper gives neither M2, k2 nor the expert form; fairbook's choice is ``M2 = 4``, ``k2 = 2`` and experts
    ``Linear(D, D)`` initialised to the identity, so that at initialisation ``I3 = s I0`` with ``s`` the kept gate
    mass in ``[k2/M2, 1]``: the feature direction is unchanged, hence also every cosine, the CLIP loss and a
    pretrained model's zero-shot scores. ``renormalise=True`` makes the kept weights sum to 1 and the layer the
    exact identity at initialisation.

    ``form="code"`` (official): dense soft mixture ``sum_b softmax(G(I0))_b E_b(I0)`` (no top-k), ``M2`` = number of
    groups of the training attribute, gate ``Linear(D, D/4)-QuickGELU-Linear(D/4, M2)``, randomly initialised
    experts ``Linear(D, 4D)-ReLU-Linear(4D, D)`` (PyTorch's default init), no residual. :attr:`routing` holds the
    last forward's :class:`Routing` (``(B, M2)`` tensors).
    """

    def __init__(self, dim: int, n_experts: int = PAPER_FEATURE_EXPERTS, top_k: int = PAPER_FEATURE_TOP_K,
                 form: str = "paper", renormalise: bool = False) -> None:
        super().__init__()
        _check_form(form)
        top_k = n_experts if form == "code" else top_k
        _check_routing(n_experts, top_k)
        self.n_experts, self.top_k, self.form, self.renormalise = int(n_experts), int(top_k), form, renormalise
        self.gate = _gate(dim, self.n_experts, nn.ReLU() if form == "paper" else QuickGELU())
        if form == "code":
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
                                         for _ in range(self.n_experts))
        else:
            self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(self.n_experts))
        if form == "paper":
            with torch.no_grad():
                for expert in self.experts:
                    expert.weight.copy_(torch.eye(dim))
                    expert.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate(x).float().softmax(-1)
        mask = top_r_mask(gate, self.top_k)
        routed = gate * mask
        if self.renormalise:
            routed = routed / routed.sum(-1, keepdim=True)
        self._last.value = Routing(gate, routed, mask, mask)
        outputs = torch.stack([expert(x) for expert in self.experts], dim=1)   # (B, M2, D): cheap at this size
        return (routed.unsqueeze(-1).to(outputs.dtype) * outputs).sum(1)


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise MoEError(f"unknown Fair-MoE form {form!r}; choose 'paper' (as published) or 'code' (as coded)")


# ------------------------------------------------------------------------------------------------------ patching
def _image_feature_hook(visual: nn.Module, inputs, output):
    """Forward hook on ``model.visual``: the image feature MoE applied to the pooled, projected feature."""
    if isinstance(output, tuple):  # output_tokens=True: (pooled, tokens)
        return (visual.feature_moe(output[0]), *output[1:])
    return visual.feature_moe(output)


def _encode_text_with_moe(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` followed by the text feature MoE (bound to the patched instance)."""
    features = self.transformer.feature_moe(type(self).encode_text(self, text))
    return F.normalize(features, dim=-1) if normalize else features


def _check_clip(model: nn.Module) -> None:
    ok = all(hasattr(model, name) for name in ("visual", "transformer", "text_projection", "encode_text"))
    if not ok or not hasattr(model.visual, "transformer"):
        raise MoEError(f"add_fo_moe needs an open_clip CLIP with a ViT image tower (visual.transformer) and a text "
                       f"transformer, got {type(model).__name__}; build it with fairbook.models.create_clip")
    if getattr(model, "fo_moe_config", None) is not None:
        raise MoEError("this model already has Fair-MoE layers; patch a fresh copy of the CLIP instead")


def _n_feature_experts(feature_experts: int | str | None, form: str) -> int:
    if isinstance(feature_experts, str):
        if feature_experts not in ATTRIBUTES:
            raise MoEError(f"unknown attribute {feature_experts!r} for feature_experts; choose one of "
                           f"{', '.join(ATTRIBUTES)} or give a number")
        return sum(code != UNKNOWN for code in ATTRIBUTES[feature_experts])
    if feature_experts is None:
        if form == "code":
            raise MoEError("form='code' uses one feature expert per group of the training attribute: pass "
                           "feature_experts='race' (or another attribute name, or a number)")
        return PAPER_FEATURE_EXPERTS
    return int(feature_experts)


def add_fo_moe(model: nn.Module, *, image: bool = True, text: bool = True, patch: bool = True, feature: bool = True,
               n_experts: int = 10, top_k: int = 3, capacity: float = 0.8,
               feature_experts: int | str | None = None, feature_top_k: int = PAPER_FEATURE_TOP_K,
               form: str = "paper", renormalise: bool = False, expert_rank: int | None = None) -> nn.Module:
    """Turn an open_clip ``CLIP`` into Fair-MoE in place (FO-MoE, Sec. 2.1, Fig. 1) and return it.

    ``patch``: the MLP of the last block of each chosen tower becomes a :class:`PatchMoE` (``n_experts`` = M1,
    ``top_k`` = K1, ``capacity`` = C; paper and code: 10, 3, 0.8). ``feature``: a :class:`FeatureMoE` after each
    chosen encoder (``feature_experts`` = M2, an int or an attribute name meaning one expert per known group of
    it; ``feature_top_k`` = k2, ignored by the dense code form). ``image``/``text`` choose the towers; together
    with ``patch``/``feature`` they give the ablations of Table 4 (b, c). ``form="code"`` switches both layers to
    the official code (patch experts with ReLU returning output minus input; dense feature MoE with random
    two-layer experts).
    ``renormalise``: kept gate weights divided by their sum in both layers (fairbook option, off in paper and code).
    ``expert_rank``: patch experts that share the MLP and differ by rank-r updates (:class:`LowRankExperts`;
    fairbook option for parameter budgets, None in paper and code).

    Nothing fairbook's training loop sees changes: ``model(image, tokens)`` still returns open_clip's dict and
    ``encode_image`` / ``encode_text`` include the MoEs, so :func:`fairbook.train.fit`,
    ``zero_shot_scores`` and ``extract_features`` work unchanged. State-dict names other than the replaced MLPs
    stay valid: ``...resblocks.<last>.mlp.c_fc.weight`` becomes ``...mlp.experts.<j>.c_fc.weight`` (+ ``mlp.gate``),
    the feature MoEs are ``visual.feature_moe`` and ``transformer.feature_moe``. Patch AFTER loading pretrained
    weights (the experts copy the MLP at this moment). Because every MoE parameter lies under ``visual.`` or
    ``transformer.``, ``set_trainable("transformers")`` (the FairCLIP recipe) trains them all. The image feature
    MoE runs as a forward hook on ``model.visual`` (so ``model.visual(x)`` includes it, e.g. in
    :class:`fairbook.models.ImageClassifier`); the text one through an ``encode_text`` bound to the instance.
    """
    _check_form(form)
    _check_clip(model)
    _check_routing(n_experts, top_k, capacity)
    m2 = _n_feature_experts(feature_experts, form)
    _check_routing(m2, m2 if form == "code" else feature_top_k)
    towers = [(model.visual, model.visual.transformer)] if image else []
    towers += [(model, model.transformer)] if text else []
    for _, transformer in towers if patch else []:
        block = transformer.resblocks[-1]
        block.mlp = PatchMoE(block.mlp, n_experts, top_k, capacity, subtract_input=form == "code",
                             renormalise=renormalise, batch_first=getattr(transformer, "batch_first", True),
                             expert_rank=expert_rank, relu_experts=form == "code")
    if feature and image:
        reference = model.visual.proj if model.visual.proj is not None else next(model.visual.parameters())
        dim = int(model.visual.output_dim)
        model.visual.feature_moe = FeatureMoE(dim, m2, feature_top_k, form, renormalise).to(reference)
        model.visual.register_forward_hook(_image_feature_hook)
    if feature and text:
        projection = model.text_projection
        dim = projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]
        reference = projection.weight if isinstance(projection, nn.Linear) else projection
        model.transformer.feature_moe = FeatureMoE(dim, m2, feature_top_k, form, renormalise).to(reference)
        model.encode_text = types.MethodType(_encode_text_with_moe, model)
    model.fo_moe_config = dict(image=image, text=text, patch=patch, feature=feature, n_experts=n_experts,
                               top_k=top_k, capacity=capacity, feature_experts=m2, feature_top_k=feature_top_k,
                               form=form, renormalise=renormalise, expert_rank=expert_rank)
    return model


def routers(model: nn.Module) -> dict[str, PatchMoE | FeatureMoE]:
    """The Fair-MoE layers of a patched CLIP by router name (``EI``, ``ET``, ``FI``, ``FT``; absent ones left out)."""
    found = {
        "EI": model.visual.transformer.resblocks[-1].mlp,
        "ET": model.transformer.resblocks[-1].mlp,
        "FI": getattr(model.visual, "feature_moe", None),
        "FT": getattr(model.transformer, "feature_moe", None),
    }
    return {name: layer for name, layer in found.items() if isinstance(layer, _Router)}


def moe_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of every parameter of a Fair-MoE layer: experts and gates."""
    prefixes = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, _Router))
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


# ------------------------------------------------------------------------------------------------------------ FOL
def group_variance_gap(rows: torch.Tensor, group_rows: Mapping[int, torch.Tensor], form: str = "paper"
                       ) -> torch.Tensor:
    """One FOL term ``F_r`` (Sec. 2.2) from the routed-weight matrix ``O`` (``rows``, n x M) and each group's ``O_p``.

    ``form="paper"``: ``F_r = sum_p sum_j (Var(O_j) - Var(O_{p,j}))^2`` (column ``j``: expert j's weights).
    ``form="code"``: the official code compares the MEAN over experts of the variance,
    ``F_r = sum_p (mean_j Var(O_j) - mean_j Var(O_{p,j}))^2``, so experts whose variances are off in opposite
    directions cancel, and ``Var`` is the unbiased variance (divisor n - 1, torch's default, as the
    code calls it). In the paper form ``Var`` is the population variance (divisor n; the paper does not say
    which): then ``F_r = 0`` whenever every group's rows have the same empirical distribution as the batch (e.g.
    each group a copy of the same rows), which the unbiased divisor would not give, as group and batch sizes
    differ. Groups with fewer than 2 rows are skipped; 0 if ``rows`` has fewer than 2 rows.
    """
    _check_form(form)
    correction = 1 if form == "code" else 0
    total = rows.new_zeros(())
    if len(rows) < 2:
        return total
    overall = rows.var(dim=0, correction=correction)
    for group in group_rows.values():
        if len(group) < 2:
            continue
        gap = overall - group.to(rows).var(dim=0, correction=correction)
        total = total + (gap.pow(2).sum() if form == "paper" else gap.mean().pow(2))
    return total


def split_rows(rows: torch.Tensor, row_groups: torch.Tensor, groups) -> dict[int, torch.Tensor]:
    """``{group: rows of that group}`` for the codes in ``groups`` present in ``row_groups`` (one code per row);
    the batch form of ``O_{N|p}`` (group statistics taken from the same batch as ``O_N``)."""
    row_groups = torch.as_tensor(row_groups, device=rows.device)
    return {int(g): rows[row_groups == g] for g in groups if bool((row_groups == g).any())}


def _attribute_column(attribute: str) -> int:
    if attribute not in FILTER_ATTRIBUTES:
        raise MoEError(f"unknown attribute {attribute!r} for batch['attributes']; choose one of: "
                       f"{', '.join(FILTER_ATTRIBUTES)}")
    return FILTER_ATTRIBUTES.index(attribute)


class FairnessOrientedLoss:
    """FOL (Sec. 2.2): ``sum_r w_r F_r [- dispersion * sum_r mean_j Var(O_j)] [+ L_distance]``, a
    :func:`fairbook.train.fit` regulariser ``(image_features, text_features, logit_scale, batch) -> scalar``.

    ``F_r`` is :func:`group_variance_gap` for router ``r`` of ``model`` (``EI``, ``ET``: rows are every token of every
    sample; ``FI``, ``FT``: one row per sample), with ``O`` = the routed weights the model recorded on ``batch``,
    groups = the known codes of ``attribute`` (-1 is no group). ``weights``: one float for every router the model
    has (paper: 1, the four terms added; official scripts: 1e-4), or ``{router: weight}`` (a router left out or
    weighted 0 is off, as in Table 4 a).

    Where ``O_p`` comes from: by default from ``batch`` itself (the paper's reading: the group's rows of the same
    draw). With ``group_batches`` (e.g. :class:`fairbook.methods.fairclip.GroupBatches`: ``next()`` gives
    ``{group: batch}``), each call also runs the model, without gradient, on one group-only batch per group and
    takes ``O_p`` from those, like the official code's per-group loaders; ``tokenizer`` is then needed if the
    batches hold raw strings; afterwards the routers hold the last group batch's routing, not ``batch``'s.
    ``form``: see :func:`group_variance_gap`. ``dispersion``: the official code also
    subtracts ``lambda_moe * mean_j Var(O_j)`` of the batch routing (rewarding spread-out gate weights); its
    value is not in fairbook's reference notes, so it defaults to 0 (off).

    ``distance``: the Sinkhorn term ``L_distance``, a :class:`fairbook.methods.fairclip.FairCLIPRegulariser` (its own
    ``lam``; the official Fair-MoE scripts use lambda 1e-4 and blur 1e-4); its ``form="code"`` needs
    ``group_batches`` and then gets the group features from the same group forwards. :attr:`last_terms` holds
    the last call's values (floats) for logging.
    """

    def __init__(self, model: nn.Module, attribute: str, weights: float | Mapping[str, float] = 1.0,
                 form: str = "paper", distance: FairCLIPRegulariser | None = None,
                 group_batches: Iterator | None = None, tokenizer=None, dispersion: float = 0.0) -> None:
        _check_form(form)
        self.model, self.form, self.column = model, form, _attribute_column(attribute)
        self.groups = tuple(code for code in ATTRIBUTES[attribute] if code != UNKNOWN)
        self.routers = routers(model)
        if not self.routers:
            raise MoEError("the model has no Fair-MoE layers; call fairbook.methods.fair_moe.add_fo_moe(model) first")
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(self.routers))
            if unknown:
                raise MoEError(f"unknown router(s) {', '.join(unknown)}: this model has "
                               f"{', '.join(self.routers)} (names: {', '.join(ROUTERS)})")
            self.weights = {name: float(w) for name, w in weights.items() if w}
        else:
            self.weights = {name: float(weights) for name in self.routers}
        if distance is not None and distance.form == "code" and group_batches is None:
            raise MoEError("a FairCLIPRegulariser in form='code' needs group_batches (e.g. fairbook.methods.fairclip."
                           "GroupBatches) to encode one group-only batch per group")
        self.distance, self.group_batches, self.tokenizer = distance, group_batches, tokenizer
        self.dispersion = float(dispersion)
        self.last_terms: dict[str, float] = {}

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                 batch: Mapping) -> torch.Tensor:
        codes = torch.as_tensor(batch["attributes"])[:, self.column]
        current = {name: self._rows(name, len(codes)) for name in self.weights}
        group_rows, group_features = self._group_pass() if self.group_batches is not None else (None, None)
        total = image_features.new_zeros((), dtype=torch.float32)
        terms: dict[str, float] = {}
        for name, weight in self.weights.items():
            rows, sample = current[name]
            if group_rows is None:
                per_group = split_rows(rows, codes.to(rows.device)[sample], self.groups)
            else:
                per_group = {g: routed[name] for g, routed in group_rows.items()}
            term = weight * group_variance_gap(rows, per_group, self.form)
            if self.dispersion and len(rows) > 1:
                term = term - self.dispersion * rows.var(dim=0, correction=0).mean()
            terms[f"F_{name}"] = float(term.detach())
            total = total + term
        if self.distance is not None:
            reg = self.distance(image_features, text_features, logit_scale, batch, group_features=group_features)
            terms["distance"] = float(reg.detach())
            total = total + reg
        self.last_terms = terms
        return total

    def _rows(self, name: str, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        routing = self.routers[name].routing
        if routing is None or routing.samples != n_samples:
            raise MoEError(f"router {name} has no routing for this batch of {n_samples}: call FOL right after "
                           "model(images, tokens) on the same batch")
        return routing.rows()

    def _group_pass(self) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, tuple]]:
        device = next(self.model.parameters()).device
        group_rows, group_features = {}, {}
        with torch.no_grad():
            for group, batch in next(self.group_batches).items():
                out = self.model(batch["image"].to(device), _token_ids(self.tokenizer, batch["text"], device))
                group_features[group] = (out["image_features"], out["text_features"])
                group_rows[group] = {name: self.routers[name].routing.rows()[0] for name in self.weights}
        return group_rows, group_features


def fol(model: nn.Module, attribute: str, weight: float = 1.0, lam: float = 0.0, blur: float = 1e-4,
        keep=ROUTERS, form: str = "paper") -> FairnessOrientedLoss:
    """FOL for ``attribute`` as the Fair-MoE chapters use it: every F term of the routers in ``keep`` that the model
    has, weighted ``weight`` (Table 4 a drops one term at a time), plus FairCLIP's Sinkhorn distance (paper form,
    ``lam``, ``blur``) when ``lam > 0``; group statistics from the batch."""
    unknown = sorted(set(keep) - set(ROUTERS))
    if unknown:
        raise MoEError(f"unknown router(s) {', '.join(unknown)}; choose from {', '.join(ROUTERS)}")
    weights = {name: weight for name in routers(model) if name in keep}
    distance = FairCLIPRegulariser(attribute, lam=lam, blur=blur) if lam > 0 else None
    return FairnessOrientedLoss(model, attribute, weights=weights, form=form, distance=distance)


def _token_ids(tokenizer, texts, device) -> torch.Tensor:
    if isinstance(texts, torch.Tensor):
        return texts.to(device)
    if tokenizer is None:
        raise MoEError("the batches hold raw note strings: pass tokenizer= (from fairbook.models.create_clip)")
    return tokenizer(list(texts)).to(device)


# -------------------------------------------------------------------------------------------------- diagnostics
class RoutingLog:
    """Accumulates routing statistics per router, group and expert over batches (Fair-MoE diagnostics).

    Call :meth:`update` after each forward of a patched model with the batch's attribute codes; :meth:`frame`
    returns one row per (router, group, expert), plus the pooled group ``"all"``:

    * ``rows``: tokens (patch routers, padding included) or samples (feature routers) seen;
    * ``load``: share of the group's routed assignments (final mask) that went to the expert (sums to 1);
    * ``dropped``: share of the assignments ``Top_r`` gave the expert that capacity (``Top_c``) removed
      (0 for feature routers, which have no capacity; NaN when ``Top_r`` never chose the expert for that group);
    * ``gate_mean`` / ``gate_var``: mean and population variance (as in FOL) of the expert's routed weight
      ``W_hat`` (FOL's ``O_j``; 0 where not routed) over the group's rows.
    """

    def __init__(self, attribute: str) -> None:
        self.attribute, self.column = attribute, _attribute_column(attribute)
        self._stats: dict[tuple[str, str], dict[str, np.ndarray | int]] = {}

    def update(self, model: nn.Module, attributes) -> None:
        """Add the routing each router of ``model`` recorded in its last forward; ``attributes`` is the batch's
        ``(B, 4)`` code matrix or its ``(B,)`` codes of :attr:`attribute`."""
        codes = np.asarray(torch.as_tensor(attributes).cpu())
        codes = codes[:, self.column] if codes.ndim == 2 else codes
        for name, router in routers(model).items():
            routing = router.routing
            if routing is None or routing.samples != len(codes):
                raise MoEError(f"router {name} has no routing for this batch of {len(codes)}: call update right "
                               "after model(images, tokens) on the same batch")
            sample = routing.rows()[1].cpu().numpy()
            columns = [t.detach().reshape(-1, t.shape[-1]).double().cpu().numpy()
                       for t in (routing.routed, routing.mask, routing.top_r)]
            row_codes = codes[sample]
            for group in [*map(int, np.unique(codes)), "all"]:
                keep = slice(None) if group == "all" else row_codes == group
                self._add((name, self._label(group)), *(c[keep] for c in columns))

    def _label(self, group) -> str:
        if group == "all":
            return "all"
        try:
            return decode(self.attribute, group)
        except ValueError:
            return str(group)

    def _add(self, key: tuple[str, str], routed: np.ndarray, mask: np.ndarray, top_r: np.ndarray) -> None:
        stats = self._stats.setdefault(key, {"rows": 0, "sum": 0.0, "sq": 0.0, "routed": 0.0, "top_r": 0.0})
        stats["rows"] += len(routed)
        stats["sum"] = stats["sum"] + routed.sum(0)
        stats["sq"] = stats["sq"] + (routed ** 2).sum(0)
        stats["routed"] = stats["routed"] + mask.sum(0)
        stats["top_r"] = stats["top_r"] + top_r.sum(0)

    def frame(self) -> pd.DataFrame:
        """The accumulated statistics as a DataFrame (columns router, group, expert, rows, load, dropped,
        gate_mean, gate_var), routers in ``EI, ET, FI, FT`` order."""
        records = []
        for (router, group), s in sorted(self._stats.items(), key=lambda item: ROUTERS.index(item[0][0])):
            n = s["rows"]
            mean = s["sum"] / n
            var = np.maximum(s["sq"] / n - mean ** 2, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                dropped = (s["top_r"] - s["routed"]) / s["top_r"]
            load = s["routed"] / max(s["routed"].sum(), 1.0)
            for j in range(len(mean)):
                records.append({"router": router, "group": group, "expert": j, "rows": n, "load": load[j],
                                "dropped": dropped[j], "gate_mean": mean[j], "gate_var": var[j]})
        return pd.DataFrame(records, columns=["router", "group", "expert", "rows", "load", "dropped",
                                              "gate_mean", "gate_var"])


@torch.no_grad()
def routing_frame(model: nn.Module, loader, attribute: str, tokenizer=None, device=None) -> pd.DataFrame:
    """:meth:`RoutingLog.frame` of a patched model over a loader of FairVLMed items (eval mode, no gradient;
    the model's mode is restored)."""
    device = device if device is not None else next(model.parameters()).device
    log, was_training = RoutingLog(attribute), model.training
    model.eval()
    try:
        for batch in loader:
            model(batch["image"].to(device), _token_ids(tokenizer, batch["text"], device))
            log.update(model, batch["attributes"])
    finally:
        model.train(was_training)
    return log.frame()


# --------------------------------------------------------------------------------------------- the method
@dataclass(frozen=True)
class FairMoE(Method):
    """Fair-MoE on the harness (chapter 13; its ablations in chapters 20-22): the FO-MoE layers added to each seed's
    model (:func:`add_fo_moe` with the keyword arguments ``layers``) and one of three losses for the training
    attribute: FOL (:func:`fol` with the keyword arguments ``fol``; the paper's method), FairCLIP's regulariser
    instead (``fairclip``: the settings of :class:`fairbook.methods.fairclip.FairCLIP`; Table 2's "FairCLIP w.
    FO-MoE"), or nothing (``fol=None``: Table 3's "w/o FOL", one model for all attributes).
    """

    name: str = "Fair-MoE"
    layers: dict = field(default_factory=dict)
    fol: dict | None = field(default_factory=dict)
    fairclip: dict | None = None

    def __post_init__(self) -> None:
        if self.fol is not None and self.fairclip is not None:
            raise MethodError(f"{self.name}: choose one loss, fol or fairclip (set the other to None)")

    @property
    def uses_attribute(self) -> bool:
        return self.fol is not None or self.fairclip is not None

    def adapt(self, model: nn.Module, tokenizer=None) -> nn.Module:
        add_fo_moe(model, **self.layers)
        return model

    def regulariser(self, model: nn.Module, train, attribute: str, seed: int, batch_size: int):
        if self.fairclip is not None:
            return FairCLIP(**self.fairclip).regulariser(model, train, attribute, seed, batch_size)
        if self.fol is not None:
            return fol(model, attribute, **self.fol)
        return None


_PAPER = "Fair-MoE (Wang et al.)"
#: The rows of Table 4 (a-c): variant -> (changes to :func:`add_fo_moe`'s layers, the F terms FOL keeps).
TABLE4: dict[str, tuple[dict, list[str]]] = {
    "w/o F_EI": ({}, ["ET", "FI", "FT"]),
    "w/o F_ET": ({}, ["EI", "FI", "FT"]),
    "w/o F_FI": ({}, ["EI", "ET", "FT"]),
    "w/o F_FT": ({}, ["EI", "ET", "FI"]),
    "w/o EM": ({"patch": False}, ["FI", "FT"]),
    "w/o FM": ({"feature": False}, ["EI", "ET"]),
    "w/o text FO-MoE": ({"text": False}, ["EI", "FI"]),
    "w/o image FO-MoE": ({"image": False}, ["ET", "FT"]),
}
#: Fair-MoE's claims (Sec. 3, Tables 1-4), as comparisons chapters 13 and 20-22 test.
CLAIMS = [
    *(Claim(_PAPER, "Table 1", f"Fair-MoE has a higher {label} than {rival}", "13-fair-moe", "Fair-MoE", rival,
            metric) for metric, label in (("es_auc", "ES-AUC"), ("auc", "AUC")) for rival in ("CLIP", "FairCLIP")),
    Claim(_PAPER, "Table 2", "FO-MoE raises FairCLIP's AUC", "20-ablation-fo-moe", "FairCLIP w. FO-MoE", "FairCLIP",
          "auc"),
    Claim(_PAPER, "Table 2", "FO-MoE raises FairCLIP's ES-AUC", "20-ablation-fo-moe", "FairCLIP w. FO-MoE",
          "FairCLIP", "es_auc"),
    *(Claim(_PAPER, "Table 3", f"Removing FOL lowers {label}", "21-ablation-fol", "Fair-MoE", "Fair-MoE w/o FOL",
            metric) for metric, label in (("es_auc", "ES-AUC"), ("auc", "AUC"))),
    *(Claim(_PAPER, "Table 4", f"Fair-MoE {name} has a lower ES-AUC than Fair-MoE", "22-ablation-components",
            f"Fair-MoE {name}", "Fair-MoE", "es_auc", "worse") for name in TABLE4),
]
