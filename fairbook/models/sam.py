"""The Segment Anything Model through ``transformers`` (``SamModel``): a tiny configuration that runs offline on
CPU for the default book, and the released checkpoints (``facebook/sam-vit-base``, MedSAM-style folders) through
``from_pretrained`` at paper scale.

``fairbook-tiny-sam`` (``fairbook/configs/fairbook-tiny-sam.json``, about 0.15 M parameters): 64-pixel input, patch
8, a 2-layer vision encoder of width 64, prompt encoder and mask decoder of width 32; 64 pixels keep a fine-tuning
run within seconds on 2 cores. Its consistency rules (found by trial, as ``SamConfig`` does not check them): the
vision encoder's ``num_pos_feats`` is half the prompt encoder's hidden size, its ``output_channels`` equal the
prompt encoder's and the mask decoder's hidden size, the prompt encoder's ``image_size`` and ``patch_size`` equal
the vision encoder's, and ``window_size`` divides the patch grid. The model predicts masks at half the input size
(``pred_masks`` of 32 x 32 for 64 pixels: four times the 8 x 8 grid of image embeddings).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fairbook.files import replace_dir, resolve, temporary_sibling
from fairbook.models.clip import CONFIG_DIR, ModelError

__all__ = ["TINY_SAM", "create_sam", "sam_input_size", "save_sam"]

TINY_SAM = "fairbook-tiny-sam"


def create_sam(name: str = TINY_SAM, pretrained: str | os.PathLike | None = None):
    """A ``transformers.SamModel``: ``name`` ``"fairbook-tiny-sam"`` builds the tiny configuration with random
    weights, then loads ``pretrained`` (a folder written by ``save_pretrained``) when given; any other ``name`` is
    passed to ``SamModel.from_pretrained`` (a hub name such as ``facebook/sam-vit-base`` or a local folder)."""
    from transformers import SamConfig, SamModel
    from transformers.utils import logging

    logging.disable_progress_bar()   # no "Loading weights" bar per model in the chapters' output
    source = pretrained if pretrained is not None else (None if name == TINY_SAM else name)
    if source is None:
        config = json.loads((Path(CONFIG_DIR) / f"{TINY_SAM}.json").read_text())
        return SamModel(SamConfig(**config))
    try:
        return SamModel.from_pretrained(str(source))
    except OSError as exc:
        raise ModelError(f"cannot load SAM weights from {str(source)!r} ({str(exc).splitlines()[0]}): give a folder "
                         "written by save_pretrained (e.g. chapter 15's pretrained start) or a cached hub name"
                         ) from None


def sam_input_size(model) -> int:
    """The square input size (pixels) of a SAM model's image encoder."""
    return int(model.config.vision_config.image_size)


def save_sam(model, folder: str | os.PathLike) -> Path:
    """``model.save_pretrained(folder)`` written to a temporary sibling and renamed, so that a killed save never
    leaves a half-written start that :func:`create_sam` would load; returns the folder."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    folder = resolve(folder)
    tmp = temporary_sibling(folder)
    model.save_pretrained(str(tmp))
    replace_dir(tmp, folder)
    return folder
