"""Layer names: the one place that knows how each tool spells a model's layers.

Inside sdlora a layer is named `<part>.<module path>` as diffusers and transformers spell it
(`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`). Other tools write:

- kohya / AUTOMATIC1111 / ComfyUI: `lora_unet_<path with _ for .>`, `lora_te_…` (SD 1.x/2.x) or
  `lora_te1_…`/`lora_te2_…` (SDXL). SD 1.x/2.x UNet paths are diffusers paths; SDXL's are the
  original (LDM) block names, since kohya trains SDXL on the original UNet.
- original-SD (LDM) names: `input_blocks.<n>.<slot>`, `middle_block.<n>`, `output_blocks.<n>.<slot>`,
  ResNet layers as `in_layers.2` (conv1), `out_layers.3` (conv2), `emb_layers.1`, `skip_connection`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdlora.models.families import DEFAULT, family_named, is_family_name

FORMATS = ("kohya", "diffusers")  # what the library writes; the first is its own
TOOLS = {
    "kohya": "AUTOMATIC1111, Forge, ComfyUI, kohya and diffusers",
    "diffusers": "diffusers (load_lora_weights) and PEFT",
}
UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"
# "transformer": the denoiser of SD3 and Flux.1 (their names are in transformer_names.py)
PARTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2, "transformer")

# Words of module names that themselves contain '_': turning kohya's '_' back into '.' keeps them.
COMPOUND_WORDS = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "proj_in",
    "proj_out",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "conv_shortcut",
    "time_emb_proj",
    "time_embedding",
    "add_embedding",
    "linear_1",
    "linear_2",
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "layer_norm1",
    "layer_norm2",
    "final_layer_norm",
    "text_projection",
    "input_blocks",
    "middle_block",
    "output_blocks",
    "in_layers",
    "out_layers",
    "emb_layers",
    "skip_connection",
    "label_emb",
    "time_embed",
    "token_embedding",
    "position_embedding",
)
_COMPOUNDS = {tuple(word.split("_")): word for word in COMPOUND_WORDS}
_LONGEST = max(len(words) for words in _COMPOUNDS)

RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
RESNET_FROM_LDM = {ldm: diffusers for diffusers, ldm in RESNET_TO_LDM.items()}
TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
TOP_FROM_LDM = {ldm: diffusers for diffusers, ldm in TOP_TO_LDM.items()}


@dataclass(frozen=True)
class UNetBlocks:
    """What the LDM block numbering depends on: ResNets per level, and which up levels have attention."""

    layers_per_block: int = 2
    up_levels_with_attention: frozenset[int] = frozenset({1, 2, 3})  # SD 1.x/2.x; SDXL: {0, 1}

    @classmethod
    def of(cls, unet_config) -> UNetBlocks | None:
        layers = (
            unet_config.get("layers_per_block")
            if isinstance(unet_config, dict)
            else unet_config.layers_per_block
        )
        up_types = (
            unet_config.get("up_block_types") if isinstance(unet_config, dict) else unet_config.up_block_types
        )
        if not isinstance(layers, int):
            return None  # per-level counts: no published SD model has them, so no LDM names
        return cls(layers, frozenset(i for i, kind in enumerate(up_types) if "CrossAttn" in kind))


SDXL_BLOCKS = UNetBlocks(2, frozenset({0, 1}))


def dotted(underscored: str) -> str:
    """kohya's flattened path back to a dotted one: 'down_blocks_0_attentions_0_proj_in' -> 'down_blocks.0...'."""
    words, out, i = underscored.split("_"), [], 0
    while i < len(words):
        for size in range(min(_LONGEST, len(words) - i), 1, -1):
            if tuple(words[i : i + size]) in _COMPOUNDS:
                out.append(_COMPOUNDS[tuple(words[i : i + size])])
                i += size
                break
        else:
            out.append(words[i])
            i += 1
    return ".".join(out)


def flat(path: str) -> str:
    return path.replace(".", "_")


