"""Models: the open_clip CLIP factory (:mod:`fairbook.models.clip`) and heads on image encoders
(:mod:`fairbook.models.heads`). Method-specific layers live with their method (e.g. Fair-MoE's in
:mod:`fairbook.methods.fair_moe`)."""
from fairbook.models.clip import CONFIG_DIR, ModelError, create_clip, pick_device
from fairbook.models.heads import ImageClassifier, fit_logistic

__all__ = ["CONFIG_DIR", "ImageClassifier", "ModelError", "create_clip", "fit_logistic", "pick_device"]
