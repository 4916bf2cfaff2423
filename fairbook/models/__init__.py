"""Models: the open_clip CLIP factory (:mod:`fairbook.models.clip`), heads on image encoders
(:mod:`fairbook.models.heads`), adapters such as LoRA (:mod:`fairbook.models.adapters`), the image + note
fusion classifier (:mod:`fairbook.models.fusion`) and the Segment Anything Model
(:mod:`fairbook.models.sam`). Method-specific layers live with their method (e.g. Fair-MoE's in
:mod:`fairbook.methods.fair_moe`)."""
from fairbook.models.adapters import add_lora, lora_parameters
from fairbook.models.clip import CONFIG_DIR, ModelError, create_clip, pick_device
from fairbook.models.fusion import FusionClassifier
from fairbook.models.heads import ImageClassifier, PromptClassifier, fit_logistic
from fairbook.models.sam import create_sam, sam_input_size, save_sam

__all__ = ["CONFIG_DIR", "FusionClassifier", "ImageClassifier", "ModelError", "PromptClassifier", "add_lora",
           "create_clip", "create_sam", "fit_logistic", "lora_parameters", "pick_device", "sam_input_size", "save_sam"]
