"""Concept images and captions -> normalised RGB images at the training resolution.

Every file that cannot be used is reported by name with the reason, and the rest are
kept: one broken download should not cost a user the whole run.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from sdlora.config import DataConfig
from sdlora.errors import ConceptImagesError
from sdlora.training.buckets import Bucket, Placement, fit_to_bucket, make_buckets, square_bucket

if TYPE_CHECKING:  # numpy loads with the first 16-bit image or tensor, not with `python -m sdlora --help`
    import numpy as np

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_EXTENSION = ".txt"
# Pillow's own bomb limit is ~89 MP; concept images never need more than this, and a
# smaller cap keeps a hostile upload from taking gigabytes of memory.
MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class ConceptImage:
    """One training example: the normalised image and its final caption."""

    path: Path
    image: Image.Image  # at its bucket's size
    caption: str
    placement: Placement


@dataclass(frozen=True)
class FileProblem:
    """A file that was skipped, and why, in words a user can act on."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path.name}: {self.reason}"


@dataclass
class ConceptSet:
    """The usable images and the problems found while reading them."""

    images: list[ConceptImage] = field(default_factory=list)
    problems: list[FileProblem] = field(default_factory=list)
    notices: list[FileProblem] = field(
        default_factory=list
    )  # files used, with something the user should know


def training_buckets(config: DataConfig, step: int = 64) -> list[Bucket]:
    """The buckets images train in: aspect-ratio buckets of about resolution² pixels, or one square."""
    return make_buckets(config.resolution, step) if config.buckets else square_bucket(config.resolution)


def load_concept_images(
    config: DataConfig,
    files: Iterable[str | Path] | None = None,
    what: str = "concept images",
    bucket_step: int = 64,
) -> ConceptSet:
    """Read a folder (or an explicit list of files) of concept images with their captions.

    `bucket_step` is 8 latent pixels of the model that will train on them (64 px for SD).
    """
    paths = sorted(Path(p) for p in files) if files is not None else _list_folder(Path(config.images), what)
    buckets = training_buckets(config, bucket_step)
    result = ConceptSet()
    for path in paths:
        if path.suffix.lower() == CAPTION_EXTENSION or path.name.startswith("."):
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            result.problems.append(
                FileProblem(
                    path,
                    f"unsupported file type '{path.suffix or 'none'}'; "
                    f"use one of {', '.join(sorted(IMAGE_EXTENSIONS))}",
                )
            )
            continue
        try:
            image, placement = prepare_image(path, buckets)
            text, notice = read_caption(path)
            caption = make_caption(text, config.trigger_word, config.caption_template)
        except ImageProblem as exc:
            result.problems.append(FileProblem(path, str(exc)))
            continue
        result.images.append(ConceptImage(path, image, caption, placement))
        if notice:
            result.notices.append(FileProblem(path.with_suffix(CAPTION_EXTENSION), notice))
    if not result.images:
        details = "; ".join(str(p) for p in result.problems) or "the folder has no image files"
        raise ConceptImagesError(f"no usable {what} in {config.images or 'the given files'}: {details}")
    return result


def load_regularization_images(config: DataConfig, bucket_step: int = 64) -> ConceptSet | None:
    """The regularisation folder's images with their own captions (no trigger added), or None when unset."""
    if not config.regularization_images:
        return None
    reg_config = replace(config, images=config.regularization_images, trigger_word="", caption_template="")
    return load_concept_images(reg_config, what="regularisation images", bucket_step=bucket_step)


def bucket_labels(paths: Iterable[Path], config: DataConfig, bucket_step: int = 64) -> list[str]:
    """Each image's bucket ('832x1216') as training would choose it, or why it would be skipped."""
    buckets = training_buckets(config, bucket_step)
    labels = []
    for path in paths:
        try:
            labels.append(str(prepare_image(Path(path), buckets)[1].bucket))
        except ImageProblem as exc:
            labels.append(f"skipped: {exc}")
    return labels


def image_problem(path: Path) -> str | None:
    """Why training would skip this image file (unreadable, truncated, too large or too small), or None."""
    try:
        normalise_image(open_image(Path(path)))
    except ImageProblem as exc:
        return str(exc)
    return None


def bucket_counts(images: Iterable[ConceptImage]) -> dict[str, int]:
    """How many images each bucket holds, largest first: what the estimate and the first message list."""
    counts: dict[str, int] = {}
    for image in images:
        counts[str(image.placement.bucket)] = counts.get(str(image.placement.bucket), 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _list_folder(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise ConceptImagesError(f"{what} folder {folder} does not exist or is not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file())


class ImageProblem(Exception):
    """Internal: why one file was skipped."""


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, turning every failure into an ImageProblem."""
    saved_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animations: train on the first frame
            image.load()
            return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageProblem(
            f"image is too large (over {MAX_IMAGE_PIXELS // 1_000_000} megapixels); resize it first"
        ) from None
    except UnidentifiedImageError:
        raise ImageProblem("not a readable image (damaged, or not the format its name says)") from None
    except OSError as exc:
        text = str(exc)
        if "truncated" in text:
            raise ImageProblem("image file is truncated (incomplete download or copy?)") from None
        raise ImageProblem(f"cannot read image: {text}") from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise ImageProblem(f"damaged image: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is composited over white, 16-bit scaled to 8-bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def prepare_image(path: Path, buckets: list[Bucket]) -> tuple[Image.Image, Placement]:
    """One file as training sees it: decoded, upright, RGB, fitted to its bucket; ImageProblem if unusable."""
    return fit_to_bucket(normalise_image(open_image(path)), buckets)


def normalise_image(image: Image.Image) -> Image.Image:
    """EXIF orientation and RGB; bucketing then sizes and crops it."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not cost the image
        pass
    image = to_rgb(image)
    if min(image.size) < 8:
        raise ImageProblem(f"image is only {image.size[0]}x{image.size[1]} pixels")
    return image


def read_caption(image_path: Path) -> tuple[str | None, str | None]:
    """The same-name .txt caption (None when there is none) and a notice when it was not UTF-8.

    Captions written on Windows are often Windows-1252 ("café" as one byte é): they are read as
    such rather than dropping their image. Latin-1 decodes any byte, so nothing is refused.
    """
    caption_path = image_path.with_suffix(CAPTION_EXTENSION)
    if not caption_path.is_file():
        return None, None
    try:
        raw = caption_path.read_bytes()
    except OSError as exc:
        raise ImageProblem(f"caption {caption_path.name} cannot be read: {exc.strerror or exc}") from None
    notice = None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text, encoding = raw.decode("cp1252"), "Windows-1252 (Latin-1)"
        except UnicodeDecodeError:
            text, encoding = raw.decode("latin-1"), "Latin-1"
        notice = f"not UTF-8; read as {encoding}: {_short(' '.join(text.split()))!r}"
    return " ".join(text.split()) or None, notice


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def make_caption(caption: str | None, trigger_word: str, template: str) -> str:
    """Final caption: the file's text with the trigger word ensured, or the template."""
    if caption is None:
        return " ".join(template.replace("{trigger}", trigger_word).split())
    if trigger_word and trigger_word.lower() not in caption.lower():
        return f"{trigger_word}, {caption}"
    return caption


def image_to_tensor_array(image: Image.Image) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32 in [-1, 1], as the VAE expects."""
    import numpy as np

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """Comma-separated tag counts, as kohya records them in ss_tag_frequency."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in (t.strip() for t in caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
