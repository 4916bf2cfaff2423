"""What a method is on the harness: a name, a change to the model, a term added to the loss.

Every method of the handbook is a small frozen dataclass that subclasses :class:`Method`. Its fields are its own
settings (FairCLIP's lambda, Fair-MoE's layers and loss weights); everything else (data, pretrained start, recipe,
training draw, epoch choice, evaluation) is shared and lives in :mod:`fairbook.protocol`. So two methods trained in
one chapter differ by exactly what their declarations say.

A method is saved with every model it trains as ``{"class": "<module>.<Class>", "settings": {...}}``
(:meth:`Method.record`) and rebuilt from that record by :func:`method_from_record`, so a trained model can be
loaded again without any method-specific code in the generic layers.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import ClassVar

from torch import nn
from torch.utils.data import Sampler

from fairbook.train import PROMPT_SETS, Contrastive, Objective, TrainConfig

__all__ = ["Claim", "Method", "MethodError", "method_from_record"]


class MethodError(ValueError):
    """A method declaration or record that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Method:
    """Base of every method: plain contrastive fine-tuning of the model as it is built (see
    :class:`fairbook.methods.clip.CLIP`).

    Subclasses add fields for their settings and override what differs from plain CLIP fine-tuning:
    :meth:`adapt` (the network to train, built from the freshly created CLIP: add layers, or put a head on the
    image tower), :meth:`objective` (what the one loop minimises and how it scores; by default the contrastive
    loss plus :meth:`regulariser`, a term for the training attribute) and :meth:`sampler` (how training batches
    are drawn). ``uses_attribute`` says whether the method trains one model per sensitive attribute (FairCLIP)
    or one model for all (CLIP).
    """

    name: str = "method"

    uses_attribute: ClassVar[bool] = False

    def adapt(self, model: nn.Module, tokenizer=None) -> nn.Module:
        """The network to train at one seed, from the freshly built CLIP ``model`` and its ``tokenizer`` (changed
        in place or wrapped; plain CLIP returns it as it is). It is also replayed to rebuild a saved model."""
        return model

    def data_tokenizer(self, tokenizer):
        """The tokenizer the notes are read with: the CLIP's by default; None hands the model the raw note strings
        (a model that tokenises them itself, e.g. MultiFair with a ``transformers`` text encoder)."""
        return tokenizer

    def regulariser(self, model: nn.Module, train, attribute: str, seed: int, batch_size: int
                    ) -> Callable | None:
        """The term added to the contrastive loss at each step,
        ``hook(image_features, text_features, logit_scale, batch)`` as :class:`fairbook.train.Contrastive` calls
        it, for the training ``attribute`` and ``seed``; None adds nothing."""
        return None

    def objective(self, model: nn.Module, train, attribute: str, seed: int, config: TrainConfig, tokenizer
                  ) -> Objective:
        """What :func:`fairbook.train.fit` minimises for this method, and how it scores: by default CLIP's
        contrastive loss plus :meth:`regulariser`, scored zero-shot with the recipe's prompts."""
        hook = self.regulariser(model, train, attribute, seed, config.batch_size)
        return Contrastive(tokenizer, PROMPT_SETS[config.prompts], hook)

    @property
    def trains(self) -> bool:
        """False for a method used as it starts (zero-shot): the protocol then runs the loop with ``epochs=0``,
        which scores the start without a training step."""
        return True

    def sampler(self, train, attribute: str, seed: int) -> Sampler | None:
        """How training batches are drawn (e.g. group-balanced resampling); None: shuffled, seeded with ``seed``."""
        return None

    def require_known(self, **choices) -> None:
        """Check settings against their allowed values (``usage=USAGES``: the field, then its choices); an unknown
        value is a one-line :class:`MethodError` naming the method, the field and the choices."""
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise MethodError(f"{self.name}: {field}={getattr(self, field)!r} is not known; choose one of "
                                  f"{', '.join(allowed)}")

    def replace(self, **changes) -> Method:
        """A copy with some settings changed, e.g. ``fairclip.replace(lam=10.0)``."""
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict:
        """The declared fields, name included."""
        return dataclasses.asdict(self)

    def record(self) -> dict:
        """What rebuilds this method: its class path and its settings."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "settings": self.settings()}

    def describe(self) -> str:
        """One line for tables and saved metrics: the name and the settings that differ from the class defaults."""
        defaults = type(self)()
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if f.name != "name" and getattr(self, f.name) != getattr(defaults, f.name)]
        return f"{self.name} ({', '.join(changed)})" if changed else self.name


def method_from_record(record: Mapping) -> Method:
    """The method that :meth:`Method.record` describes."""
    path = str(record.get("class", ""))
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise MethodError(f"unknown method class {path!r} in a saved record: it was saved by another fairbook; "
                          "run its chapter again") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise MethodError(f"{path!r} is not a fairbook method class")
    return cls(**record.get("settings", {}))


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim of a paper, phrased as the paired comparison the protocol can test: in the run of ``chapter``,
    ``method`` against ``baseline`` on ``metric`` (a key of :data:`fairbook.tables.BETTER`) is expected to be
    ``"better"``, ``"worse"`` or ``"not worse"``, under every attribute the chapter evaluates. ``source`` is where
    the paper states it (section, table)."""

    paper: str
    source: str
    statement: str
    chapter: str
    method: str
    baseline: str
    metric: str
    expected: str = "better"

    def __post_init__(self) -> None:
        if self.expected not in ("better", "worse", "not worse"):
            raise MethodError(f"Claim.expected={self.expected!r}: choose better, worse or not worse")
