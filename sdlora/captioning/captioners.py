"""Which captioners sdlora knows, which of them this machine can run, and loading one by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdlora.assets import is_demo_model
from sdlora.errors import ConfigError

if TYPE_CHECKING:
    from sdlora.captioning.captions import Captioner


@dataclass(frozen=True)
class CaptionerSpec:
    """A captioner a user can name: where its weights come from and what it writes."""

    name: str
    source: str  # hub id or local folder of its weights; "" when it needs none
    writes: str  # the caption style, in a few words, for the Settings tab and --help
    seconds_per_image: float  # on this project's 2-core CPU, for the estimate (docs/benchmarks.md)
    model_class: str = ""  # the transformers class that loads its weights; "" for a built-in captioner
    model_type: str = ""  # the model_type its config.json must name, so a wrong folder is refused by name
    task_prompt: str = ""  # what the model is asked, for models that take a task (Florence-2)


DEMO = CaptionerSpec("demo", "", "the demo model's own words: 'a red star on a white background'", 0.02)
# Florence-2 comes first: its detailed caption names subject, setting and style in a sentence or
# two, which is what a LoRA caption needs; BLIP writes one short line ("a woman sitting on a bench").
# <DETAILED_CAPTION> rather than <MORE_DETAILED_CAPTION>: the latter writes a paragraph that runs
# past the 77 tokens CLIP reads, so its end never reaches training.
# seconds_per_image of both is a rough guess, not a measurement: their weights cannot be
# downloaded on this machine (about 0.5-0.8 B parameters, ~30 generated tokens on 2 CPU cores).
FLORENCE_2 = CaptionerSpec(
    "florence-2",
    "florence-community/Florence-2-large",
    "one or two descriptive sentences (Florence-2 large, detailed caption)",
    10.0,
    "Florence2ForConditionalGeneration",
    "florence2",
    "<DETAILED_CAPTION>",
)
BLIP = CaptionerSpec(
    "blip",
    "Salesforce/blip-image-captioning-large",
    "one short line (BLIP large): 'a red car parked on a street'",
    4.0,
    "BlipForConditionalGeneration",
    "blip",
)
CAPTIONERS: dict[str, CaptionerSpec] = {spec.name: spec for spec in (DEMO, FLORENCE_2, BLIP)}
# Not offered: booru-style taggers (WD14) run on onnxruntime, which sdlora does not depend on.
NOT_OFFERED = "WD14 (booru-style tags): needs onnxruntime, which sdlora does not depend on"


def captioner_names() -> list[str]:
    return list(CAPTIONERS)


def spec_of(name: str) -> CaptionerSpec:
    """The named captioner's spec; an unknown name is refused with the known ones listed."""
    if name not in CAPTIONERS:
        raise ConfigError(f"unknown captioner {name!r}; choose one of {', '.join(CAPTIONERS)}")
    return CAPTIONERS[name]


def is_present(spec: CaptionerSpec, source: str | None = None) -> bool:
    """True when the captioner can run here without a download: built in, a local folder, or in the hub cache."""
    source = spec.source if source is None else str(source).strip()
    if not spec.model_class:
        return True
    if Path(source).expanduser().is_dir():
        return (Path(source).expanduser() / "config.json").is_file()
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(source, "config.json"), str)  # a path when cached
    except HFValidationError:
        return False


def default_captioner(base_model: str) -> str:
    """The demo captioner for the demo model; otherwise the first captioner present here."""
    if is_demo_model(base_model):
        return DEMO.name
    present = [spec.name for spec in CAPTIONERS.values() if spec is not DEMO and is_present(spec)]
    return present[0] if present else next((name for name in CAPTIONERS if name != DEMO.name), DEMO.name)


def captioner_of_folder(folder: str) -> str:
    """The captioner whose kind of model a local folder holds (read from its config.json)."""
    import json

    try:
        model_type = json.loads((Path(folder).expanduser() / "config.json").read_text()).get("model_type", "")
    except (OSError, json.JSONDecodeError):
        model_type = ""
    for spec in CAPTIONERS.values():
        if spec.model_type and spec.model_type == model_type:
            return spec.name
    raise ConfigError(
        f"{folder} is not a folder of a captioner sdlora knows ({model_type or 'no readable config.json'}); "
        "name the captioner with --captioner"
    )


def load_captioner(name: str, device: str | None = None, source: str | None = None) -> Captioner:
    """A ready captioner by name (weights loaded on `device`, default: the GPU when there is one).

    `source` replaces the spec's weights with another hub id or a local folder of the same kind.
    """
    spec = spec_of(name)
    if spec is DEMO:
        from sdlora.demo.captioner import DemoCaptioner

        return DemoCaptioner()
    from sdlora.captioning.captioners_hf import load_transformers_captioner

    return load_transformers_captioner(spec, (source or spec.source).strip(), device)
