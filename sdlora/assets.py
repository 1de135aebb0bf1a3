"""Where the packaged assets live: the demo model, its example concepts and regularisation images.

Paths are resolved from this file, not from the working folder, so `python -m sdlora` run from
anywhere finds the same demo model as `app.py`. Imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_MODEL = ASSETS / "demo-model"  # the embedded 64-px text-to-image model, the default base model
EXAMPLE_CONCEPTS = ASSETS / "concepts"  # one folder of images and captions per example concept
REGULARIZATION = ASSETS / "regularization"  # the demo model's own scenes, trained beside a concept
DEMO_MARKER = "sdlora_demo.json"  # the demo builder's record, kept beside the weights


def is_demo_model(base_model: str | Path) -> bool:
    """True for the embedded demo model wherever it lives: its folder carries the builder's record."""
    try:
        folder = Path(base_model).expanduser()
        return (folder / DEMO_MARKER).is_file() and (folder / "model_index.json").is_file()
    except (OSError, ValueError):
        return False
