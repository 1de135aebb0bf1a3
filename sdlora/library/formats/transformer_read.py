"""Read Flux.1 and SD3 LoRA files of every common tool into an Adapter, or refuse them in one line.

Accepted: kohya/sd-scripts and ComfyUI `lora_unet_` files (original module names, fused qkv and
Flux's linear1 split exactly into the diffusers projections), ComfyUI's `diffusion_model.` files,
diffusers/ai-toolkit/PEFT `transformer.` files (alphas from `lora_adapter_metadata`), OneTrainer's
`lora_transformer_` files and XLabs' `processor.qkv_lora1` files; CLIP-L (`lora_te1_`) and SD3's
CLIP-G (`lora_te2_`) layers come along. T5 layers are refused: sdlora does not adapt T5.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora.errors import AdapterFormatError
from sdlora.library.formats.adapter import Adapter, LoraLayer, ModelLayout
from sdlora.library.formats.files import check_header, header_metadata, load_tensors
from sdlora.library.formats.fused import split, swap_halves, widths_for
from sdlora.library.formats.names import TEXT_ENCODER, TEXT_ENCODER_2, canonical_text_path, split_kohya_stem
from sdlora.library.formats.read import PeftAlphas, build_layer, group_keys, refuse_other_networks
from sdlora.library.formats.transformer_names import (
    FAMILY_WORDS,
    TRANSFORMER,
    NameBook,
    book_for_layout,
    book_for_stems,
    family_of_stems,
    xlabs_original,
)
from sdlora.models.families import FLUX, SD3

UNET_WORDS = re.compile(r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]\d")
T5_MARKERS = ("lora_te3_", "text_encoders.t5xxl.", "text_encoder_3.")
COMFY_TEXT = {
    "text_encoders.clip_l.transformer.": TEXT_ENCODER,
    "text_encoders.clip_g.transformer.": TEXT_ENCODER_2,
}


@dataclass(frozen=True)
class Target:
    """Where one file layer goes: a model part and the module paths its rows stack (one unless fused)."""

    part: str
    paths: tuple[str, ...]
    ratios: tuple[int, ...] = (1,)
    swap: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f"{self.part}.{p}" for p in self.paths)


def claimed_transformer_family(metadata: dict[str, str]) -> str | None:
    """'flux' or 'sd3' when the header names one of them (sdlora's, kohya's or modelspec's key)."""
    if metadata.get("sdlora.family") in FAMILY_WORDS:
        return metadata["sdlora.family"]
    claimed = " ".join(
        (metadata.get("ss_base_model_version", ""), metadata.get("modelspec.architecture", ""))
    ).lower()
    if FLUX.name in claimed:
        return FLUX.name
    if SD3.name in claimed or "stable-diffusion-3" in claimed or "stable-diffusion-v3" in claimed:
        return SD3.name
    return None


def read_transformer_adapter(
    path: str | Path, layout: ModelLayout | None = None, family: str | None = None
) -> Adapter:
    """A Flux.1 or SD3 LoRA file as an Adapter in diffusers names; with `layout`, checked to fit that model."""
    path = Path(path)
    name = path.name
    if path.suffix.lower() != ".safetensors":
        raise AdapterFormatError(
            f"{name}: only .safetensors adapters are accepted (other files may be pickles)"
        )
    header = check_header(path)
    metadata = header_metadata(header)
    keys = [_xlabs_roles(k) for k in header if k != "__metadata__"]
    if not keys:
        raise AdapterFormatError(f"{name} holds no tensors")
    refuse_other_networks(name, keys)
    groups, strays = group_keys(keys)
    if strays:
        raise AdapterFormatError(
            f"{name}: {len(strays)} of {len(keys)} tensors are not LoRA weights (first: {strays[0][:70]!r})"
        )
    stems = list(groups)
    family = _family(name, metadata, stems, layout, family)
    book = book_for_layout(family, layout.shapes) if layout else book_for_stems(family, stems)
    tensors = {_xlabs_roles(k): v for k, v in load_tensors(path).items()}
    alphas = AnchoredPeftAlphas(metadata)
    layers: dict[str, LoraLayer] = {}
    unmatched = []
    for stem, roles in groups.items():
        target = locate(name, stem, family, book)
        if target is None or (layout is not None and not all(k in layout.shapes for k in target.keys)):
            unmatched.append(stem)
            continue
        parts = {role: tensors[key] for role, key in roles.items()}
        alpha = (
            _one_number(name, stem, parts.pop("alpha")) if "alpha" in parts else alphas.get(target.keys[0])
        )
        for key, layer in _layers_of(name, target, parts, alpha, layout).items():
            if key in layers:
                raise AdapterFormatError(f"{name}: two layers of the file adapt {key}; damaged file")
            layers[key] = layer
    if unmatched:
        raise AdapterFormatError(
            f"{name}: {len(unmatched)} of {len(groups)} layers match nothing in a "
            f"{FAMILY_WORDS[family]} transformer (first: {unmatched[0][:70]}); made for a different model"
        )
    return Adapter(layers, metadata, describe(stems, family))


class AnchoredPeftAlphas(PeftAlphas):
    """peft alphas where a pattern may be anchored ('^proj_out': that module path exactly), as ours are."""

    def get(self, key: str) -> float | None:
        part, path = key.split(".", 1)
        pattern = self.config.get(f"{part}.alpha_pattern") or {}
        for pattern_key, alpha in pattern.items():
            if pattern_key.startswith("^") and re.fullmatch(pattern_key[1:], path):
                return float(alpha)
        return super().get(key)  # an anchored pattern never matches there


def _xlabs_roles(key: str) -> str:
    """XLabs writes `<stem>.down.weight`; as `.lora_down.weight` the shared grouping knows it."""
    for role in ("down", "up"):
        if ".processor." in key and key.endswith(f".{role}.weight"):
            return key.removesuffix(f".{role}.weight") + f".lora_{role}.weight"
    return key


def _family(
    name: str, metadata: dict, stems: list[str], layout: ModelLayout | None, family: str | None
) -> str:
    """The family the file is read for; a file made for another family is refused."""
    by_names = family_of_stems(stems)
    by_header = claimed_transformer_family(metadata)
    wanted = layout.family if layout is not None else family
    made_for = by_names if by_names in FAMILY_WORDS else by_header
    if by_names is None and any(UNET_WORDS.search(s) for s in stems):
        where = FAMILY_WORDS.get(wanted, "SD3 or Flux.1")
        raise AdapterFormatError(
            f"{name} was made for a Stable Diffusion UNet; the base model here is {where}"
        )
    if wanted is not None and made_for is not None and made_for != wanted:
        raise AdapterFormatError(
            f"{name} was made for {FAMILY_WORDS[made_for]}; the base model here is {FAMILY_WORDS[wanted]}"
        )
    family = wanted or made_for
    if family not in FAMILY_WORDS:
        raise AdapterFormatError(
            f"{name}: cannot tell whether it is for SD3 or Flux.1; load it with a base model"
        )
    return family


def locate(name: str, stem: str, family: str, book: NameBook) -> Target | None:
    """Where a file's layer stem goes in the model, in any tool's naming; None if nowhere."""
    stem = stem.removeprefix("base_model.model.")
    if stem.startswith(T5_MARKERS) or (
        family == FLUX.name and stem.startswith(("lora_te2_", "text_encoder_2."))
    ):
        raise AdapterFormatError(
            f"{name} adapts the T5 text encoder ({stem[:50]}); sdlora does not apply T5 layers"
        )
    text = _text_target(stem, family)
    if text is not None:
        return text
    original = xlabs_original(stem)
    if original is None and stem.startswith(("lora_unet_", "diffusion_model.", "model.diffusion_model.")):
        original = stem.removeprefix("model.").removeprefix("diffusion_model.").removeprefix("lora_unet_")
    if original is not None:
        entry = book.by_flat_original().get(original.replace(".", "_"))
        if entry is None:
            return None
        return Target(TRANSFORMER, entry.members, entry.ratios, entry.swap_halves)
    if stem.startswith("lora_transformer_"):  # OneTrainer: diffusers paths with '_' for '.'
        path = book.by_flat_member().get(stem.removeprefix("lora_transformer_"))
        return Target(TRANSFORMER, (path,)) if path else None
    path = stem.removeprefix(TRANSFORMER + ".")
    return Target(TRANSFORMER, (path,)) if path in book.by_member() or _member_anywhere(path, book) else None


def _member_anywhere(path: str, book: NameBook) -> bool:
    return any(path in entry.members for entry in book.entries)


def _text_target(stem: str, family: str) -> Target | None:
    kohya = split_kohya_stem(stem) if stem.startswith(("lora_te1_", "lora_te2_")) else None
    if kohya is not None:
        part, path = kohya
        return Target(part, (canonical_text_path(path),))
    for prefix, part in COMFY_TEXT.items():
        if stem.startswith(prefix):
            return Target(part, (canonical_text_path(stem[len(prefix) :]),))
    for part in (TEXT_ENCODER_2, TEXT_ENCODER):
        if stem.startswith(part + "."):
            return Target(part, (canonical_text_path(stem[len(part) + 1 :]),))
    return None


def _layers_of(
    name: str, target: Target, parts: dict[str, torch.Tensor], alpha: float | None, layout: ModelLayout | None
) -> dict[str, LoraLayer]:
    """The file layer as one LoRA layer per diffusers module (split exactly when it was fused)."""
    shapes = [layout.shapes[k] for k in target.keys] if layout is not None else None
    fused_shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if shapes else None
    layer = build_layer(name, target.keys[0], parts, alpha, fused_shape)
    if target.swap:
        layer = LoraLayer(layer.down, swap_halves(layer.up), layer.alpha)
    if len(target.keys) == 1:
        return {target.keys[0]: layer}
    known = {p: s[0] for p, s in zip(target.paths, shapes, strict=True)} if shapes else {}
    try:
        widths = widths_for(target.paths, target.ratios, known, layer.up.shape[0])
        members = split(layer, widths)
    except ValueError as exc:
        raise AdapterFormatError(f"{name}: fused layer for {target.keys[0]}: {exc}; damaged file") from None
    return {k: m for k, m in zip(target.keys, members, strict=True) if m is not None}


def _one_number(name: str, stem: str, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1:
        raise AdapterFormatError(
            f"{name}: layer {stem[:70]} has an alpha of shape {tuple(tensor.shape)}; damaged file"
        )
    return float(tensor.item())


def describe(stems: list[str], family: str) -> str:
    """What kind of file this was, in the words its users know."""
    words = FAMILY_WORDS[family]
    if any(".processor." in s for s in stems):
        return f"XLabs {words} LoRA"
    if any(s.startswith("lora_transformer_") for s in stems):
        return f"OneTrainer {words} LoRA"
    if any(s.startswith("lora_unet_") for s in stems):
        return f"kohya {words} LoRA"
    if any(s.startswith(("diffusion_model.", "model.diffusion_model.")) for s in stems):
        return f"ComfyUI {words} LoRA (diffusion_model. names)"
    return f"diffusers {words} LoRA (transformer. names)"
