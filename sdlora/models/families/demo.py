"""The embedded demo model (assets/demo-model): SD 1.x's layout at 64 px, trained and stored as SD 1.x.

What differs is only how it is known and what it is trained with: its folder carries the
builder's record (the marker), and a run on it takes the demo preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdlora.assets import is_demo_model
from sdlora.models.families.sd1 import SD1, SD1Family

PRESET = "Demo"  # the preset every run on it takes (sdlora.training.presets)


@dataclass(frozen=True)
class DemoFamily(SD1Family):
    """SD 1.x in everything a file or a training step sees; known by the marker in its folder."""

    preset: str = PRESET

    def marks(self, folder: str | Path) -> bool:
        """True for a diffusers folder that holds the demo builder's record, wherever it lives."""
        return is_demo_model(folder)


DEMO = DemoFamily(**vars(SD1) | {"words": "the demo model (SD 1.x layout)"})
