"""MultiFair (Zubair et al., "MultiFair: Multimodal Balanced Fairness-Aware Medical Classification with Dual-Level
Gradient Modulation", arXiv 2510.07328): a fundus-image + clinical-note fusion classifier
(:class:`fairbook.models.FusionClassifier`) whose encoders' gradients are rescaled at two levels, trained through
the one loop (:func:`fairbook.train.fit`) by the :class:`DualModulation` objective.

Only the paper's abstract is available to fairbook; the equations below are those of its released code, which
adapts CGGM (Guo et al., "Classifier-guided Gradient Modulation for Enhanced Multimodal Learning", NeurIPS 2024).
Each step, on the training batch:

* **Modality level (CGGM).** Each modality ``m`` has an auxiliary linear head on its detached features, trained by
  its own AdamW (lr ``head_lr``). ``d_m`` is the change of that head's batch AUC (or accuracy,
  ``balance_metric``) since the previous step, and ``B_m = (S - d_m) / S`` with ``S = sum_j d_j``
  (:func:`modality_balance`): the modality that improved most gets the smallest share. The encoder's gradient is
  multiplied by ``rho * B_m`` (``rho`` 1.2). A direction term (:func:`direction_term`)
  ``L_gm = (sum_m |B_m| - sum_m B_m cos(w_fusion, w_m)) / M``, with the cosine between the fusion head's output
  weights and the modality head's, is added to the next step's loss with weight ``lambda_gm`` (0.15).
* **Group level.** An EMA (``ema`` 0.9) of each modality head's per-group surrogate AUC ``E_{m,g}``
  (:func:`surrogate_auc`, the mean pairwise logistic ``sigmoid(s_pos - s_neg)``) gives
  ``F_m = sum_g pi_g [1 + beta (mean_g E_{m,g} - E_{m,g}) / tau]`` with the batch's group shares ``pi_g``
  (:func:`group_factors`; ``beta`` 0.5). When the fused model's batch AUC gap across groups exceeds ``tau``
  (0.07; :func:`group_auc_gap`), the gate opens: the encoder gradient is further multiplied by ``F_m`` and the
  gap term ``lambda_f * mean_m mean_g |E_{m,g} - mean_g E_{m,g}|`` (:func:`fairness_gap`; ``lambda_f`` 0.5) is
  added to the loss. In the intended form the gap term is differentiable: this step's surrogate AUCs enter the
  EMA with their gradient (through the modality heads' weights, held fixed, into the encoders).

Every statistic is computed under ``no_grad`` and the stored EMAs are detached. The gradient scaling is applied
to each modality's projected features ``z_m`` (a hook on the tensor), which by the chain rule multiplies every
encoder (and projection) gradient of that modality by the same factor.

``faithful_to_code=True`` reproduces the released behaviour, which differs in three places: the direction term
looks up a parameter name that does not exist, so ``L_gm`` is always 0; the gap term is turned into a Python
float, so it adds a constant and no gradient; and ``B_m`` is built from absolute changes ``|d_m|`` (CGGM's are
signed). The released hyperparameters are the defaults (``rho`` 1.2, ``lambda_gm`` 0.15, ``lambda_f`` 0.5,
``tau`` 0.07, ``beta`` 0.5; the recipe is :meth:`fairbook.train.TrainConfig.preset` ``"multifair"``: AdamW lr
3e-5, gradient clip 0.8; heads lr 1e-5).

fairbook's guards where the formulas are undefined (its reading, not the paper's): ``B_m = 1 / M`` at the first
step and whenever ``S = 0``; with signed changes ``B_m`` is clipped to [0, 1], since opposite changes whose sum is
near zero would otherwise give unbounded factors; ``F_m`` is clipped at 0 so that a gradient is never reversed;
a group without both classes in the batch keeps its EMA; and ``B_m`` keeps its last value when a head's batch
metric is undefined (a batch of one class).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fairbook.data.attributes import FILTER_ATTRIBUTES, UNKNOWN, decode
from fairbook.methods.base import Claim, Method, MethodError
from fairbook.mitigations import RESAMPLE_BY, GroupDRO, cell_sampler, training_groups
from fairbook.models.fusion import MODALITIES, FusionClassifier, clip_encoders, pretrained_encoders
from fairbook.train import Classification, Objective, TrainConfig, fusable

__all__ = ["CLAIMS", "BALANCE_METRICS", "DualModulation", "MultiFair", "batch_auc", "direction_term",
           "factor_table", "fairness_gap", "group_auc_gap", "group_factors", "group_table", "modality_balance",
           "surrogate_auc", "variants"]

BALANCE_METRICS = ("auc", "accuracy")
MITIGATIONS = ("erm", "resampling", "groupdro")


# ------------------------------------------------------------------------------------------------- statistics
def batch_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of one batch (ties count one half); NaN when the batch lacks a class."""
    scores, labels = scores.detach().float(), labels.bool()
    positive, negative = scores[labels], scores[~labels]
    if not len(positive) or not len(negative):
        return math.nan
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def surrogate_auc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The pairwise-logistic surrogate of the AUC, ``mean over (positive i, negative j) of sigmoid(s_i - s_j)``
    (differentiable in ``scores``); NaN when the batch lacks a class."""
    labels = labels.bool()
    positive, negative = scores[labels], scores[~labels]
    if not len(positive) or not len(negative):
        return scores.new_tensor(math.nan)
    return torch.sigmoid(positive[:, None] - negative[None, :]).mean()


def modality_balance(changes: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """CGGM's balance factors ``B_m = (S - d_m) / S``, ``S = sum_j d_j``, from each modality's change ``d_m`` of
    its head's metric since the previous step. ``signed=False`` uses ``|d_m|`` as MultiFair's released code does.
    ``1 / M`` each when ``S = 0``; signed factors are clipped to [0, 1] (module docstring)."""
    d = changes.float() if signed else changes.float().abs()
    total = d.sum()
    if float(total.abs()) < 1e-12:
        return torch.full_like(d, 1.0 / len(d))
    balance = (total - d) / total
    return balance.clamp(0.0, 1.0) if signed else balance


def direction_term(balance: torch.Tensor, fusion_weight: torch.Tensor, modality_weights) -> torch.Tensor:
    """CGGM's direction term ``L_gm = (sum_m |B_m| - sum_m B_m cos(w_fusion, w_m)) / M`` on the output-layer
    weights (flattened), differentiable in ``fusion_weight``; the modality heads' weights are held fixed."""
    fusion = fusion_weight.float().flatten()
    cosines = torch.stack([F.cosine_similarity(fusion, w.detach().float().flatten().clone(), dim=0)
                           for w in modality_weights])
    balance = balance.to(cosines)
    return (balance.abs().sum() - (balance * cosines).sum()) / len(balance)


