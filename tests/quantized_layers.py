"""A transformer with bitsandbytes int8 / NF4 Linear layers on a CPU, as diffusers' loader would place them.

diffusers' BitsAndBytesConfig loader refuses to run without a GPU ("No GPU found"), but the layers it
puts in place (diffusers' own `replace_with_bnb_linear`) and peft's LoRA layers over them run on a CPU:
this builds that model from a float one, so tests and bench/quantization.py can train on it here.
"""

from __future__ import annotations

import torch

# Small layers where quantization error shows most, kept in float (diffusers' loader keeps
# the modules a model lists in _keep_in_fp32_modules / _skip_layerwise_casting_patterns alike).
KEEP_FLOAT = ("norm_out", "x_embedder", "context_embedder")


def bnb_config(kind: str, compute_dtype: torch.dtype = torch.float32):
    """diffusers' BitsAndBytesConfig for int8 or NF4 (computing in `compute_dtype`: float32 on a CPU)."""
    from diffusers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )


def quantize_linear_layers(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """`model` with its Linear layers (but KEEP_FLOAT) made bitsandbytes int8 or NF4 layers holding its weights,
    and marked as diffusers' loader marks it (peft picks its bitsandbytes LoRA layers from that mark)."""
    import bitsandbytes as bnb
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model = replace_with_bnb_linear(
        model, modules_to_not_convert=list(KEEP_FLOAT), quantization_config=bnb_config(kind)
    )
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit):
            weight = state.pop(f"{name}.weight")
            module.weight = (
                bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
                if kind == "int8"
                else bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            )
            if f"{name}.bias" in state:
                module.bias = torch.nn.Parameter(state.pop(f"{name}.bias"), requires_grad=False)
    model.load_state_dict(state, strict=False)
    model = model.to("cpu")  # bitsandbytes quantizes its parameters when they are moved to a device
    setattr(model, f"is_loaded_in_{'8bit' if kind == 'int8' else '4bit'}", True)
    return model
