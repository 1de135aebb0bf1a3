"""Model families: one file per kind of base model saying everything that differs between them.

`FAMILIES` lists them in the order they are recognised (the most particular first; SD 1.x is
the catch-all for text-conditioned UNets). The engine asks a family, never tests a name.

To add a family: write `<name>.py` with a `Family` subclass and its instance
(recognition from the denoiser's config, words, kohya/modelspec ids, pipeline class, the
denoiser attribute, kohya text prefixes, caption encoding, the objective and denoiser call,
the estimate's numbers), add it to `FAMILIES` below at its place in the order, and add its
tests to tests/test_families.py (recognised from its configs; a short run on a tiny model).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sdlora.errors import ModelLoadError
from sdlora.models.families.base import Family, Noised, Objective
from sdlora.models.families.demo import DEMO
from sdlora.models.families.flux import FLUX
from sdlora.models.families.sd1 import SD1
from sdlora.models.families.sd2 import SD2
from sdlora.models.families.sd3 import SD3
from sdlora.models.families.sdxl import SDXL

FAMILIES: tuple[Family, ...] = (FLUX, SD3, SDXL, SD2, SD1)  # recognition order
DEFAULT = SD1  # what a file that names no family is taken for (kohya's default too)

__all__ = [
    "DEFAULT",
    "DEMO",
    "FAMILIES",
    "Family",
    "Noised",
    "Objective",
    "family_claimed_by",
    "family_for_parts",
    "family_named",
    "family_of",
    "family_of_folder",
    "family_of_pipeline",
    "family_of_single_file",
    "is_family_name",
    "pipeline_classes",
]


def family_named(name: str) -> Family:
    """The family stored under `name` ("sd1", ...) in adapter headers and model info."""
    for family in FAMILIES:
        if family.name == name:
            return family
    known = ", ".join(f.name for f in FAMILIES)
    raise ModelLoadError(f"unknown model family {name!r}; sdlora knows {known}")


def is_family_name(name: Any) -> bool:
    """Whether `name` is a stored family name."""
    return any(family.name == name for family in FAMILIES)


def family_of(denoiser_config: dict, where: str = "the base model") -> Family:
    """The family whose denoiser has this config (a loaded model's or its config.json)."""
    for family in FAMILIES:
        if family.recognises(denoiser_config):
            return family
    kind = denoiser_config.get("_class_name") or "unknown"
    words = [f.words for f in reversed(FAMILIES)]
    raise ModelLoadError(
        f"{where}'s denoiser ({kind}) is not one sdlora can train; it trains "
        f"{', '.join(words[:-1])} and {words[-1]} models"
    )


def family_of_pipeline(pipeline: Any) -> Family:
    """The family of a loaded diffusers pipeline, from its denoiser's own config."""
    for attribute in dict.fromkeys(f.denoiser for f in FAMILIES):
        denoiser = getattr(pipeline, attribute, None)
        if denoiser is not None:
            return family_of(dict(denoiser.config), f"the {type(pipeline).__name__}")
    raise ModelLoadError(f"the {type(pipeline).__name__} has no denoiser sdlora can train")


def family_of_folder(folder: str | Path) -> Family | None:
    """The demo model by its marker; any other folder's family comes from its configs when loaded."""
    return DEMO if DEMO.marks(folder) else None


def family_of_single_file(kind: str) -> Family | None:
    """The family diffusers' single-file detection names `kind` ("v1", "xl_base", ...), if any."""
    return next((f for f in FAMILIES if f.single_file_kind == kind), None)


def family_claimed_by(metadata: dict[str, str]) -> Family | None:
    """The family an adapter's header names: sdlora's own key, else kohya's or modelspec's id."""
    if is_family_name(metadata.get("sdlora.family")):
        return family_named(metadata["sdlora.family"])
    return next((f for f in FAMILIES if f.claimed_by(metadata)), None)


def family_for_parts(parts: Iterable[str]) -> Family:
    """The family an adapter's parts fit (its denoiser and text encoders): the default when it fits,
    else the first that does."""
    parts = set(parts)
    denoisers = {f.denoiser for f in FAMILIES}
    text_parts = parts - denoisers
    for family in (DEFAULT, *FAMILIES):
        if parts & denoisers <= {family.denoiser} and text_parts <= set(family.kohya_text_prefixes):
            return family
    return DEFAULT


def pipeline_classes() -> tuple[str, ...]:
    """The diffusers pipeline classes sdlora loads, in family order."""
    return tuple(dict.fromkeys(c for f in FAMILIES for c in f.pipeline_classes))
