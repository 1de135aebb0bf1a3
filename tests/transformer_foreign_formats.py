"""Flux.1 and SD3 LoRA files as other tools write them, from their naming rules written out here.

Each writer takes fused original-module updates or diffusers-named layers and writes the tensors
that tool would write; none uses sdlora's writer. The rules, in our words:

- kohya sd-scripts (networks/lora_flux.py, lora_sd3.py): `lora_unet_` + the original module path
  with '_' for '.', one LoRA per original Linear (so one per fused qkv), `.alpha` per layer;
  `lora_te1_` CLIP-L, `lora_te2_` CLIP-G, `lora_te3_` T5. With `split_qkv` the fused layer is
  written with the three downs stacked and a block-diagonal up.
- ComfyUI (comfy/lora.py key maps): the same original names, dotted, after `diffusion_model.`.
- ai-toolkit / diffusers: `transformer.<diffusers path>.lora_A.weight` / `lora_B`, no alpha
  tensor (scale 1 unless peft metadata says otherwise).
- OneTrainer: `lora_transformer_` + diffusers path with '_' for '.', `lora_down`/`lora_up`/`alpha`.
- XLabs: `double_blocks.N.processor.qkv_lora1.down.weight` (image qkv), `proj_lora1` (image
  out), `qkv_lora2`/`proj_lora2` (text); one plain LoRA per fused projection, no alpha.
"""

from __future__ import annotations

import torch

Layer = tuple[torch.Tensor, torch.Tensor, float]  # down, up, alpha


def lora(out: int, inp: int, rank: int, seed: int, alpha: float | None = None) -> Layer:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, inp, generator=g) * 0.3
    up = torch.randn(out, rank, generator=g) * 0.3
    return down, up, float(alpha if alpha is not None else rank)


def delta(layer: Layer) -> torch.Tensor:
    down, up, alpha = layer
    return (alpha / down.shape[0]) * up.flatten(1) @ down.flatten(1)


def kohya_file(layers: dict[str, Layer], prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """`layers` keyed by original module path (or text path after its lora_te prefix) -> kohya tensors."""
    out = {}
    for path, (down, up, alpha) in layers.items():
        stem = path.replace(".", "_") if path.startswith("lora_te") else prefix + path.replace(".", "_")
        out[f"{stem}.lora_down.weight"] = down
        out[f"{stem}.lora_up.weight"] = up
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


def kohya_split_qkv(parts: list[Layer]) -> Layer:
    """kohya's split_qkv save: downs stacked, ups block-diagonal, alpha written as the parts' alpha."""
    down = torch.cat([p[0] for p in parts])
    rank = parts[0][0].shape[0]
    rows = [p[1].shape[0] for p in parts]
    up = torch.zeros(sum(rows), down.shape[0])
    for j, p in enumerate(parts):
        up[sum(rows[:j]) : sum(rows[: j + 1]), j * rank : (j + 1) * rank] = p[1]
    return down, up, parts[0][2]


def comfyui_file(layers: dict[str, Layer]) -> dict[str, torch.Tensor]:
    out = {}
    for path, (down, up, alpha) in layers.items():
        out[f"diffusion_model.{path}.lora_down.weight"] = down
        out[f"diffusion_model.{path}.lora_up.weight"] = up
        out[f"diffusion_model.{path}.alpha"] = torch.tensor(alpha)
    return out


def ai_toolkit_file(layers: dict[str, Layer]) -> dict[str, torch.Tensor]:
    """diffusers names, lora_A/lora_B, no alpha: every layer must be written at scale 1."""
    out = {}
    for path, (down, up, alpha) in layers.items():
        assert alpha == down.shape[0], "ai-toolkit files carry no alpha"
        out[f"transformer.{path}.lora_A.weight"] = down
        out[f"transformer.{path}.lora_B.weight"] = up
    return out


def onetrainer_file(layers: dict[str, Layer], text: dict[str, Layer]) -> dict[str, torch.Tensor]:
    out = {}
    for path, (down, up, alpha) in layers.items():
        stem = "lora_transformer_" + path.replace(".", "_")
        out.update(
            {
                f"{stem}.lora_down.weight": down,
                f"{stem}.lora_up.weight": up,
                f"{stem}.alpha": torch.tensor(alpha),
            }
        )
    for path, (down, up, alpha) in text.items():
        stem = "lora_te1_" + path.replace(".", "_")
        out.update(
            {
                f"{stem}.lora_down.weight": down,
                f"{stem}.lora_up.weight": up,
                f"{stem}.alpha": torch.tensor(alpha),
            }
        )
    return out


def xlabs_file(blocks: dict[int, dict[str, Layer]]) -> dict[str, torch.Tensor]:
    """{block: {'qkv_lora1': layer, ...}} -> XLabs' double-block processor tensors (no alpha)."""
    out = {}
    for index, layers in blocks.items():
        for name, (down, up, alpha) in layers.items():
            assert alpha == down.shape[0], "XLabs files carry no alpha"
            out[f"double_blocks.{index}.processor.{name}.down.weight"] = down
            out[f"double_blocks.{index}.processor.{name}.up.weight"] = up
    return out
