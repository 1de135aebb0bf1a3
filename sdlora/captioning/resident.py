"""The captioner a server keeps loaded for its base model, as it keeps the base model itself."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from sdlora.captioning.captioners import default_captioner, load_captioner


class ResidentCaptioner:
    """The base model's default captioner (the demo one for the demo model), loaded on first use and kept."""

    def __init__(self, base_model: Callable[[], str]) -> None:
        self._base_model = base_model  # asked each time: the server's base model may be switched
        self._captioner = None
        self._lock = threading.Lock()

    def name(self) -> str:
        """The captioner "Caption images" uses: the demo one for the demo model, else the first one present."""
        return default_captioner(self._base_model())

    def caption(self, images: list[Path], captions: dict[str, str], options=None, on_caption=None):
        """sdlora.captioning.captions.CaptionResult for the images, keeping the captions typed so far (by file name).

        Nothing is written to disk: the caption table is what trains.
        """
        from sdlora.captioning.captions import CaptionOptions, caption_images

        name = self.name()
        with self._lock:
            if self._captioner is None or self._captioner.name != name:
                self._captioner = load_captioner(name)
            captioner = self._captioner
        existing = {Path(p): captions.get(Path(p).name, "") for p in images}
        return caption_images(
            captioner, list(existing), options or CaptionOptions(), existing=existing, on_caption=on_caption
        )
