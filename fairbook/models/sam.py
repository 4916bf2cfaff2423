"""The Segment Anything Model through ``transformers`` (``SamModel``): a tiny configuration that runs offline on
CPU for the default book, and the released checkpoints (``facebook/sam-vit-base``, MedSAM-style folders) through
``from_pretrained`` at paper scale.

``fairbook-tiny-sam`` (``fairbook/configs/fairbook-tiny-sam.json``, about 0.15 M parameters): 128-pixel input,
patch 8, a 2-layer vision encoder of width 64, prompt encoder and mask decoder of width 32. Its consistency rules
(found by trial, as ``SamConfig`` does not check them): the vision encoder's ``num_pos_feats`` is half the prompt
encoder's hidden size, its ``output_channels`` equal the prompt encoder's and the mask decoder's hidden size, the
prompt encoder's ``image_size`` and ``patch_size`` equal the vision encoder's, and ``window_size`` divides the patch
grid. The model predicts masks at half the input size (``pred_masks`` of 64 x 64 for 128 pixels: four times the
16 x 16 grid of image embeddings).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fairbook.models.clip import CONFIG_DIR, ModelError

__all__ = ["TINY_SAM", "create_sam", "sam_input_size"]

TINY_SAM = "fairbook-tiny-sam"


def create_sam(name: str = TINY_SAM, pretrained: str | os.PathLike | None = None):
    """A ``transformers.SamModel``: ``name`` ``"fairbook-tiny-sam"`` builds the tiny configuration with random
    weights, then loads ``pretrained`` (a folder written by ``save_pretrained``) when given; any other ``name`` is
    passed to ``SamModel.from_pretrained`` (a hub name such as ``facebook/sam-vit-base`` or a local folder)."""
    from transformers import SamConfig, SamModel

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
