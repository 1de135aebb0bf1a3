"""Block weights: one weight per block of the denoiser, as the LoRA Block Weight extension counts them.

The extension (hako-mikan/sd-webui-lora-block-weight) numbers a UNet's blocks as the original
Stable Diffusion code does: BASE (the text encoders), IN00-IN11 (`input_blocks.N`), M00 (the
middle block) and OUT00-OUT11 (`output_blocks.N`). A list of weights names a fixed sequence of them:

- SD 1.x/2.x, 17 weights: BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT11 (the blocks that
  hold attention, which is what a plain LoRA adapts); 26 weights: every block (LoCon adapts the rest).
- SDXL, 12 weights: BASE, IN04, IN05, IN07, IN08, M00, OUT00-OUT05; 20 weights: BASE, IN00-IN08, M00,
  OUT00-OUT08.
- Flux.1, 61 weights (the extension's): CLIP, T5, IN (the input embedders), D00-D18 (the joint blocks,
  `transformer_blocks.i`), S00-S37 (the single blocks, `single_transformer_blocks.i`), OUT (the final
  norm and projection).
- SD3.5, sdlora's own convention in the same spirit: TE (all text encoders), IN (the embedders), J00..
  (the joint blocks, `transformer_blocks.i`), OUT; 27 weights for the 24 blocks of SD3/SD3.5 Medium,
  41 for the 38 of SD3.5 Large.

As in the extension, a block the list does not name (IN00 in the 17-weight form) is weighted 0,
and layers outside every block (the time embedding, the UNet's last convolution) keep weight 1.
Blocks are found by their place in the UNet (level and position, with two ResNets per level as
every published SD UNet has), so the demo model's blocks carry the numbers of SD 1.x's at the same
place. The named presets are the extension's, documented for the 17-weight form; ALL, NONE and
ALL0.5 fit every family.
"""

from __future__ import annotations

import math
import re

from sdlora.errors import ConfigError
from sdlora.library.formats.adapter import Adapter, LoraLayer
from sdlora.library.formats.names import UNET, UNetBlocks, to_ldm
from sdlora.models.families import family_named, is_family_name

MAX_BLOCK_WEIGHT = 10.0  # the extension's sliders go to ±1; a few times that is still a deliberate choice


def _numbered(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02}" for i in range(count))


UNET_ALL = ("BASE", *_numbered("IN", 12), "M00", *_numbered("OUT", 12))
SD_LORA = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *_numbered("OUT", 12)[3:])
SDXL_LORA = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *_numbered("OUT", 6))
SDXL_ALL = ("BASE", *_numbered("IN", 9), "M00", *_numbered("OUT", 9))
FLUX_ALL = ("CLIP", "T5", "IN", *_numbered("D", 19), *_numbered("S", 38), "OUT")
SD3_MEDIUM = ("TE", "IN", *_numbered("J", 24), "OUT")
SD3_LARGE = ("TE", "IN", *_numbered("J", 38), "OUT")

# convention (a family's `block_weights`) -> the lists it takes, the usual first
CONVENTIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    "sd-unet": (SD_LORA, UNET_ALL),
    "sdxl-unet": (SDXL_LORA, SDXL_ALL),
    "mmdit-joint": (SD3_MEDIUM, SD3_LARGE),
    "flux-double-single": (FLUX_ALL,),
}
EXTENSION_PRESETS = "sd-unet"  # the extension's named presets are over SD 1.x/2.x's 17 blocks
BY_LENGTH = {len(names): names for lists in CONVENTIONS.values() for names in lists}  # lengths differ

# The extension's default presets, each over the 17 blocks of SD_LORA.
PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0,) * 17,
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND": (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "INALL": (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "ALL0.5": (0.5,) * 17,
}
UNIFORM = {"NONE": 0.0, "ALL": 1.0, "ALL0.5": 0.5}  # the presets that mean the same on every family
_BLOCK = re.compile(r"(?:^|\.)(single_transformer_blocks|transformer_blocks)\.(\d+)\.")


def _family_words(family: str) -> str:
    return family_named(family).words if is_family_name(family) else family


def parse_block_weights(text: str, family: str) -> tuple[float, ...]:
    """A preset name or a comma-separated list as one weight per block of `family`'s convention."""
    convention = _convention(family)
    lists = CONVENTIONS[convention]
    text = str(text).strip()
    items = [item.strip() for item in text.split(",")]
    if len(items) == 1 and not _is_number(items[0]):
        return _preset(items[0], family, convention)
    counts = " or ".join(str(len(names)) for names in lists)
    if len(items) not in {len(names) for names in lists}:
        raise ConfigError(
            f"block weights {_shown(text)}: {len(items)} weights, but {_family_words(family)} takes {counts} "
            f"({', '.join(lists[0])})"
        )
    weights = []
    for item in items:
        if not _is_number(item):
            raise ConfigError(f"block weights {_shown(text)}: {item!r} is not a number")
        value = float(item)
        if not (math.isfinite(value) and abs(value) <= MAX_BLOCK_WEIGHT):
            raise ConfigError(f"block weights {_shown(text)}: {item} is not between ±{MAX_BLOCK_WEIGHT:g}")
        weights.append(value)
    return tuple(weights)


