"""A Flux transformer with int8 and NF4 frozen weights (bitsandbytes) on this machine: error, memory, LoRA gradients.

    pip install bitsandbytes==0.50.2 && python bench/quantization.py [--wide]

First through diffusers' own BitsAndBytesConfig (on a machine without a GPU diffusers refuses it in
one line), then with the same bitsandbytes layers put in place by diffusers' replace_with_bnb_linear,
which runs on a CPU: the transformer's output against the float model, the bytes of its Linear
weights, and one backward pass through peft's LoRA layers for quantized bases. Prints a table for
docs/quantization.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def build(folder: Path, wide: bool):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    size = dict(
        num_attention_heads=4, attention_head_dim=128, joint_attention_dim=512, pooled_projection_dim=256
    )
    if not wide:
        size = dict(
            num_attention_heads=2, attention_head_dim=16, joint_attention_dim=64, pooled_projection_dim=32
        )
    rope = (16, 56, 56) if wide else (4, 6, 6)
    model = FluxTransformer2DModel(
        in_channels=64, num_layers=2, num_single_layers=4, guidance_embeds=True, axes_dims_rope=rope, **size
    )
    model.save_pretrained(folder)
    return size


def inputs(size) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, 64, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 16, size["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, size["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.zeros(64, 3),
        txt_ids=torch.zeros(16, 3),
    )


def weight_bytes(model) -> int:
    """Bytes of every Linear weight, counting a quantized weight's packed data and its scales."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in type(module).__module__:
            w = module.weight
            total += w.numel() * w.element_size()
            state = getattr(w, "quant_state", None)
            scales = state.absmax if state is not None else getattr(w, "SCB", None)
            total += scales.numel() * scales.element_size() if scales is not None else 0
    return total


def quantized(folder: Path, kind: str):
    """The transformer with bitsandbytes int8 or NF4 Linear layers, as diffusers' loader would make them."""
    from diffusers import FluxTransformer2DModel
    from quantized_layers import bnb_config, quantize_linear_layers

    model = FluxTransformer2DModel.from_pretrained(folder)
    return quantize_linear_layers(model, kind), bnb_config(kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wide", action="store_true", help="width 512 (head dim 128, as Flux.1) instead of 32"
    )
    args = parser.parse_args()
    import bitsandbytes as bnb
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    folder = Path(tempfile.mkdtemp()) / "transformer"
    size = build(folder, args.wide)
    torch.set_num_threads(1)
    reference = FluxTransformer2DModel.from_pretrained(folder)
    with torch.no_grad():
        want = reference(**inputs(size)).sample
    params = sum(p.numel() for p in reference.parameters())
    print(
        f"bitsandbytes {bnb.__version__}, torch {torch.__version__}; Flux transformer of {params / 1e6:.1f} M parameters"
    )
    print("| weights | Linear weights | vs float32 | output error (relative) | LoRA gradients |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| float32 | {weight_bytes(reference) / 2**20:.2f} MiB | 1.00x | 0 | - |")
    for kind in ("int8", "nf4"):
        model, config = quantized(folder, kind)
        try:
            FluxTransformer2DModel.from_pretrained(folder, quantization_config=config)
            through_diffusers = "diffusers' loader accepts it"
        except RuntimeError as exc:
            through_diffusers = f"diffusers' loader: {str(exc).splitlines()[0]}"
        with torch.no_grad():
            error = ((model(**inputs(size)).sample - want).norm() / want.norm()).item()
        model.requires_grad_(False)
        model.add_adapter(
            LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
        )
        model(**inputs(size)).sample.square().mean().backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        wrapper = type(model.get_submodule("transformer_blocks.0.attn.to_q")).__name__
        finite = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        ratio = weight_bytes(reference) / weight_bytes(model)
        print(
            f"| {kind} | {weight_bytes(model) / 2**20:.2f} MiB | {1 / ratio:.2f}x | {error:.4f} | "
            f"{len(grads)} tensors through peft's {wrapper}, {'finite' if finite else 'MISSING'} |"
        )
        print(f"  ({through_diffusers})")


if __name__ == "__main__":
    main()
