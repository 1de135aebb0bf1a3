"""Generated images on disk: numbered PNGs that carry the parameters that made them (as A1111 writes them)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SavedImage:
    """A generated image on disk, with the parameters that made it."""

    path: Path
    parameters: str


class ImageFolder:
    """A folder of generated images, each saved under the next free number, safe across threads."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._count = 0
        self._lock = threading.Lock()

    def save(self, image, parameters: str) -> SavedImage:
        """Save a PIL image as the next PNG, its parameters in the PNG's "parameters" text chunk."""
        from PIL.PngImagePlugin import PngInfo

        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._count += 1
            path = self.folder / f"{self._count:05d}.png"
        info = PngInfo()
        info.add_text("parameters", parameters)
        image.save(path, pnginfo=info)
        return SavedImage(path, parameters)
