"""Add a LoRA adapter to a family's denoiser (the UNet today) with peft, and read its weights back out.

W' = W + (alpha/r)·B·A with B initialised to zero, so an adapter that has not trained
yet leaves the model exactly as it was.
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from sdlora.config import ATTENTION_PROJECTIONS, LoraSpec

ADAPTER_NAME = "default"


def targets_for(spec: LoraSpec, family_targets: tuple[str, ...] | None) -> tuple[str, ...]:
    """The layers to adapt: the family's default targets where the spec keeps the default (a transformer's
    attention has text-stream projections too), plus the spec's extra targets."""
    if family_targets is None or spec.target_modules != ATTENTION_PROJECTIONS:
        return spec.all_target_modules
    return tuple(dict.fromkeys(family_targets + spec.extra_target_modules))


def peft_config(spec: LoraSpec, family_targets: tuple[str, ...] | None = None) -> LoraConfig:
    """The peft LoraConfig for a spec; B starts at zero ('gaussian' only changes A's init)."""
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        init_lora_weights="gaussian",
        target_modules=list(targets_for(spec, family_targets)),
    )


def add_lora(
    denoiser: torch.nn.Module,
    spec: LoraSpec,
    family_targets: tuple[str, ...] | None = None,
    seed: int | None = None,
) -> None:
    """Freeze the denoiser and attach a trainable adapter to the spec's (or family's default) targets;
    A drawn from `seed` when given."""
    denoiser.requires_grad_(False)
    denoiser.add_adapter(peft_config(spec, family_targets), adapter_name=ADAPTER_NAME)
    if seed is not None:
        draw_initial_weights(denoiser, seed)
    for param in trainable_parameters(denoiser):
        param.data = param.data.float()  # LoRA weights train in fp32 even over a half-precision base


@torch.no_grad()
def draw_initial_weights(unet: torch.nn.Module, seed: int) -> None:
    """peft's 'gaussian' start (A ~ N(0, 1/r), B = 0), drawn from a generator of the run's own.

    peft draws A from torch's process-wide generator, which every thread of a server shares (an
    adapter loaded for a generation draws from it too), so the same config gave another adapter
    whenever anything else ran meanwhile.
    """
    from peft.tuners.lora import LoraLayer

    generator = torch.Generator().manual_seed(seed)
    for module in unet.modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            weight = module.lora_A[ADAPTER_NAME].weight
            weight.copy_(torch.randn(weight.shape, generator=generator) / module.r[ADAPTER_NAME])


def layer_counts(
    denoiser: torch.nn.Module, spec: LoraSpec, family_targets: tuple[str, ...] | None = None
) -> tuple[int, int]:
    """(leaf modules a forward pass calls, layers the spec would adapt) of a denoiser, for the estimate: on a
    small model each call costs more than its arithmetic. Adapters already loaded (peft's lora_* parts) are
    left out and their wrapped layers counted under their own names, as on the bare model."""
    config = peft_config(spec, family_targets)
    modules = adapted = 0
    for name, module in denoiser.named_modules():
        if next(module.children(), None) is not None or ".lora_" in f".{name}":
            continue
        modules += 1
        name = name.removesuffix(".base_layer")  # peft's own rule for which names its targets match
        adapted += isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and bool(
            check_target_module_exists(config, name)
        )
    return modules, adapted


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
