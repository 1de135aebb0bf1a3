"""Layer names of the diffusion transformers (Flux.1, SD3/SD3.5) as each tool spells them.

Inside sdlora a transformer layer is `transformer.<diffusers module path>`. The tools people
share LoRAs from name the original modules instead, which fuse several diffusers projections
into one weight:

- Flux.1 (Black Forest Labs' names): a double block's `img_attn.qkv` stacks the rows of
  `attn.to_q`, `to_k`, `to_v`; `txt_attn.qkv` those of `add_q_proj`, `add_k_proj`, `add_v_proj`;
  a single block's `linear1` stacks `to_q`, `to_k`, `to_v` and `proj_mlp` (4x wider). The final
  layer's modulation holds (scale, shift) where diffusers' `norm_out.linear` holds (shift, scale).
- SD3 (the MMDiT's names): `joint_blocks.N.x_block` is the image stream, `context_block` the text
  stream, each with a fused `attn.qkv`; the last block's text stream and the final layer hold
  their modulation halves swapped like Flux's final layer.

kohya and ComfyUI's `lora_unet_` prefix writes these names with '_' for '.'; ComfyUI's own files
write them dotted after `diffusion_model.`; OneTrainer writes diffusers paths after
`lora_transformer_` with '_' for '.'; XLabs names a double block's projections
`processor.qkv_lora1` (image) / `qkv_lora2` (text) and `proj_lora1/2`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdlora.models.families import FLUX, SD3

TRANSFORMER = "transformer"
TRANSFORMER_FAMILIES = (SD3.name, FLUX.name)
FAMILY_WORDS = {family.name: family.words for family in (SD3, FLUX)}

QKV, ADD_QKV = (
    ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
)

# (original name inside a block, diffusers paths inside the block stacked in it, their widths as
# multiples of the first when no model says otherwise)
FLUX_DOUBLE = (
    ("img_attn.qkv", QKV, (1, 1, 1)),
    ("img_attn.proj", ("attn.to_out.0",), (1,)),
    ("img_mlp.0", ("ff.net.0.proj",), (1,)),
    ("img_mlp.2", ("ff.net.2",), (1,)),
    ("img_mod.lin", ("norm1.linear",), (1,)),
    ("txt_attn.qkv", ADD_QKV, (1, 1, 1)),
    ("txt_attn.proj", ("attn.to_add_out",), (1,)),
    ("txt_mlp.0", ("ff_context.net.0.proj",), (1,)),
    ("txt_mlp.2", ("ff_context.net.2",), (1,)),
    ("txt_mod.lin", ("norm1_context.linear",), (1,)),
)
FLUX_SINGLE = (
    ("linear1", (*QKV, "proj_mlp"), (1, 1, 1, 4)),  # Flux's mlp_ratio is 4
    ("linear2", ("proj_out",), (1,)),
    ("modulation.lin", ("norm.linear",), (1,)),
)
FLUX_TOP = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
SD3_JOINT = (
    ("x_block.attn.qkv", QKV, (1, 1, 1)),
    ("x_block.attn.proj", ("attn.to_out.0",), (1,)),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v"), (1, 1, 1)),  # SD3.5 Medium
    ("x_block.attn2.proj", ("attn2.to_out.0",), (1,)),
    ("x_block.mlp.fc1", ("ff.net.0.proj",), (1,)),
    ("x_block.mlp.fc2", ("ff.net.2",), (1,)),
    ("x_block.adaLN_modulation.1", ("norm1.linear",), (1,)),
    ("context_block.attn.qkv", ADD_QKV, (1, 1, 1)),
    ("context_block.attn.proj", ("attn.to_add_out",), (1,)),
    ("context_block.mlp.fc1", ("ff_context.net.0.proj",), (1,)),
    ("context_block.mlp.fc2", ("ff_context.net.2",), (1,)),
    ("context_block.adaLN_modulation.1", ("norm1_context.linear",), (1,)),
)
SD3_TOP = (
    ("x_embedder.proj", "pos_embed.proj"),
    ("context_embedder", "context_embedder"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
# XLabs' processor LoRAs, by name inside a block -> the original name they stand for.
XLABS_DOUBLE = {
    "processor.qkv_lora1": "img_attn.qkv",
    "processor.proj_lora1": "img_attn.proj",
    "processor.qkv_lora2": "txt_attn.qkv",
    "processor.proj_lora2": "txt_attn.proj",
}
XLABS_SINGLE = {"processor.qkv_lora": "attn_qkv", "processor.proj_lora": "linear2"}


@dataclass(frozen=True)
class Fused:
    """One original module and the diffusers modules whose weights it stacks row by row."""

    original: str  # e.g. "double_blocks.0.img_attn.qkv"
    members: tuple[str, ...]  # diffusers transformer paths, in the order of their rows
    ratios: tuple[int, ...] = (1,)  # member widths relative to the first, when no model says
    swap_halves: bool = False  # original rows (scale, shift) are diffusers' (shift, scale)
    written: bool = True  # False: a name only read (XLabs'), never written

    @property
    def flat(self) -> str:
        return self.original.replace(".", "_")


@dataclass(frozen=True)
class NameBook:
    """Every adaptable transformer module of one model, in original and diffusers names."""

    family: str
    entries: tuple[Fused, ...]

    def by_flat_original(self) -> dict[str, Fused]:
        return {entry.flat: entry for entry in self.entries}

    def by_member(self) -> dict[str, tuple[Fused, int]]:
        """The written entry holding each diffusers path, and the path's place in it."""
        return {m: (e, i) for e in self.entries if e.written for i, m in enumerate(e.members)}

    def by_flat_member(self) -> dict[str, str]:
        return {m.replace(".", "_"): m for entry in self.entries for m in entry.members}


