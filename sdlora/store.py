"""The adapter library on disk: one flat folder, laid out like AUTOMATIC1111's models/Lora.

    <root>/<name>.safetensors    the adapter, user metadata in its header (ss_*, modelspec.*)
    <root>/<name>.preview.png    its preview image
    <root>/<name>.config.json    the config that trained it (adapters trained here)
    <root>/.runs/<name>/         checkpoints and previews of its training run
    <root>/.exports/<format>/    downloads, each named after its adapter

A damaged entry is reported and skipped; it never breaks the listing. Nothing is ever
overwritten silently, and no name can reach outside the folder.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from sdlora.errors import AdapterFormatError, SdloraError
from sdlora.formats import atomic_write
from sdlora.lora_files import check_fits, check_header, read_lora, write_lora

SUFFIX = ".safetensors"
SIDE_FILES = (".preview.png", ".config.json")
USER_FIELDS = {"title": "modelspec.title", "author": "modelspec.author", "description": "modelspec.description",
               "license": "modelspec.license", "tags": "modelspec.tags", "trigger_words": "modelspec.trigger_phrase"}
FAMILIES = {"sd_v1": "sd1", "sd_v2": "sd2", "stable-diffusion-v1": "sd1", "stable-diffusion-v2": "sd2"}


class AdapterNotFound(SdloraError):
    """No adapter of that name in the library."""


@dataclass(frozen=True)
class BaseReference:
    """What an adapter must fit: the base model's family and its UNet layer shapes."""

    family: str
    unet_shapes: dict[str, tuple[int, ...]]


def reference_from_pipeline(pipeline) -> BaseReference:
    """The family and UNet layer shapes that imported adapters must fit."""
    from sdlora.lora_files import unet_linear_shapes
    from sdlora.models import inspect_pipeline

    return BaseReference(inspect_pipeline(pipeline).family, unet_linear_shapes(pipeline.unet))


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    base_model: str
    family: str
    rank: int | None
    alpha: float | None
    steps: int | None
    trigger_words: tuple[str, ...]
    size_bytes: int
    modified: float
    preview: Path | None
    title: str = ""
    author: str = ""
    description: str = ""
    license: str = ""
    tags: tuple[str, ...] = ()


