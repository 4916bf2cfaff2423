"""Adapters that fine-tune a few parameters of a frozen backbone: LoRA through peft.

LoRA (Hu et al., ICLR 2022, Eq. 3): a frozen weight ``W`` is used as ``W + (alpha / r) B A`` with trainable
``A`` (``r x d_in``, random) and ``B`` (``d_out x r``, zeros), so training starts from the pretrained function.
"""
from __future__ import annotations

from torch import nn

from fairbook.models.clip import ModelError

__all__ = ["add_lora", "lora_parameters"]


def add_lora(module: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0, mlp: bool = False,
             targets: list[str] | None = None) -> nn.Module:
    """LoRA on every attention layer of ``module`` (open_clip's transformer blocks use ``nn.MultiheadAttention``,
    which peft adapts as a whole: its input projection and its output projection), and with ``mlp=True`` on the
    blocks' MLP linears (``mlp.c_fc``, ``mlp.c_proj``) too; ``targets`` names the layers instead (peft's
    ``target_modules``, e.g. ``["qkv"]`` in SAM's image encoder). Every other parameter is frozen. Returns the module,
    changed in place by ``peft.inject_adapter_in_model`` (same class, same forward).

    peft adapts ``nn.MultiheadAttention`` by adding the LoRA update to its weights for each forward and subtracting
    it afterwards, so the frozen attention weights come back up to float rounding (about 1e-8), not exactly.

    Targeting the attention's ``out_proj`` alone would train nothing: ``nn.MultiheadAttention`` reads
    ``out_proj.weight`` directly instead of calling that layer, so an adapter there never enters the forward.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if targets is not None:  # named layers, e.g. SAM's image encoder's ``qkv`` projections (SAMed)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        return _only_lora_trains(inject_adapter_in_model(config, module))
    targets = [name for name, layer in module.named_modules() if isinstance(layer, nn.MultiheadAttention)]
    if mlp:
        targets += [name for name, layer in module.named_modules()
                    if isinstance(layer, nn.Linear) and name.endswith(("mlp.c_fc", "mlp.c_proj"))]
    if not targets:
        raise ModelError(f"add_lora found no nn.MultiheadAttention in {type(module).__name__}: give an open_clip "
                         "transformer tower (e.g. model.visual)")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    return _only_lora_trains(inject_adapter_in_model(config, module))


def _only_lora_trains(module: nn.Module) -> nn.Module:
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)
    return module


def lora_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA tensors of ``module`` by name (what :func:`add_lora` leaves trainable)."""
    return {name: param for name, param in module.named_parameters() if "lora_" in name}