def group_auc_gap(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float:
    """Largest minus smallest batch AUC over the groups with both classes in the batch (0 with fewer than two)."""
    aucs = [batch_auc(scores[groups == g], labels[groups == g]) for g in torch.unique(groups)]
    aucs = [a for a in aucs if math.isfinite(a)]
    return max(aucs) - min(aucs) if len(aucs) > 1 else 0.0


def group_factors(ema: torch.Tensor, shares: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """MultiFair's group-level factors ``F_m = sum_g pi_g [1 + beta (mean_g E_{m,g} - E_{m,g}) / tau]``, clipped
    at 0. ``ema``: ``M x G`` surrogate AUCs (NaN for a group not yet seen, whose term is 1); ``shares``: the
    batch's group shares ``pi_g`` (summing to 1)."""
    seen = ~torch.isnan(ema)
    mean = torch.where(seen, ema, 0.0).sum(1, keepdim=True) / seen.sum(1, keepdim=True).clamp(min=1)
    terms = torch.where(seen, 1.0 + beta * (mean - ema) / tau, torch.ones_like(ema))
    return (terms * shares.to(terms)).sum(1).clamp(min=0.0)


def fairness_gap(ema: torch.Tensor) -> torch.Tensor:
    """MultiFair's fairness-gap term ``mean_m mean_g |E_{m,g} - mean_g E_{m,g}|`` over the groups seen (NaN
    entries are left out; 0 for a modality with fewer than two)."""
    terms = []
    for row in ema:
        seen = row[~torch.isnan(row)]
        terms.append((seen - seen.mean()).abs().mean() if len(seen) > 1 else row.new_zeros(()))
    return torch.stack(terms).mean()


# ------------------------------------------------------------------------------------------------- objective
class DualModulation(Classification):
    """Binary cross-entropy on the fused logit (optionally reduced by a mitigation, as :class:`Classification`)
    with MultiFair's modality- and group-level modulation (module docstring). ``groups`` (the training
    attribute's group numbers through ``column`` and ``lookup``) are needed for the group level.

    It keeps its state between steps (the last metrics, ``B_m`` and the EMAs) and a per-step record
    (:meth:`record`: ``steps``, a list of ``{"step", "B_<m>", "F_<m>", "gap", "gate", "E_<m>_<group>"}``, and
    ``groups``, the attribute codes of the group numbers), which the protocol saves with the model.
    """

    def __init__(self, method: MultiFair, column: int | None = None, lookup=None, n_groups: int = 0,
                 group_codes=(), reduce=None):
        super().__init__(reduce=reduce, column=column, lookup=lookup)
        if method.group_level and (column is None or n_groups < 1):
            raise MethodError(f"{method.name}: the group level needs the training attribute's groups (column, "
                              "lookup, n_groups)")
        self.method, self.n_groups, self.group_codes = method, n_groups, [int(c) for c in group_codes]
        self.previous: torch.Tensor | None = None   # each head's metric at the last step
        self.balance: torch.Tensor | None = None    # B_m of the last step
        self.ema: torch.Tensor | None = None        # M x G surrogate AUCs, NaN = not yet seen
        self.steps: list[dict] = []
        self._head_optimizer = None

    def _metric(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        if self.method.balance_metric == "auc":
            return batch_auc(logits, labels)
        return float(((logits > 0).long() == labels).float().mean())

    def _train_heads(self, model: FusionClassifier, z: dict, labels: torch.Tensor) -> None:
        """One step of the auxiliary heads on detached features, with their own optimiser."""
        heads = list(model.unimodal.parameters())
        if self._head_optimizer is None:
            self._head_optimizer = torch.optim.AdamW(heads, lr=self.method.head_lr, fused=fusable(heads))
        with torch.enable_grad():
            logits = model.unimodal_logits({m: v.detach() for m, v in z.items()})
            loss = sum(F.binary_cross_entropy_with_logits(v.float(), labels.float()) for v in logits.values())
            self._head_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._head_optimizer.step()
        for param in heads:
            param.grad = None

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        method, labels = self.method, batch["label"]
        modalities = model.modalities
        z = model.encode(batch["image"], batch.get("text"))
        logits = model.fuse(z)
        losses = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
        groups = self.groups(batch) if self.column is not None else None
        loss = losses.mean() if self.reduce is None else self.reduce(losses, groups)
        scale = dict.fromkeys(modalities, 1.0)
        extra = None
        row: dict = {"step": len(self.steps) + 1}
        if method.modality_level:
            if self.balance is not None and not method.faithful_to_code:
                weights = [model.unimodal[m].weight for m in modalities]
                extra = method.lambda_gm * direction_term(self.balance, model.output_layer.weight, weights)
            with torch.no_grad():
                heads = model.unimodal_logits({m: v.detach() for m, v in z.items()})
                metric = torch.tensor([self._metric(heads[m], labels) for m in modalities])
            balance = self.balance if self.balance is not None else torch.full((len(modalities),),
                                                                                1.0 / len(modalities))
            if bool(torch.isfinite(metric).all()):
                if self.previous is not None:
                    balance = modality_balance(metric - self.previous, signed=not method.faithful_to_code)
                self.previous = metric
            self.balance = balance
            for i, m in enumerate(modalities):
                scale[m] *= method.rho * float(balance[i])
                row[f"B_{m}"] = float(balance[i])
        if method.group_level:
            term = self._group_level(model, z, logits, labels, groups, scale, row)
            if term is not None:
                extra = term if extra is None else extra + term
        for m in modalities:
            if scale[m] != 1.0 and z[m].requires_grad:
                z[m].register_hook(lambda grad, factor=scale[m]: grad * factor)
        if method.modality_level or method.group_level:
            self._train_heads(model, z, labels)
            self.steps.append(row)
        return (loss, None) if extra is None else (loss + extra, extra)

    def _group_level(self, model, z, logits, labels, groups, scale, row) -> torch.Tensor | None:
        """Update the per-group EMAs, set the gate and ``F_m`` (into ``scale``), and return the gap term when the
        gate is open (None when closed)."""
        method, modalities = self.method, model.modalities
        if self.ema is None:
            self.ema = torch.full((len(modalities), self.n_groups), math.nan, device=logits.device)
        # differentiable into the encoders only; copies, since the heads' own step changes their weights in place
        live = {m: F.linear(z[m], model.unimodal[m].weight.detach().clone(),
                            model.unimodal[m].bias.detach().clone()).squeeze(-1) for m in modalities}
        current = torch.stack([torch.stack([surrogate_auc(live[m][groups == g], labels[groups == g])
                                            for g in range(self.n_groups)]) for m in modalities])
        previous = self.ema
        defined = ~torch.isnan(current.detach())
        mixed = torch.where(torch.isnan(previous), current, method.ema * previous + (1 - method.ema) * current)
        estimate = torch.where(defined, mixed, previous)       # this step's EMA, with the gradient of this step
        self.ema = estimate.detach()
        with torch.no_grad():
            gap = group_auc_gap(logits.detach(), labels, groups)
            shares = torch.bincount(groups, minlength=self.n_groups).float() / len(groups)
            factors = group_factors(self.ema, shares, method.beta, method.tau)
        gate = gap > method.tau
        row.update({"gap": gap, "gate": bool(gate)})
        for i, m in enumerate(modalities):
            row[f"F_{m}"] = float(factors[i])
            for g, code in enumerate(self.group_codes):
                row[f"E_{m}_{code}"] = float(self.ema[i, g])
            if gate:
                scale[m] *= float(factors[i])
        if not gate:
            return None
        term = method.lambda_f * fairness_gap(estimate)
        return term.detach() if method.faithful_to_code else term

    def record(self) -> dict:
        return {"steps": self.steps, "groups": self.group_codes} if self.steps else {}


# ---------------------------------------------------------------------------------------------------- method
@dataclass(frozen=True)
class MultiFair(Method):
    """A fusion classifier of the fundus image and the note (``modalities``: ``"image+text"``, or ``"image"`` /
    ``"text"`` for the unimodal baselines), trained with MultiFair's modality level (``modality_level``, CGGM)
    and group level (``group_level``) or neither (plain fusion), optionally with a mitigation of
    :mod:`fairbook.mitigations` (``mitigation``: ``"erm"``, ``"resampling"`` over ``resample_by`` cells, or
    ``"groupdro"``). Module docstring for the equations and the ``faithful_to_code`` switch.

    The model (:class:`fairbook.models.FusionClassifier`): the CLIP's image and text towers (``image_encoder`` /
    ``text_encoder`` ``"clip"``) or ``transformers`` checkpoints (a hub name or a folder, loaded with
    ``from_pretrained``; a text checkpoint reads the raw notes with its own tokenizer), projected to ``width``,
    fused by ``fusion_layers`` transformer layers. MultiFair's released model uses width 256 and 3 layers.
    """

    name: str = "MultiFair"
    modalities: str = "image+text"
    modality_level: bool = True
    group_level: bool = True
    faithful_to_code: bool = False
    mitigation: str = "erm"
    rho: float = 1.2
    lambda_gm: float = 0.15
    lambda_f: float = 0.5
    tau: float = 0.07
    beta: float = 0.5
    ema: float = 0.9
    balance_metric: str = "auc"
    head_lr: float = 1e-5
    width: int = 128
    fusion_layers: int = 1
    fusion_heads: int = 4
    dropout: float = 0.1
    image_encoder: str = "clip"
    text_encoder: str = "clip"
    resample_by: str = "attribute x label"
    dro_eta: float = 0.01
    dro_adjustment: float = 1.0

    def __post_init__(self) -> None:
        used = self.used_modalities
        if not used or set(used) - set(MODALITIES) or len(set(used)) != len(used):
            raise MethodError(f"{self.name}: modalities={self.modalities!r}; use image+text, image or text")
        self.require_known(mitigation=MITIGATIONS, balance_metric=BALANCE_METRICS, resample_by=RESAMPLE_BY)
        if len(used) < 2 and (self.modality_level or self.group_level):
            raise MethodError(f"{self.name}: gradient modulation balances two modalities; a unimodal model takes "
                              "modality_level=False and group_level=False")
        if not 0 <= self.ema < 1 or self.tau <= 0:
            raise MethodError(f"{self.name}: need 0 <= ema < 1 and tau > 0 (got ema={self.ema}, tau={self.tau})")

    @property
    def used_modalities(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.modalities.split("+"))

    @property
    def uses_attribute(self) -> bool:
        return self.group_level or self.mitigation != "erm"

    def data_tokenizer(self, tokenizer):
        return None if "text" in self.used_modalities and self.text_encoder != "clip" else tokenizer

    def adapt(self, model: nn.Module, tokenizer=None) -> nn.Module:
        used = self.used_modalities
        from_clip = [m for m in used if (self.image_encoder if m == "image" else self.text_encoder) == "clip"]
        encoders = clip_encoders(model, from_clip)
        encoders.update(pretrained_encoders(
            self.image_encoder if "image" in used and "image" not in from_clip else None,
            self.text_encoder if "text" in used and "text" not in from_clip else None))
        return FusionClassifier(encoders, self.width, self.fusion_layers, self.fusion_heads, self.dropout)

    def objective(self, model: nn.Module, train, attribute: str, seed: int, config: TrainConfig, tokenizer
                  ) -> Objective:
        if not self.uses_attribute:
            return DualModulation(self) if self.modality_level else Classification()
        lookup, counts = training_groups(train.metadata[attribute].to_numpy(), attribute)
        column = FILTER_ATTRIBUTES.index(attribute)
        known = len(lookup) - 1  # the last entry is the unknown code's
        codes = [code if code < known else UNKNOWN for code in range(known + 1) if lookup[code] >= 0]
        reduce = None
        if self.mitigation == "groupdro":
            reduce = GroupDRO(len(counts), eta=self.dro_eta, adjustment=self.dro_adjustment, group_counts=counts)
        if not (self.modality_level or self.group_level):
            return Classification(reduce, column=column, lookup=lookup)
        return DualModulation(self, column, lookup, len(counts), codes, reduce)

    def sampler(self, train, attribute: str, seed: int):
        if self.mitigation != "resampling":
            return None
        return cell_sampler(train.metadata, attribute, self.resample_by, seed)


def factor_table(steps: pd.DataFrame) -> pd.DataFrame:
    """Long table of the modulation factors in per-step records (:func:`fairbook.protocol.step_records` of
    MultiFair models): method, attribute, seed, step, ``factor`` (B or F), ``modality``, ``value`` and ``panel``
    (``"B: MultiFair"``, with the training attribute when there are several)."""
    columns = [c for c in steps.columns if c.split("_")[0] in ("B", "F") and c.count("_") == 1]
    long = steps.melt(["method", "attribute", "seed", "step"], columns, "column").dropna(subset=["value"])
    long[["factor", "modality"]] = long["column"].str.split("_", expand=True)
    return long.drop(columns="column").assign(panel=_panels(long, long["factor"]))


def group_table(steps: pd.DataFrame) -> pd.DataFrame:
    """Long table of the per-group EMAs of the surrogate AUC in per-step records: method, attribute, seed, step,
    ``modality``, ``group`` (the group's name under the training attribute), ``value`` and ``panel`` (the
    modality, with the training attribute when there are several)."""
    columns = [c for c in steps.columns if c.startswith("E_")]
    long = steps.melt(["method", "attribute", "seed", "step"], columns, "column").dropna(subset=["value"])
    parts = long["column"].str.split("_", expand=True)
    long["modality"] = parts[1]
    long["group"] = [decode(a, int(c)) for a, c in zip(long["attribute"], parts[2])]
    return long.drop(columns="column").assign(panel=_panels(long, long["modality"]))


def _panels(long: pd.DataFrame, first: pd.Series) -> pd.Series:
    panel = first + ": " + long["method"] if long["method"].nunique() > 1 else first
    return panel + " (" + long["attribute"] + ")" if long["attribute"].nunique() > 1 else panel


def variants(**settings) -> list[MultiFair]:
    """The comparison of chapter 16, every model with the same ``settings`` (fields of :class:`MultiFair`): the
    unimodal baselines, plain fusion, each level of the modulation alone, MultiFair as intended and as released,
    and fusion with GroupDRO or resampling."""
    plain = dict(modality_level=False, group_level=False)
    rows = [("Image only", dict(modalities="image", **plain)), ("Text only", dict(modalities="text", **plain)),
            ("Fusion", plain), ("Fusion+CGGM", dict(group_level=False)), ("Fusion+Group", dict(modality_level=False)),
            ("MultiFair", {}), ("MultiFair (as released)", dict(faithful_to_code=True)),
            ("Fusion+GroupDRO", dict(mitigation="groupdro", **plain)),
            ("Fusion+Resampling", dict(mitigation="resampling", **plain))]
    return [MultiFair(name, **{**settings, **changes}) for name, changes in rows]


_PAPER = "MultiFair (Zubair et al., arXiv 2510.07328)"
#: MultiFair's abstract: it "outperforms state-of-the-art multimodal learning and fairness learning methods", i.e.
#: plain fusion, the modality-level balancing it builds on (CGGM) and a fairness mitigation (GroupDRO), read here
#: on the overall AUC and the equity-scaled AUC.
CLAIMS = [
    Claim(_PAPER, "Abstract", "MultiFair is more accurate than plain fusion", "16-multifair", "MultiFair", "Fusion",
          "auc"),
    Claim(_PAPER, "Abstract", "MultiFair is fairer than plain fusion", "16-multifair", "MultiFair", "Fusion",
          "es_auc"),
    Claim(_PAPER, "Abstract", "MultiFair is fairer than modality balancing alone (CGGM)", "16-multifair", "MultiFair",
          "Fusion+CGGM", "es_auc"),
    Claim(_PAPER, "Abstract", "MultiFair is fairer than fusion with GroupDRO", "16-multifair", "MultiFair",
          "Fusion+GroupDRO", "es_auc"),
]
