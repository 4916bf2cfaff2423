"""The CLIP factory: one code path for the tiny default CLIP and the real open_clip backbones.

``create_clip("fairbook-tiny")`` builds the small randomly initialised CLIP defined in
``fairbook/configs/fairbook-tiny.json``; ``create_clip("ViT-B-16", pretrained="openai")`` builds the CLIP of
the FairCLIP paper (Luo et al., CVPR 2024, which fine-tunes CLIP ViT-B/16). Both go through
``open_clip.create_model_and_transforms`` and ``open_clip.get_tokenizer``.
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import open_clip
import torch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
open_clip.add_model_config(CONFIG_DIR)


class ModelError(ValueError):
    """An unknown model name or an unusable model argument."""


def pick_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def create_clip(name: str = "fairbook-tiny", pretrained: str | None = None, device: str | torch.device | None = None):
    """(model, preprocess_train, preprocess_val, tokenizer) for an open_clip model name.

    ``name`` is an open_clip architecture (``open_clip.list_models()``) or a config in fairbook/configs
    (``fairbook-tiny``); ``pretrained`` an open_clip weight tag or file (None = random initialisation).
    The preprocess functions take a PIL image (FairVLMed: mode "F") and return a normalised 3 x S x S tensor.
    """
    if ":" not in name and name not in open_clip.list_models():
        raise ModelError(f"unknown model {name!r}; use 'fairbook-tiny' or a name from open_clip.list_models()")
    pretrained = _pretrained(name, pretrained)
    device = torch.device(device) if device is not None else pick_device()
    try:
        with _quiet_random_initialisation():
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, output_dict=True)
    except Exception as exc:  # hub download errors (no network) or an unreadable file
        if pretrained is None:
            raise
        if Path(pretrained).is_file():
            raise ModelError(_checkpoint_problem(name, pretrained, exc)) from None
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {name} weights {pretrained!r} ({first}): download them once with network "
                         "access (open_clip caches them under ~/.cache/huggingface) or pass a local checkpoint "
                         "file") from None
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)


def _checkpoint_problem(name: str, path: str, exc: Exception) -> str:
    """One line saying why open_clip could not load the local checkpoint ``path`` into ``name``."""
    text = " ".join(str(exc).split())
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return (f"checkpoint {path} holds pickled Python objects ({refused.group(1)}), which fairbook never loads "
                "(torch.load with weights_only=True): give a checkpoint of tensors only, e.g. chapter 10's clip.pt")
    if "state_dict" in text:
        return (f"checkpoint {path} does not fit {name} ({text.split(':')[0][:120]}): create the model with the "
                "architecture the checkpoint was trained with")
    return (f"cannot read checkpoint {path} ({type(exc).__name__}): the file is corrupt, truncated or not a torch "
            "checkpoint; give a checkpoint written by fairbook (chapter 10's clip.pt) or by open_clip")


@contextlib.contextmanager
def _quiet_random_initialisation():
    """Drop open_clip's root-logger warning "No pretrained weights loaded ... initialized randomly": with
    ``pretrained=None`` a random start is what was asked for (chapter 10 pretrains from one)."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _pretrained(name: str, pretrained: str | None) -> str | None:
    """An open_clip weight tag as it is, or a checkpoint file resolved from the checkout (it must exist)."""
    if pretrained is None or pretrained in open_clip.list_pretrained_tags_by_model(name):
        return pretrained
    from fairbook.files import resolve

    path = resolve(pretrained)
    if not path.is_file():
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        hint = ("run chapter 10 with that configuration first, e.g. fairbook run "
                "notebooks/10-pretrain-synthetic-clip.py -p params/10-pretrain-synthetic-clip/default.yaml "
                "(make book does)" if "10-pretrain" in str(path)
                else f"use a weight tag of {name} ({tags}) or the path of a checkpoint")
        raise ModelError(f"pretrained weights {pretrained!r} not found (no such tag or file {path}): {hint}")
    return str(path)


__all__ = ["CONFIG_DIR", "ModelError", "create_clip", "pick_device"]
