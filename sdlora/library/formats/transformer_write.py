"""Write a Flux.1 or SD3 Adapter in kohya's naming (the library's own file) or diffusers' (`transformer.`).

kohya: `lora_unet_<original module name>` with the diffusers projections that the original model
fuses joined exactly into one layer (see fused.py), `lora_te1_` CLIP-L and `lora_te2_` CLIP-G, the
true alpha per layer, and `ss_base_model_version` / `modelspec.architecture` naming the model.
ComfyUI, Forge, kohya and diffusers (Flux) load it.
diffusers: `transformer.<path>.lora_A/lora_B` plus peft's LoraConfig per part in the header,
which `load_lora_weights` of StableDiffusion3Pipeline and FluxPipeline read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from sdlora.errors import AdapterFormatError
from sdlora.library.formats.adapter import Adapter, LoraLayer, ModelLayout, layer_shapes
from sdlora.library.formats.files import save_tensors
from sdlora.library.formats.fused import join, swap_halves, widths_for
from sdlora.library.formats.names import TEXT_ENCODER, TEXT_ENCODER_2, canonical_text_path, flat
from sdlora.library.formats.read import DIFFUSERS_METADATA_KEY
from sdlora.library.formats.transformer_names import (
    TRANSFORMER,
    Fused,
    book_for_layout,
    book_for_stems,
    name_book,
)
from sdlora.library.formats.write import diffusers_metadata, diffusers_tensors
from sdlora.models.families import FLUX, SD3

KOHYA_TEXT = {TEXT_ENCODER: "lora_te1_", TEXT_ENCODER_2: "lora_te2_"}  # CLIP-L, CLIP-G (SD3 only)
# What kohya writes for each model (flux_utils.MODEL_VERSION_FLUX_V1; sai_model_spec's ARCH_*).
ARCHITECTURE = {
    family.name: {
        "ss_base_model_version": family.kohya_version,
        "modelspec.architecture": family.modelspec_architecture,
    }
    for family in (FLUX, SD3)
} | {
    f"{FLUX.name}-schnell": {
        "ss_base_model_version": FLUX.kohya_version,
        "modelspec.architecture": "flux-1-schnell/lora",
    }
}


def transformer_layout(pipeline, family: str) -> ModelLayout:
    """What a Flux or SD3 adapter must fit: the transformer's and the CLIP encoders' layer shapes (not T5's)."""
    parts = {TRANSFORMER: pipeline.transformer, TEXT_ENCODER: pipeline.text_encoder}
    if family == SD3.name:
        parts[TEXT_ENCODER_2] = pipeline.text_encoder_2
    shapes = {}
    for part, model in parts.items():
        if model is None:
            continue
        for path, shape in layer_shapes(model).items():
            shapes[f"{part}.{path if part == TRANSFORMER else canonical_text_path(path)}"] = shape
    return ModelLayout(family, shapes, None)


def kohya_transformer_tensors(
    adapter: Adapter, family: str, layout: ModelLayout | None = None
) -> dict[str, torch.Tensor]:
    """kohya-named tensors: one fused layer per original module, text layers as `lora_te1_`/`lora_te2_`."""
    transformer = adapter.in_part(TRANSFORMER)
    book = book_for_layout(family, layout.shapes) if layout else book_for_stems(family, list(transformer))
    by_member = book.by_member()
    grouped: dict[Fused, dict[str, LoraLayer]] = {}
    for path, layer in transformer.items():
        if path not in by_member:
            raise AdapterFormatError(
                f"no kohya name for transformer.{path}: the original model has no such module"
            )
        grouped.setdefault(by_member[path][0], {})[path] = layer
    tensors: dict[str, torch.Tensor] = {}
    for entry, members in grouped.items():
        _put(tensors, "lora_unet_" + entry.flat, _fused(entry, members, layout))
    for part, prefix in KOHYA_TEXT.items():
        if part == TEXT_ENCODER_2 and family != SD3.name and adapter.in_part(part):
            raise AdapterFormatError(f"a {family} model has no second CLIP text encoder to adapt")
        for path, layer in adapter.in_part(part).items():
            _put(tensors, prefix + flat(canonical_text_path(path)), layer)
    others = set(adapter.parts()) - {TRANSFORMER, *KOHYA_TEXT}
    if others:
        raise AdapterFormatError(f"a {family} adapter cannot hold {', '.join(sorted(others))} layers")
    return tensors


def _fused(entry: Fused, members: dict[str, LoraLayer], layout: ModelLayout | None) -> LoraLayer:
    known = {p: layout.shapes[f"{TRANSFORMER}.{p}"][0] for p in entry.members} if layout else {}
    known.update({p: layer.up.shape[0] for p, layer in members.items()})
    widths = widths_for(entry.members, entry.ratios, known)
    layer = join([members.get(p) for p in entry.members], widths)
    return LoraLayer(layer.down, swap_halves(layer.up), layer.alpha) if entry.swap_halves else layer


def _put(tensors: dict[str, torch.Tensor], stem: str, layer: LoraLayer) -> None:
    tensors[f"{stem}.lora_down.weight"] = layer.down.contiguous()
    tensors[f"{stem}.lora_up.weight"] = layer.up.contiguous()
    tensors[f"{stem}.alpha"] = torch.tensor(float(layer.alpha))


def anchored_peft_metadata(adapter: Adapter, family: str, layout: ModelLayout | None) -> dict[str, str]:
    """diffusers' header with the transformer's peft patterns made unambiguous.

    peft matches a pattern as a suffix of a module path and takes the first that matches: Flux's
    top-level `proj_out` would also claim every single block's `proj_out`. Such names are
    anchored ('^proj_out'), and the targets become one full-match regex if any is ambiguous.
    """
    packed = json.loads(diffusers_metadata(adapter)[DIFFUSERS_METADATA_KEY])
    paths = set(adapter.in_part(TRANSFORMER)) | {
        m for e in name_book(family, 1, 1).entries for m in e.members
    }
    if layout is not None:
        paths |= {k.split(".", 1)[1] for k in layout.shapes if k.startswith(TRANSFORMER + ".")}

    def ambiguous(path: str) -> bool:
        return any(other.endswith("." + path) for other in paths)

    for name in ("rank_pattern", "alpha_pattern"):
        pattern = packed.get(f"{TRANSFORMER}.{name}") or {}
        packed[f"{TRANSFORMER}.{name}"] = {
            ("^" + re.escape(k) if ambiguous(k) else k): v for k, v in pattern.items()
        }
    targets = packed.get(f"{TRANSFORMER}.target_modules")
    if targets and any(ambiguous(t) for t in targets):
        packed[f"{TRANSFORMER}.target_modules"] = "(?:" + "|".join(re.escape(t) for t in targets) + ")"
    return {DIFFUSERS_METADATA_KEY: json.dumps(packed, sort_keys=True)}


def write_transformer_adapter(
    path: Path,
    adapter: Adapter,
    fmt: str,
    family: str,
    *,
    layout: ModelLayout | None = None,
    metadata: dict[str, str] | None = None,
    architecture: str | None = None,
) -> Path:
    """Write a Flux ('flux') or SD3 ('sd3') adapter in 'kohya' or 'diffusers' format with its metadata."""
    header = {k: v for k, v in adapter.metadata.items() if k not in (DIFFUSERS_METADATA_KEY, "format")}
    header.update(ARCHITECTURE[architecture or family])
    header["sdlora.family"] = family
    header.update(metadata or {})
    header["format"] = "pt"
    if fmt == "kohya":
        tensors = kohya_transformer_tensors(adapter, family, layout)
    elif fmt == "diffusers":
        tensors = diffusers_tensors(adapter)
        header.update(anchored_peft_metadata(adapter, family, layout))
    else:
        raise AdapterFormatError(f"unknown format {fmt!r}; use kohya or diffusers")
    return save_tensors(Path(path), tensors, header)
