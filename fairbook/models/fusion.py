"""A two-modality fusion classifier: an image encoder over the SLO fundus image and a text encoder over the
clinical note, each projected to a shared width, fused by a small transformer over the modality tokens and
classified by an MLP; MultiFair's architecture (Zubair et al., arXiv 2510.07328; its released code: two encoders,
projections Linear -> LayerNorm -> Dropout to 256, a 3-layer transformer over the two modality tokens, an MLP head).

The encoders come from the CLIP the protocol builds (:func:`fairbook.models.create_clip`): its image tower and its
text tower (:func:`clip_encoders`), so that the CPU default starts from chapter 10's pretrained tiny CLIP. At paper
scale :func:`pretrained_encoders` loads ``transformers`` checkpoints with ``from_pretrained`` (MultiFair uses
``google/vit-base-patch16-224-in21k`` and ``bert-base-uncased``); the BERT text encoder tokenises the raw note
itself.

Each modality also has an auxiliary linear head on its projected features (:attr:`FusionClassifier.unimodal`):
MultiFair trains them on detached features and reads them only for its modulation statistics; they never change
the fused prediction.
"""
from __future__ import annotations

import torch
from torch import nn

from fairbook.models.clip import ModelError

__all__ = ["MODALITIES", "CLIPText", "FusionClassifier", "HFImage", "HFText", "clip_encoders",
           "pretrained_encoders"]

#: The two modalities, in the order their tokens enter the fusion transformer.
MODALITIES = ("image", "text")


class CLIPText(nn.Module):
    """CLIP's text tower on its own (open_clip's ``encode_text``); the image tower is taken out of the model."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        if hasattr(clip, "visual"):
            del clip.visual
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise ModelError("CLIP's text tower reads token ids: read the data with the CLIP tokenizer (the "
                             "protocol's default), not raw notes")
        return self.clip.encode_text(tokens)


def clip_encoders(clip: nn.Module, modalities=MODALITIES) -> dict[str, tuple[nn.Module, int]]:
    """``{modality: (encoder, output width)}`` from an open_clip CLIP: its image tower and its text tower."""
    width = int(clip.visual.output_dim)
    encoders = {}
    if "image" in modalities:
        encoders["image"] = (clip.visual, width)
    if "text" in modalities:
        encoders["text"] = (CLIPText(clip), width)
    return encoders


class HFImage(nn.Module):
    """A ``transformers`` vision model (e.g. ViT) as an image encoder: its pooled output, or the first token's
    last hidden state when the model has no pooler."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=images)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


class HFText(nn.Module):
    """A ``transformers`` text model (e.g. BERT) with its tokenizer: reads raw note strings, returns the first
    ([CLS]) token's last hidden state."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 128):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    def forward(self, notes) -> torch.Tensor:
        if isinstance(notes, torch.Tensor):
            raise ModelError("a transformers text encoder reads raw notes: read the data without the CLIP tokenizer "
                             "(MultiFair does so when its text_encoder is a transformers checkpoint)")
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(notes), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(device)
        return self.model(**batch).last_hidden_state[:, 0]


def pretrained_encoders(image: str | None, text: str | None) -> dict[str, tuple[nn.Module, int]]:
    """``{modality: (encoder, width)}`` loaded with ``transformers``' ``from_pretrained`` (a hub name or a local
    folder): ``image`` a vision checkpoint (``AutoModel``, e.g. ``google/vit-base-patch16-224-in21k``), ``text`` a
    text checkpoint with its tokenizer (e.g. ``bert-base-uncased``); None leaves the modality out."""
    from transformers import AutoModel, AutoTokenizer

    encoders = {}
    for modality, name in (("image", image), ("text", text)):
        if name is None:
            continue
        try:
            model = AutoModel.from_pretrained(name)
            wrapped = HFImage(model) if modality == "image" else HFText(model, AutoTokenizer.from_pretrained(name))
        except OSError as exc:
            raise ModelError(f"cannot load the {modality} encoder {name!r} ({str(exc).splitlines()[0]}): give a "
                             "local transformers folder or a hub name that is cached on this machine") from None
        encoders[modality] = (wrapped, int(model.config.hidden_size))
    return encoders


class FusionClassifier(nn.Module):
    """Encoders -> per-modality projection (Linear -> LayerNorm -> Dropout to ``width``) -> a transformer over the
    modality tokens (plus a learned modality embedding) -> mean over the tokens -> MLP head (Linear -> GELU ->
    Linear to one glaucoma logit).

    ``encoders``: ``{modality: (module, output width)}`` (:func:`clip_encoders`, :func:`pretrained_encoders`), one
    or both of :data:`MODALITIES`; with one modality the same model is a unimodal baseline. ``forward(images,
    text)`` returns one logit per sample; :meth:`encode` and :meth:`fuse` split it at the projected features
    ``z_m``, where MultiFair rescales each modality's gradient. :attr:`unimodal` holds one linear head per
    modality on ``z_m``, and :attr:`output_layer` is the head's last layer, whose weights CGGM's direction term
    compares with the unimodal heads'.
    """

    reads_text = True  # the training objective passes the notes as well as the images

    def __init__(self, encoders: dict[str, tuple[nn.Module, int]], width: int = 128, layers: int = 1,
                 heads: int = 4, dropout: float = 0.1):
        super().__init__()
        unknown = sorted(set(encoders) - set(MODALITIES))
        if not encoders or unknown:
            raise ModelError(f"FusionClassifier needs encoders for some of {', '.join(MODALITIES)}, got "
                             f"{sorted(encoders)}")
        self.modalities = tuple(m for m in MODALITIES if m in encoders)
        self.encoders = nn.ModuleDict({m: encoders[m][0] for m in self.modalities})
        self.project = nn.ModuleDict({m: nn.Sequential(nn.Linear(encoders[m][1], width), nn.LayerNorm(width),
                                                       nn.Dropout(dropout)) for m in self.modalities})
        self.modality_embedding = nn.Parameter(torch.zeros(len(self.modalities), width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, batch_first=True, norm_first=True)
        self.fusion = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))
        self.unimodal = nn.ModuleDict({m: nn.Linear(width, 1) for m in self.modalities})

    @property
    def output_layer(self) -> nn.Linear:
        return self.head[-1]

    def encode(self, images: torch.Tensor, text) -> dict[str, torch.Tensor]:
        """The projected features ``z_m`` of each modality (``n x width``, float32)."""
        inputs = {"image": images, "text": text}
        return {m: self.project[m](self.encoders[m](inputs[m]).float()) for m in self.modalities}

    def fuse(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        """The glaucoma logit from the projected features."""
        tokens = torch.stack([z[m] for m in self.modalities], dim=1) + self.modality_embedding
        return self.head(self.fusion(tokens).mean(1)).squeeze(-1)

    def unimodal_logits(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each auxiliary head's logit on its modality's features (detach ``z`` to keep the encoders out of it)."""
        return {m: self.unimodal[m](z[m]).squeeze(-1) for m in self.modalities}

    def forward(self, images: torch.Tensor, text) -> torch.Tensor:
        return self.fuse(self.encode(images, text))