def name_book(family: str, blocks: int, single_blocks: int = 0) -> NameBook:
    """The names of a Flux ('flux') or SD3 ('sd3') transformer with this many (double/joint, single) blocks."""
    if family == FLUX.name:
        entries = [Fused(orig, (diff,)) for orig, diff in FLUX_TOP]
        entries.append(Fused("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True))
        for i in range(blocks):
            entries += _block(f"double_blocks.{i}", f"transformer_blocks.{i}", FLUX_DOUBLE)
        for i in range(single_blocks):
            entries += _block(f"single_blocks.{i}", f"single_transformer_blocks.{i}", FLUX_SINGLE)
            # XLabs' single-block qkv covers the attention alone (no proj_mlp rows)
            qkv = _inside(f"single_transformer_blocks.{i}", QKV)
            entries.append(Fused(f"single_blocks.{i}.attn_qkv", qkv, (1, 1, 1), written=False))
    elif family == SD3.name:
        entries = [Fused(orig, (diff,)) for orig, diff in SD3_TOP]
        entries.append(Fused("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True))
        for i in range(blocks):
            for entry in _block(f"joint_blocks.{i}", f"transformer_blocks.{i}", SD3_JOINT):
                # the last block's text stream is an AdaLayerNormContinuous, like the final layer
                last_context_norm = i == blocks - 1 and entry.original.endswith(
                    "context_block.adaLN_modulation.1"
                )
                entries.append(
                    Fused(entry.original, entry.members, entry.ratios, swap_halves=last_context_norm)
                )
    else:
        raise ValueError(f"no transformer names for family {family!r}")
    return NameBook(family, tuple(entries))


def _inside(prefix: str, paths: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{prefix}.{p}" for p in paths)


def _block(original: str, diffusers: str, table) -> list[Fused]:
    return [
        Fused(f"{original}.{name}", _inside(diffusers, members), ratios) for name, members, ratios in table
    ]


def book_for_layout(family: str, shapes: dict[str, tuple[int, ...]]) -> NameBook:
    """The name book of a model, from its layout's `transformer.` layer shapes, keeping only modules it has."""
    paths = {key.split(".", 1)[1] for key in shapes if key.startswith(TRANSFORMER + ".")}
    book = name_book(family, _count(paths, "transformer_blocks"), _count(paths, "single_transformer_blocks"))
    kept = tuple(e for e in book.entries if all(m in paths for m in e.members))
    return NameBook(family, kept)


def book_for_stems(family: str, stems: list[str]) -> NameBook:
    """A name book large enough for every block number the file's layer names mention."""
    numbers = {"double": [-1], "single": [-1]}
    for stem in stems:
        for match in re.finditer(
            r"(single_(?:transformer_)?blocks|double_blocks|joint_blocks|transformer_blocks)[._](\d+)", stem
        ):
            kind = "single" if match.group(1).startswith("single") else "double"
            numbers[kind].append(int(match.group(2)))
    return name_book(family, max(numbers["double"]) + 1, max(numbers["single"]) + 1)


def _count(paths: set[str], root: str) -> int:
    found = [int(p.split(".")[1]) for p in paths if p.startswith(root + ".")]
    return max(found) + 1 if found else 0


def family_of_stems(stems: list[str]) -> str | None:
    """'flux' or 'sd3' when a file's layer names say which transformer they were made for, else None."""
    text = " ".join(stems)
    if re.search(r"double_blocks|single_blocks|single_transformer_blocks|img_attn|txt_attn", text):
        return FLUX.name
    if re.search(r"joint_blocks|x_block|context_block", text):
        return SD3.name
    if re.search(r"(^| )(transformer\.|lora_transformer_|diffusion_model\.)?transformer_blocks", text):
        return "transformer"  # diffusers names: either family; the base model decides
    return None


def xlabs_original(stem: str) -> str | None:
    """An XLabs stem ('double_blocks.0.processor.qkv_lora1') as the original module it adapts."""
    match = re.match(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.(processor\.\w+)$", stem)
    if not match:
        return None
    kind, index, inner = match.groups()
    table = XLABS_DOUBLE if kind == "double" else XLABS_SINGLE
    return f"{kind}_blocks.{index}.{table[inner]}" if inner in table else None
