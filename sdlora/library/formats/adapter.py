"""The one in-memory form of an adapter, whatever file it came from, and the model it must fit.

Every layer is a plain LoRA: ΔW = (alpha/r)·up·down. LyCORIS LoHa and LoKr updates are
rewritten into that form exactly (see `lycoris.py`), so generation, export and the checks
below only ever see down, up and alpha.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sdlora.library.formats.names import (
    PARTS,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    UNetBlocks,
    canonical_text_path,
)

if TYPE_CHECKING:  # the layer types load with the first tensor, not with the library listing
    import torch


def alpha_or_rank(alpha: float | None, rank: int) -> float:
    """kohya and LyCORIS: a layer without alpha (or with 0) has alpha = rank, a scale of 1."""
    return float(alpha) if alpha else float(rank)


@dataclass
class LoraLayer:
    """One adapted layer: down (r, in[, kh, kw]), up (out, r[, 1, 1]) and its true alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """(alpha/r)·up·down, shaped like the layer's weight: what the adapter adds at weight 1."""
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)
        return (self.scale * product).reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass
class Adapter:
    """Layers keyed `<part>.<module path>` in diffusers/transformers names, and the file's metadata."""

    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "sdlora"  # what the file was, in words ("kohya LoRA", "LyCORIS LoHa", ...)

    def parts(self) -> list[str]:
        return [part for part in PARTS if any(key.startswith(part + ".") for key in self.layers)]

    def in_part(self, part: str) -> dict[str, LoraLayer]:
        """This part's layers, keyed by module path alone."""
        prefix = part + "."
        return {key[len(prefix) :]: layer for key, layer in self.layers.items() if key.startswith(prefix)}

    @classmethod
    def from_peft(
        cls,
        state: dict[str, torch.Tensor],
        alpha: float,
        part: str = UNET,
        metadata: dict[str, str] | None = None,
    ) -> Adapter:
        """peft's state dict of one model part (`<path>.lora_A.weight`, ...) at one alpha."""
        layers = {}
        for key, down in state.items():
            if ".lora_A." not in key:
                continue
            path = key.split(".lora_A.")[0]
            up = state[key.replace(".lora_A.", ".lora_B.")]
            if part.startswith("text_encoder"):  # the transformer of SD3/Flux keeps its own paths
                path = canonical_text_path(path)
            layers[f"{part}.{path}"] = LoraLayer(down, up, float(alpha))
        return cls(layers, dict(metadata or {}))


@dataclass(frozen=True)
class ModelLayout:
    """What an adapter must fit: the base model's family and each adaptable layer's weight shape."""

    family: str  # the base model family's stored name (sdlora.models.families)
    shapes: dict[str, tuple[int, ...]]  # "<part>.<module path>" -> weight shape (out, in[, kh, kw])
    blocks: UNetBlocks | None = None

    @classmethod
    def of(cls, pipeline, family: str) -> ModelLayout:
        """The layout of a loaded pipeline (or one built on the meta device)."""
        if getattr(pipeline, "unet", None) is None:  # SD3.5, Flux.1: the transformer and CLIP encoders
            from sdlora.library.formats.transformer_write import transformer_layout

            return transformer_layout(pipeline, family)
        shapes: dict[str, tuple[int, ...]] = {}
        for part in (UNET, TEXT_ENCODER, TEXT_ENCODER_2):
            model = getattr(pipeline, part, None)
            if model is None:
                continue
            for path, shape in layer_shapes(model).items():
                shapes[f"{part}.{path if part == UNET else canonical_text_path(path)}"] = shape
        return cls(family, shapes, UNetBlocks.of(pipeline.unet.config))


def layer_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight shape of every Linear and Conv2d, by module path (peft wrappers see through to the base)."""
    import torch

    shapes = {}
    for name, module in model.named_modules():
        if {"base_layer", "lora_A", "lora_B"} & set(name.split(".")):
            continue  # the insides of a peft wrapper; the wrapper itself stands for the layer
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear):
            shapes[name] = (base.out_features, base.in_features)
        elif isinstance(base, torch.nn.Conv2d):
            shapes[name] = (base.out_channels, base.in_channels // base.groups, *base.kernel_size)
    return shapes
