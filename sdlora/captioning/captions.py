"""Captions written for the user: a captioner describes concept images, sdlora finishes and saves the words.

A captioner is anything with a `name` and `caption(images) -> one string per image`; it only sees
decoded RGB images. Everything a user controls (the trigger word first, fill only empty captions or
overwrite, a word limit, words to drop) happens here, the same for every captioner, so the demo
captioner and BLIP honour the same options. Files are written atomically beside their images and an
existing caption is never touched unless overwriting was asked for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image

from sdlora.events import StopFlag
from sdlora.library.formats.files import atomic_write_text
from sdlora.training.data import (
    CAPTION_EXTENSION,
    IMAGE_EXTENSIONS,
    FileProblem,
    ImageProblem,
    normalise_image,
    open_image,
    read_caption,
)


def _help(default, text: str):
    """A field whose help text the CLI shows (sdlora.config.field_help reads it)."""
    return field(default=default, metadata={"help": text})


class Captioner(Protocol):
    """Images in, one caption each out (in order); batching and devices are the captioner's business."""

    name: str

    def caption(self, images: list[Image.Image]) -> list[str]: ...


@dataclass(frozen=True)
class CaptionOptions:
    """What the user asks of the captions, whichever captioner writes them."""

    prefix: str = _help("", "put first, as kohya users write the trigger word: 'sks, a red star ...'")
    overwrite: bool = _help(False, "replace every caption (default: fill only images without one)")
    max_words: int = _help(0, "cut longer captions after this many words (0: no limit)")
    drop_words: tuple[str, ...] = _help(
        (), "whole words to remove, e.g. the class word the trigger should carry"
    )
    batch_size: int = _help(8, "images per captioner call")


@dataclass(frozen=True)
class Captioned:
    """Progress: one more image has its caption."""

    path: Path
    caption: str
    done: int
    total: int


@dataclass
class CaptionResult:
    """New captions by image, images that kept theirs, and files that could not be read."""

    captions: dict[Path, str] = field(default_factory=dict)
    kept: list[Path] = field(default_factory=list)
    problems: list[FileProblem] = field(default_factory=list)
    stopped: bool = False

    def summary(self) -> str:
        """One line for the UI and the CLI: counts, and every unreadable file by name."""
        parts = [f"captioned {len(self.captions)} image{'s' * (len(self.captions) != 1)}"]
        if self.kept:
            parts.append(f"kept {len(self.kept)} existing caption{'s' * (len(self.kept) != 1)}")
        if self.stopped:
            parts.append("stopped before the end")
        line = ", ".join(parts)
        if self.problems:
            line += "; could not read " + "; ".join(str(p) for p in self.problems)
        return line


def finish_caption(raw: str, options: CaptionOptions) -> str:
    """A captioner's words as the user asked for them: words dropped, length cut, prefix first."""
    words = " ".join(str(raw).split())
    for word in options.drop_words:
        if word.strip():
            words = re.sub(rf"(?i)\b{re.escape(word.strip())}\b", "", words)
    # Dropping a word can leave "a  on" or ", ,": tidy the spacing and stray commas it leaves.
    words = re.sub(r"\s+([,.;])", r"\1", " ".join(words.split())).strip(" ,;")
    if options.max_words > 0:
        words = " ".join(words.split()[: options.max_words]).rstrip(",;")
    prefix = options.prefix.strip()
    if prefix and not words.lower().startswith(prefix.lower()):
        words = f"{prefix}, {words}" if words else prefix
    return words


def caption_images(
    captioner: Captioner,
    images: Iterable[str | Path],
    options: CaptionOptions = CaptionOptions(),
    existing: Mapping[Path, str | None] | None = None,
    on_caption: Callable[[Captioned], None] | None = None,
    stop: StopFlag | None = None,
) -> CaptionResult:
    """Caption the images that need it; `existing` gives current captions (default: their .txt files).

    An image that cannot be opened is reported by name and the rest are captioned; the stop
    flag is honoured between batches, keeping what was captioned so far.
    """
    paths = [Path(p) for p in images if Path(p).suffix.lower() in IMAGE_EXTENSIONS]
    result = CaptionResult()
    todo = []
    for path in paths:
        current = existing.get(path) if existing is not None else _caption_on_disk(path, result)
        if current and str(current).strip() and not options.overwrite:
            result.kept.append(path)
        else:
            todo.append(path)
    batch: list[tuple[Path, Image.Image]] = []
    done = 0
    for index, path in enumerate(todo):
        try:
            batch.append((path, normalise_image(open_image(path))))
        except ImageProblem as exc:
            result.problems.append(FileProblem(path, str(exc)))
        if len(batch) == max(1, options.batch_size) or (index == len(todo) - 1 and batch):
            if stop is not None and stop.requested:
                result.stopped = True
                break
            texts = captioner.caption([image for _, image in batch])
            for (image_path, _), text in zip(batch, texts, strict=True):
                result.captions[image_path] = finish_caption(text, options)
                done += 1
                if on_caption is not None:
                    on_caption(Captioned(image_path, result.captions[image_path], done, len(todo)))
            batch = []
    return result


def _caption_on_disk(path: Path, result: CaptionResult) -> str | None:
    try:
        return read_caption(path)[0]
    except ImageProblem:
        return None  # an unreadable caption file counts as none; writing replaces it


def write_caption_files(result: CaptionResult) -> list[Path]:
    """Write each new caption as the image's same-name .txt, atomically; returns the files written."""
    written = []
    for image, caption in result.captions.items():
        target = image.with_suffix(CAPTION_EXTENSION)
        atomic_write_text(target, caption + "\n")
        written.append(target)
    return written
