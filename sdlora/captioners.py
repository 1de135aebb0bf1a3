"""Which captioners sdlora knows, which of them this machine can run, and loading one by name."""

from __future__ import annotations

from dataclasses import dataclass

from sdlora.captions import Captioner
from sdlora.errors import ConfigError


@dataclass(frozen=True)
class CaptionerSpec:
    """A captioner a user can name: where its weights come from and what it writes."""

    name: str
    source: str  # hub id or local folder of its weights; "" when it needs none
    writes: str  # the caption style, in a few words, for the Settings tab and --help
    seconds_per_image: float  # on this project's 2-core CPU, for the estimate (docs/benchmarks.md)


DEMO = CaptionerSpec("demo", "", "the demo model's own words: 'a red star on a white background'", 0.02)
CAPTIONERS: dict[str, CaptionerSpec] = {DEMO.name: DEMO}


def captioner_names() -> list[str]:
    return list(CAPTIONERS)


def spec_of(name: str) -> CaptionerSpec:
    """The named captioner's spec; an unknown name is refused with the known ones listed."""
    if name not in CAPTIONERS:
        raise ConfigError(f"unknown captioner {name!r}; choose one of {', '.join(CAPTIONERS)}")
    return CAPTIONERS[name]


def is_present(spec: CaptionerSpec) -> bool:
    """True when the captioner can run here without a download."""
    return not spec.source


def default_captioner(base_model: str) -> str:
    """The demo captioner for the demo model; otherwise the first captioner present here."""
    from sdlora.presets import is_demo_model

    if is_demo_model(base_model):
        return DEMO.name
    present = [spec.name for spec in CAPTIONERS.values() if spec is not DEMO and is_present(spec)]
    return present[0] if present else next((name for name in CAPTIONERS if name != DEMO.name), DEMO.name)


def load_captioner(name: str, device: str | None = None) -> Captioner:
    """A ready captioner by name (weights loaded on `device`, default: the GPU when there is one)."""
    spec = spec_of(name)
    if spec is DEMO:
        from sdlora.demo.captioner import DemoCaptioner

        return DemoCaptioner()
    raise ConfigError(f"captioner {name!r} has no loader")  # every spec above has one; a new spec needs one