@dataclass
class Listing:
    adapters: list[AdapterInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def safe_name(wanted: str) -> str:
    """A plain file name from user text: no separators, no traversal, no leading dot."""
    name = re.sub(r"[\\/:*?\"<>|\x00-\x1f]+", "-", str(wanted)).strip().strip(".- ")
    name = re.sub(r"\s+", " ", name)[:100].rstrip(".- ")
    if name.lower().endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    if not name:
        raise SdloraError(f"{wanted!r} cannot be used as an adapter name")
    return name


def _split(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


class AdapterLibrary:
    """List, import, export, rename, delete and annotate the adapters in one folder."""

    def __init__(self, root: str | Path, reference: BaseReference | None = None) -> None:
        self.root = Path(root)
        self.reference = reference

    def path_of(self, name: str) -> Path:
        path = self.root / f"{safe_name(name)}{SUFFIX}"
        if path.resolve().parent != self.root.resolve():
            raise SdloraError(f"adapter name {name!r} would leave the library folder")
        return path

    def list(self) -> Listing:
        listing = Listing()
        if not self.root.is_dir():
            return listing
        for path in sorted(self.root.glob(f"*{SUFFIX}"), key=lambda p: p.name.lower()):
            try:
                listing.adapters.append(self._info(path))
            except SdloraError as exc:
                listing.problems.append(str(exc))
        return listing

    def get(self, name: str) -> AdapterInfo:
        path = self.path_of(name)
        if not path.is_file():
            known = ", ".join(a.name for a in self.list().adapters) or "none"
            raise AdapterNotFound(f"no adapter named {name!r} in {self.root} (known: {known})")
        return self._info(path)

    def _info(self, path: Path) -> AdapterInfo:
        header = check_header(path)
        meta = {k: str(v) for k, v in (header.get("__metadata__") or {}).items()}
        ranks = [info["shape"][0] for key, info in header.items()
                 if key != "__metadata__" and (".lora_A." in key or ".lora_down." in key)]
        if not ranks:
            raise AdapterFormatError(f"{path.name} is not a LoRA adapter")
        name = path.name[: -len(SUFFIX)]
        preview = path.with_name(f"{name}.preview.png")
        triggers = _split(meta.get("modelspec.trigger_phrase") or meta.get("sdlora.trigger_word", ""))
        stat = path.stat()
        return AdapterInfo(
            name=name, path=path, base_model=meta.get("sdlora.base_model") or meta.get("ss_sd_model_name", ""),
            family=meta.get("sdlora.family") or _family(meta), rank=max(ranks),
            alpha=_number(meta.get("sdlora.alpha") or meta.get("ss_network_alpha")),
            steps=_int(meta.get("sdlora.steps") or meta.get("ss_steps")), trigger_words=triggers,
            size_bytes=stat.st_size, modified=stat.st_mtime, preview=preview if preview.is_file() else None,
            title=meta.get("modelspec.title", ""), author=meta.get("modelspec.author", ""),
            description=meta.get("modelspec.description", ""), license=meta.get("modelspec.license", ""),
            tags=_split(meta.get("modelspec.tags", "")))

    def unique_name(self, wanted: str) -> str:
        base = safe_name(wanted)
        name, n = base, 2
        while self.path_of(name).exists():
            name, n = f"{base}-{n}", n + 1
        return name

    def import_file(self, source: str | Path, name: str | None = None) -> AdapterInfo:
        """Validate a diffusers or kohya file and copy it in; the library is unchanged on any error."""
        source = Path(source)
        weights = read_lora(source)
        if self.reference is not None:
            check_fits(weights, source.name, self.reference.unet_shapes, self.reference.family)
        target = self.path_of(self.unique_name(name or source.name))
        self.root.mkdir(parents=True, exist_ok=True)
        if weights.source_format == "kohya":
            shutil.copyfile(source, target)  # keep a foreign file byte for byte
        else:
            write_lora(weights, target, "diffusers")
        return self._info(target)

    def export(self, name: str, fmt: str = "diffusers", out_dir: str | Path | None = None) -> Path:
        """Write the adapter in 'diffusers' or 'kohya' format as <out_dir>/<name>.safetensors."""
        info = self.get(name)
        out = Path(out_dir) if out_dir else self.root / ".exports" / fmt
        return write_lora(read_lora(info.path), out / f"{info.name}{SUFFIX}", fmt)

    def rename(self, name: str, new_name: str) -> AdapterInfo:
        old, new = self.get(name).path, self.path_of(new_name)
        if new.exists():
            raise SdloraError(f"an adapter named {safe_name(new_name)!r} already exists; pick another name")
        for suffix in (SUFFIX, *SIDE_FILES):
            side = old.with_name(old.name[: -len(SUFFIX)] + suffix)
            if side.exists():
                side.rename(new.with_name(new.name[: -len(SUFFIX)] + suffix))
        return self._info(new)

    def delete(self, name: str) -> None:
        path = self.get(name).path
        stem = path.name[: -len(SUFFIX)]
        for suffix in SIDE_FILES:
            path.with_name(stem + suffix).unlink(missing_ok=True)
        shutil.rmtree(self.root / ".runs" / stem, ignore_errors=True)
        path.unlink()

    def update_info(self, name: str, **fields: str | tuple[str, ...] | list[str]) -> AdapterInfo:
        """Write title/author/description/license/tags/trigger_words into the file's header."""
        unknown = set(fields) - set(USER_FIELDS)
        if unknown:
            raise SdloraError(f"unknown adapter field(s) {', '.join(sorted(unknown))}; known: {', '.join(USER_FIELDS)}")
        path = self.get(name).path
        metadata = {k: str(v) for k, v in (check_header(path).get("__metadata__") or {}).items()}
        for key, value in fields.items():
            text = ", ".join(value) if isinstance(value, (tuple, list)) else str(value)
            metadata[USER_FIELDS[key]] = text
            if key == "trigger_words":
                metadata["sdlora.trigger_word"] = text
        tensors = load_file(str(path))  # tensors unchanged: only the header is rewritten
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        return self._info(path)


def _family(meta: dict[str, str]) -> str:
    claimed = meta.get("ss_base_model_version") or meta.get("modelspec.architecture", "")
    if "xl" in claimed.lower():
        return "sdxl"
    if meta.get("ss_v2") == "True":
        return "sd2"
    return next((family for key, family in FAMILIES.items() if claimed.startswith(key)), "unknown")


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "", "None") else None
    except ValueError:
        return None
    return value if value is None or math.isfinite(value) else None


def _int(text: str | None) -> int | None:
    value = _number(text)
    return int(value) if value is not None else None
