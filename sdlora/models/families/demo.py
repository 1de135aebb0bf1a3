"""The embedded demo model (assets/demo-model): SD 1.x's layout at 64 px, trained and stored as SD 1.x.

What differs is only how it is known and what it is trained with: its folder carries the
builder's record (the marker), and a run on it takes the demo preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdlora.models.families.sd1 import SD1, SD1Family

MARKER = "sdlora_demo.json"  # the demo builder's record, kept beside the weights
PRESET = "Demo"  # the preset every run on it takes (sdlora.training.presets)


@dataclass(frozen=True)
class DemoFamily(SD1Family):
    """SD 1.x in everything a file or a training step sees; known by the marker in its folder."""

    marker: str = MARKER
    preset: str = PRESET

    def marks(self, folder: str | Path) -> bool:
        """True for a diffusers folder that holds the demo builder's record, wherever it lives."""
        try:
            path = Path(folder).expanduser()
            return (path / self.marker).is_file() and (path / "model_index.json").is_file()
        except OSError:
            return False


DEMO = DemoFamily(**vars(SD1) | {"words": "the demo model (SD 1.x layout)"})
