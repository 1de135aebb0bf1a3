"""Uploaded concept images -> one folder of images and .txt captions, with .zip files unpacked safely.

No gradio here: the web app hands over plain file paths. A .zip may not write outside the
folder, hide links, or expand past the size limits, however its header lies.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sdlora.errors import ConceptImagesError
from sdlora.training.data import CAPTION_EXTENSION, IMAGE_EXTENSIONS

MAX_FILES = 2000
MAX_FILE_BYTES = 64 * 2**20
MAX_TOTAL_BYTES = 1024 * 2**20
_CHUNK = 2**20


@dataclass(frozen=True)
class UploadLimits:
    """How much an upload may hold once unpacked."""

    max_files: int = MAX_FILES
    max_file_bytes: int = MAX_FILE_BYTES
    max_total_bytes: int = MAX_TOTAL_BYTES


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def collect_uploads(files: list[str], folder: Path, limits: UploadLimits = UploadLimits()) -> list[Path]:
    """Copy uploaded files into `folder` (unpacking .zip files); returns the images, sorted by name."""
    folder.mkdir(parents=True, exist_ok=True)
    budget = _Budget(limits)
    for source in map(Path, files or ()):
        if source.suffix.lower() == ".zip":
            _unpack_zip(source, folder, budget)
        elif is_image(source) or source.suffix.lower() == CAPTION_EXTENSION:
            budget.add(source.stat().st_size, source.name)
            shutil.copyfile(source, _free_name(folder, source.name))
    return sorted((p for p in folder.iterdir() if is_image(p)), key=lambda p: p.name.lower())


def read_captions(images: list[Path]) -> list[str]:
    """Each image's same-name .txt caption, or '' where it has none (Windows-1252 files read as training reads them)."""
    from sdlora.training.data import ImageProblem, read_caption

    out = []
    for image in images:
        try:
            out.append(read_caption(image)[0] or "")
        except ImageProblem:
            out.append("")
    return out


def write_captions(images: list[Path], captions: dict[str, str]) -> None:
    """Write the edited captions beside the images; an empty caption means 'use the template'."""
    for image in images:
        text = " ".join(str(captions.get(image.name, "") or "").split())
        path = image.with_suffix(CAPTION_EXTENSION)
        if text:
            path.write_text(text + "\n", encoding="utf-8")
        else:
            path.unlink(missing_ok=True)


class _Budget:
    def __init__(self, limits: UploadLimits) -> None:
        self.limits, self.files, self.bytes = limits, 0, 0

    def add(self, size: int, name: str) -> None:
        self.files += 1
        self.bytes += size
        if self.files > self.limits.max_files:
            raise ConceptImagesError(
                f"too many files: at most {self.limits.max_files} concept files per upload"
            )
        if size > self.limits.max_file_bytes:
            raise ConceptImagesError(f"{name} is larger than {self.limits.max_file_bytes // 2**20} MB")
        if self.bytes > self.limits.max_total_bytes:
            raise ConceptImagesError(
                f"the upload unpacks to more than {self.limits.max_total_bytes // 2**20} MB"
            )


def _unpack_zip(archive: Path, folder: Path, budget: _Budget) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                name = _safe_member_name(info, archive.name)
                if name is None:
                    continue
                budget.add(info.file_size, name)
                _copy_member(zf, info, _free_name(folder, name), budget)
    except zipfile.BadZipFile:
        raise ConceptImagesError(f"{archive.name} is not a readable .zip file") from None


def _safe_member_name(info: zipfile.ZipInfo, archive: str) -> str | None:
    """The flat file name to extract a member as, None to skip it; refuses escapes and links."""
    path = PurePosixPath(info.filename.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or ":" in info.filename:
        raise ConceptImagesError(f"{archive} holds an unsafe path {info.filename!r}; it was not unpacked")
    is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
    if info.is_dir() or is_link or any(part.startswith((".", "__MACOSX")) for part in path.parts):
        return None
    if not (is_image(path.name) or path.suffix.lower() == CAPTION_EXTENSION):
        return None
    return path.name


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: _Budget) -> None:
    """Copy in chunks and count real bytes, since a member's declared size can lie."""
    written = 0
    with zf.open(info) as src, open(target, "wb") as dst:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > info.file_size or written > budget.limits.max_file_bytes:
                dst.close()
                target.unlink(missing_ok=True)
                raise ConceptImagesError(
                    f"{info.filename} unpacks to more than it declares or allows; the .zip was not unpacked"
                )
            dst.write(chunk)


def _free_name(folder: Path, name: str) -> Path:
    """`name` in `folder`, with -1, -2 ... added when two uploads share a name (captions follow their image)."""
    target = folder / name
    stem, suffix = target.stem, target.suffix
    n = 0
    while target.exists():
        n += 1
        target = folder / f"{stem}-{n}{suffix}"
    return target
