"""fairbook: a notebook-first research handbook on fairness in medical vision-language models.

Notebooks use one import, ``import fairbook as fb``, and reach the package through its concept modules:
``fb.data`` (FairVLMed loader, synthetic generator, summaries), ``fb.models``, ``fb.moe`` (Fair-MoE layers and
loss), ``fb.fairness`` (fairness losses and mitigations), ``fb.train``, ``fb.metrics``, ``fb.stats``,
``fb.results`` (saved predictions and the comparison tables), ``fb.explain`` (attention and similarity maps),
``fb.representation`` (what image features encode about the groups), ``fb.cases`` (per-case comparisons),
``fb.plots``, ``fb.widgets``, ``fb.runs`` (papermill runner, sweeps, run folders) and ``fb.files`` (atomic writes,
temporary folders). Modules load on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["book", "cases", "data", "explain", "fairness", "files", "metrics", "models", "moe", "plots",
           "representation", "results", "runs", "stats", "train", "widgets"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"fairbook.{name}")
    raise AttributeError(f"module 'fairbook' has no attribute {name!r}")
