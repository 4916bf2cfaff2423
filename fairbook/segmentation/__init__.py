"""Segmentation fairness (FairMedFM, Jin et al., NeurIPS 2024 D&B, Sec. 3 and Table 2's segmentation rows;
Harvard-FairSeg, Tian et al., ICLR 2024): prompts made from the ground-truth mask (:mod:`.prompts`) and the
per-group Dice metrics with their gaps and equity-scaled forms (:mod:`.metrics`), SAMed's and FEBS's losses
(:mod:`.losses`), and SAM answering those prompts on the one training loop, with LoRA and per-group decoders
(:mod:`.training`)."""
from fairbook.segmentation import losses, metrics, prompts, training
from fairbook.segmentation.metrics import dice, iou, segmentation_report
from fairbook.segmentation.prompts import PROMPTS, make_prompt

__all__ = ["PROMPTS", "dice", "iou", "losses", "make_prompt", "metrics", "prompts", "segmentation_report", "training"]