def to_ldm(path: str, blocks: UNetBlocks) -> str | None:
    """A diffusers UNet module path in LDM names; None for a module LDM has no name for."""
    if path in TOP_TO_LDM:
        return TOP_TO_LDM[path]
    p = path.split(".")
    per_level = blocks.layers_per_block + 1
    if p[0] == "mid_block" and len(p) > 3:
        if p[1] == "resnets":
            return _join(f"middle_block.{2 * int(p[2])}", _resnet_to_ldm(p[3:]))
        return _join("middle_block.1", ".".join(p[3:]))
    if p[0] not in ("down_blocks", "up_blocks") or len(p) < 5:
        return None
    level, kind, index, rest = int(p[1]), p[2], int(p[3]), p[4:]
    if kind == "downsamplers":
        return f"input_blocks.{(level + 1) * per_level}.0.op"
    if kind == "upsamplers":
        slot = 2 if level in blocks.up_levels_with_attention else 1
        return f"output_blocks.{level * per_level + blocks.layers_per_block}.{slot}.conv"
    block = (
        f"input_blocks.{level * per_level + index + 1}"
        if p[0] == "down_blocks"
        else f"output_blocks.{level * per_level + index}"
    )
    if kind == "resnets":
        return _join(f"{block}.0", _resnet_to_ldm(rest))
    return _join(f"{block}.1", ".".join(rest))


def from_ldm(path: str, blocks: UNetBlocks) -> str | None:
    """An LDM UNet module path in diffusers names; None if it names no known block."""
    if path in TOP_FROM_LDM:
        return TOP_FROM_LDM[path]
    p = path.split(".")
    per_level = blocks.layers_per_block + 1
    try:
        number, slot, rest = int(p[1]), p[2] if len(p) > 2 else "", p[3:]
    except (IndexError, ValueError):
        return None
    if p[0] == "middle_block":
        rest = p[2:]
        if number == 1:
            return _join("mid_block.attentions.0", ".".join(rest))
        return _join(f"mid_block.resnets.{number // 2}", _resnet_from_ldm(rest))
    if p[0] == "input_blocks" and number > 0:
        level, index = divmod(number - 1, per_level)
        if index == blocks.layers_per_block:  # the slot after a level's layers holds its downsampler
            return f"down_blocks.{level}.downsamplers.0.conv" if rest == ["op"] and slot == "0" else None
        kind = "resnets" if slot == "0" else "attentions"
        inner = _resnet_from_ldm(rest) if slot == "0" else ".".join(rest)
        return _join(f"down_blocks.{level}.{kind}.{index}", inner)
    if p[0] == "output_blocks":
        level, index = divmod(number, per_level)
        if rest == ["conv"] and slot in ("1", "2"):  # attentions have no bare 'conv'; upsamplers do
            return f"up_blocks.{level}.upsamplers.0.conv"
        kind = "resnets" if slot == "0" else "attentions"
        inner = _resnet_from_ldm(rest) if slot == "0" else ".".join(rest)
        return _join(f"up_blocks.{level}.{kind}.{index}", inner)
    return None


def _join(head: str, tail: str | None) -> str | None:
    if tail is None:
        return None
    return f"{head}.{tail}" if tail else head


def _resnet_to_ldm(rest: list[str]) -> str | None:
    name = ".".join(rest)
    return RESNET_TO_LDM.get(name)


def _resnet_from_ldm(rest: list[str]) -> str | None:
    return RESNET_FROM_LDM.get(".".join(rest))


def canonical_text_path(path: str) -> str:
    """transformers 5 flattened CLIPTextModel ('encoder.layers.0...'); every tool writes 'text_model.encoder...'."""
    return (
        path if path.startswith("text_model.") or path.startswith("text_projection") else f"text_model.{path}"
    )


def kohya_stem(layer: str, family: str, blocks: UNetBlocks | None) -> str:
    """The kohya name of a layer: diffusers paths for SD 1.x/2.x UNets, LDM paths for SDXL's."""
    part, path = layer.split(".", 1)
    kind = family_named(family) if is_family_name(family) else DEFAULT
    if part == UNET:
        if kind.kohya_original_unet_names:
            ldm = to_ldm(path, blocks or SDXL_BLOCKS)
            if ldm is None:
                raise ValueError(f"{path} has no name in the original SDXL UNet")
            path = ldm
        return "lora_unet_" + flat(path)
    prefixes = kind.kohya_text_prefixes
    if part not in prefixes:
        raise ValueError(f"a {family} model has no {part}")
    return prefixes[part] + flat(path)


_KOHYA_PREFIX = re.compile(r"^(lora_unet|lora_te[12]?|lycoris)_(.+)$")


def split_kohya_stem(stem: str) -> tuple[str, str] | None:
    """'lora_te2_text_model_...' -> ('text_encoder_2', 'text_model....'); None if not a kohya name."""
    match = _KOHYA_PREFIX.match(stem)
    if not match:
        return None
    prefix, rest = match.groups()
    part = {
        "lora_unet": UNET,
        "lycoris": UNET,
        "lora_te": TEXT_ENCODER,
        "lora_te1": TEXT_ENCODER,
        "lora_te2": TEXT_ENCODER_2,
    }[prefix]
    return part, dotted(rest)