def block_weights_key(text: str) -> str:
    """The same block weights written one way (presets in capitals, numbers as %g): equal keys, equal mixes."""
    items = [item.strip() for item in str(text).split(",")]
    if len(items) == 1 and not _is_number(items[0]):
        return items[0].upper()
    return ",".join(f"{float(item):g}" if _is_number(item) else item for item in items)


def _convention(family: str) -> str:
    """The family's block-weight convention; files of no known family are read as SD 1.x's."""
    return family_named(family).block_weights if is_family_name(family) else EXTENSION_PRESETS


def _preset(name: str, family: str, convention: str) -> tuple[float, ...]:
    names = CONVENTIONS[convention][0]
    key = name.upper()
    if key in UNIFORM:
        return (UNIFORM[key],) * len(names)
    if key not in PRESETS:
        raise ConfigError(
            f"unknown block-weight preset {_shown(name)}; the presets are {', '.join(PRESETS)}, "
            f"or give {len(names)} weights separated by commas"
        )
    if convention != EXTENSION_PRESETS:
        raise ConfigError(
            f"block-weight preset {key} is defined for the 17 blocks of SD 1.x/2.x; for "
            f"{_family_words(family)} give {len(names)} weights ({', '.join(names)})"
        )
    return tuple(float(w) for w in PRESETS[key])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def block_of(key: str, names: tuple[str, ...]) -> str | None:
    """The block a layer (`<part>.<module path>`) is in, in the convention of `names`; None: outside all."""
    part, path = key.split(".", 1)
    if part.startswith("text_encoder"):
        if "CLIP" in names:  # Flux.1: CLIP is text_encoder, T5 text_encoder_2
            return "T5" if part == "text_encoder_2" else "CLIP"
        return "TE" if "TE" in names else "BASE"
    if part == UNET:
        ldm = to_ldm(path, UNetBlocks())  # numbered as SD's UNet, two ResNets per level
        if ldm is None:
            return None
        where, _, rest = ldm.partition(".")
        number = rest.split(".", 1)[0]
        if where == "input_blocks":
            return f"IN{int(number):02}"
        if where == "output_blocks":
            return f"OUT{int(number):02}"
        return "M00" if where == "middle_block" else None
    match = _BLOCK.search("." + path)
    if match:
        letter = "S" if match.group(1).startswith("single") else ("D" if "D00" in names else "J")
        return f"{letter}{int(match.group(2)):02}"
    return "OUT" if path.startswith(("norm_out", "proj_out")) else "IN"


def apply_block_weights(adapter: Adapter, weights: tuple[float, ...]) -> Adapter:
    """A copy of `adapter` with each block's layers scaled by its weight; layers at weight 0 are left out."""
    names = BY_LENGTH.get(len(weights))
    if names is None:
        counts = ", ".join(str(n) for n in sorted(BY_LENGTH))
        raise ConfigError(f"{len(weights)} block weights fit no convention; the counts are {counts}")
    weight_of = dict(zip(names, weights, strict=True))
    layers = {}
    for key, layer in adapter.layers.items():
        block = block_of(key, names)
        if block is not None and block not in weight_of and block[0] in "DSJ":
            raise ConfigError(
                f"layer {key} is in block {block}, which the {len(weights)} block weights do not reach"
            )
        weight = 1.0 if block is None else weight_of.get(block, 0.0)
        if weight != 0:
            layers[key] = layer if weight == 1 else LoraLayer(layer.down, layer.up * weight, layer.alpha)
    metadata = dict(adapter.metadata)
    metadata["sdlora.block_weights"] = ",".join(f"{w:g}" for w in weights)
    return Adapter(layers, metadata, adapter.source_format)


def save_with_block_weights(library, name: str, text: str, new_name: str):
    """Save library adapter `name` with block weights `text` applied as the new adapter `new_name`."""
    from sdlora.library.formats import read_adapter
    from sdlora.library.formats.write import family_of

    library.refuse_reserved(new_name)
    if library.path_of(new_name).exists():
        raise ConfigError(f"an adapter named {new_name!r} already exists; pick another name")
    info = library.get(name)
    adapter = read_adapter(info.path, library.layout_for_export(info))  # LyCORIS: shaped as the base's layers
    family = library.reference.family if library.reference is not None else family_of(adapter)
    weighted = apply_block_weights(adapter, parse_block_weights(text, family))
    if not weighted.layers:
        raise ConfigError(f"block weights {_shown(text)} leave no layer of {name!r} (every block at 0)")
    return library.add(weighted, new_name)
