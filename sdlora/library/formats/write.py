"""Write an Adapter in the kohya/AUTOMATIC1111 format (the library's own) or diffusers' PEFT format.

kohya: `<stem>.lora_down.weight`, `<stem>.lora_up.weight` and `<stem>.alpha` (the true alpha)
per layer; AUTOMATIC1111, Forge, ComfyUI, kohya and diffusers all read it.
diffusers: `<part>.<path>.lora_A.weight` / `lora_B` with peft's LoraConfig per part in the
header (`lora_adapter_metadata`), which `load_lora_weights` turns back into the same scales.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from sdlora.errors import AdapterFormatError
from sdlora.library.formats.adapter import Adapter
from sdlora.library.formats.files import save_tensors
from sdlora.library.formats.names import FORMATS, UNET, UNetBlocks, kohya_stem
from sdlora.library.formats.read import DIFFUSERS_METADATA_KEY, claimed_family
from sdlora.models.families import family_for_parts, family_named

if TYPE_CHECKING:  # torch loads with the first tensor written, not with the library listing
    import torch


def family_of(adapter: Adapter) -> str:
    """The base family an adapter says it is for, else the one its parts fit (SD 1.x when that fits)."""
    claimed = claimed_family(adapter.metadata)
    if claimed:
        return claimed
    return family_for_parts(key.split(".", 1)[0] for key in adapter.layers).name


def kohya_tensors(adapter: Adapter, family: str, blocks: UNetBlocks | None = None) -> dict[str, torch.Tensor]:
    import torch

    tensors = {}
    for key, layer in adapter.layers.items():
        try:
            stem = kohya_stem(key, family, blocks)
        except ValueError as exc:
            raise AdapterFormatError(f"no kohya name for {key}: {exc}") from None
        tensors[f"{stem}.lora_down.weight"] = layer.down
        tensors[f"{stem}.lora_up.weight"] = layer.up
        tensors[f"{stem}.alpha"] = torch.tensor(float(layer.alpha))
    return tensors


def peft_configs(adapter: Adapter) -> dict[str, dict]:
    """peft LoraConfig arguments per model part: the commonest rank and alpha, patterns for the rest."""
    configs = {}
    for part in adapter.parts():
        layers = {_pattern_key(part, path): layer for path, layer in adapter.in_part(part).items()}
        ranks = [layer.rank for layer in layers.values()]
        alphas = [layer.alpha for layer in layers.values()]
        rank, alpha = max(set(ranks), key=ranks.count), max(set(alphas), key=alphas.count)
        configs[part] = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted(layers),
            "rank_pattern": {p: la.rank for p, la in layers.items() if la.rank != rank},
            "alpha_pattern": {p: la.alpha for p, la in layers.items() if la.alpha != alpha},
        }
    return configs


def _pattern_key(part: str, path: str) -> str:
    # peft matches these as suffixes of module paths; without 'text_model.' they match the flattened
    # CLIPTextModel of transformers 5 and the nested one of older versions alike.
    return path if part == UNET else path.removeprefix("text_model.")


def diffusers_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, layer in adapter.layers.items():
        tensors[f"{key}.lora_A.weight"] = layer.down
        tensors[f"{key}.lora_B.weight"] = layer.up
    return tensors


def diffusers_metadata(adapter: Adapter) -> dict[str, str]:
    packed = {
        f"{part}.{name}": value
        for part, config in peft_configs(adapter).items()
        for name, value in config.items()
    }
    return {DIFFUSERS_METADATA_KEY: json.dumps(packed, sort_keys=True)}


def write_adapter(
    path: Path,
    adapter: Adapter,
    fmt: str = "kohya",
    *,
    family: str | None = None,
    blocks: UNetBlocks | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `adapter` in 'kohya' or 'diffusers' format with its user-facing metadata (plus `metadata`)."""
    family = family or family_of(adapter)
    if family_named(family).adapter_layout == "transformer":  # SD3.5, Flux.1: their own names and fusions
        from sdlora.library.formats.transformer_write import write_transformer_adapter

        return write_transformer_adapter(path, adapter, fmt, family, metadata=metadata)
    header = {k: v for k, v in adapter.metadata.items() if k not in (DIFFUSERS_METADATA_KEY, "format")}
    header.update(metadata or {})
    header["format"] = "pt"
    if fmt == "kohya":
        tensors = kohya_tensors(adapter, family, blocks)
    elif fmt == "diffusers":
        tensors = diffusers_tensors(adapter)
        header.update(diffusers_metadata(adapter))
    else:
        raise AdapterFormatError(f"unknown format {fmt!r}; use {' or '.join(FORMATS)}")
    return save_tensors(Path(path), tensors, header)
