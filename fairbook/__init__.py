"""fairbook: a notebook-first research handbook on fairness in medical vision-language models.

Notebooks use one import, ``import fairbook as fb``, and reach the package through its concept modules, listed
here in the order they build on each other (a module imports only modules above it):

- ``fb.files`` (paths, atomic writes, temporary folders), ``fb.data`` (FairVLMed loader, synthetic generator,
  summaries), ``fb.metrics``, ``fb.stats``;
- ``fb.models`` (the CLIP factory, heads, LoRA, the fusion classifier, SAM), ``fb.train`` (the one training loop
  and its objectives, zero-shot scoring, linear probe), ``fb.mitigations`` (resampling, GroupDRO, LAFTR),
  ``fb.segmentation`` (prompts from masks, Dice fairness metrics, FEBS, prompted SAM on the loop), ``fb.methods``
  (one module per paper: CLIP, FairCLIP, Fair-MoE, FairMedFM and its segmentation rows, MultiFair);
- ``fb.results`` (the store of saved predictions), ``fb.protocol`` (train one seed of one method, a grid of
  methods x attributes x seeds, rebuild a saved model; the same for segmentation), ``fb.tables`` (the papers'
  comparison tables);
- ``fb.explain`` (attention and routing maps), ``fb.representation`` (what image features encode about the
  groups), ``fb.cases`` (per-case comparisons), ``fb.plots``, ``fb.widgets``;
- ``fb.runs`` (papermill runner, sweeps, run folders), ``fb.book``, ``fb.cli``.

Modules load on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["book", "cases", "cli", "data", "explain", "files", "methods", "metrics", "mitigations", "models", "plots",
           "protocol", "representation", "results", "runs", "segmentation", "stats", "tables", "train", "widgets"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"fairbook.{name}")
    raise AttributeError(f"module 'fairbook' has no attribute {name!r}")
