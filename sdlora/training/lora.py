"""Add a LoRA adapter to a family's denoiser (the UNet today) with peft, and read its weights back out.

W' = W + (alpha/r)·B·A with B initialised to zero, so an adapter that has not trained
yet leaves the model exactly as it was.
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from sdlora.config import LoraSpec

ADAPTER_NAME = "default"


def peft_config(spec: LoraSpec) -> LoraConfig:
    """The peft LoraConfig for a spec; B starts at zero ('gaussian' only changes A's init)."""
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        init_lora_weights="gaussian",
        target_modules=list(spec.all_target_modules),
    )


def add_lora(denoiser: torch.nn.Module, spec: LoraSpec) -> None:
    """Freeze the denoiser and attach a trainable adapter to the spec's target modules."""
    denoiser.requires_grad_(False)
    denoiser.add_adapter(peft_config(spec), adapter_name=ADAPTER_NAME)
    for param in trainable_parameters(denoiser):
        param.data = param.data.float()  # LoRA weights train in fp32 even over a half-precision base


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors in PEFT key format, without the 'unet.' prefix, on the CPU."""
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def load_lora_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put saved adapter tensors back into a UNet that already has the adapter attached."""
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"adapter tensors do not fit this UNet: {unexpected[:3]}")
