"""The adapter library on disk: one flat folder, laid out like AUTOMATIC1111's models/Lora.

    <root>/<name>.safetensors    the adapter in the kohya format, metadata in its header (ss_*, modelspec.*)
    <root>/<name>.preview.png    its preview image
    <root>/<name>.config.json    the config that trained it (adapters trained here)
    <root>/<name>.metrics.csv    its run's loss, validation loss and learning rate per step
    <root>/.runs/<name>/         checkpoints, checkpoint adapters (adapters/) and previews of its run
    <root>/.exports/<format>/    downloads, each named after its adapter

Point AUTOMATIC1111's models/Lora, ComfyUI's models/loras or kohya at the folder: they read
its files as they are. Foreign kohya and LyCORIS files are kept byte for byte (their hashes
stay what Civitai knows); other formats are converted on import. A damaged entry is reported
and skipped; it never breaks the listing. Nothing is ever overwritten silently, and no name
can reach outside the folder.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.config import MAX_NAME_CHARS, check_adapter_name
from sdlora.errors import AdapterFormatError, SdloraError
from sdlora.library.formats import (
    Adapter,
    ModelLayout,
    atomic_write,
    check_header,
    family_of,
    header_metadata,
    read_adapter,
    save_tensors,
    write_adapter,
)
from sdlora.library.formats.files import STALE_AFTER_S, load_tensors, remove_stale_temp_files
from sdlora.library.formats.read import claimed_family, file_alpha, header_problem, summarize
from sdlora.models.families import family_named, is_family_name

SUFFIX = ".safetensors"
SIDE_FILES = (".preview.png", ".config.json", ".metrics.csv")
USER_FIELDS = {
    "title": "modelspec.title",
    "author": "modelspec.author",
    "description": "modelspec.description",
    "license": "modelspec.license",
    "tags": "modelspec.tags",
    "trigger_words": "modelspec.trigger_phrase",
}


class AdapterNotFound(SdloraError):
    """No adapter of that name in the library."""


def reference_from_pipeline(pipeline) -> ModelLayout:
    """The family and layer shapes that imported adapters must fit."""
    from sdlora.models.loading import inspect_pipeline

    return ModelLayout.of(pipeline, inspect_pipeline(pipeline).family)


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
    kind: str = "kohya LoRA"  # what the file is, as its users name it
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
    """The adapter name in `wanted` (a trailing .safetensors goes), checked by the one name rule, never altered."""
    name = str(wanted)
    if name.lower().endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    check_adapter_name(name)
    return name


def name_from_file(file_name: str) -> str:
    """A name for a file imported without one: its name with separators and invisible characters as '-'."""
    name = re.sub(r"[\\/:*?\"<>|\x00-\x1f\u200e\u200f\u061c\u202a-\u202e\u2066-\u2069]+", "-", file_name)
    if name.lower().endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    name = re.sub(r"\s+", " ", name).strip(".- ")
    if not name:
        raise SdloraError(f"{_shown(file_name)} cannot be used as an adapter name; give one")
    return safe_name(name)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _split(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


class AdapterLibrary:
    """List, import, export, rename, delete and annotate the adapters in one folder."""

    def __init__(self, root: str | Path, reference: ModelLayout | None = None) -> None:
        self.root = Path(root)
        self.reference = reference
        self.removed_leftovers = remove_leftovers(self.root)
        self._checked: dict[str, tuple[tuple, str]] = {}  # file name -> (its identity, why it is unusable)
        # Where the base model's layout comes from when an export needs it and none is set (the app: its
        # generator's model); None: such an export is refused.
        self.find_reference: Callable[[], ModelLayout | None] | None = None

    def path_of(self, name: str) -> Path:
        path = self.root / f"{safe_name(name)}{SUFFIX}"
        if path.resolve().parent != self.root.resolve():
            raise SdloraError(f"adapter name {name!r} would leave the library folder")
        return path

    def list(self, whole: bool = True) -> Listing:
        """The adapters and the files that cannot be used. `whole`: each file's tensors are read once (NaN
        and damaged data are found); else only headers are read, which needs no torch (`adapters list`)."""
        listing = Listing()
        if not self.root.is_dir():
            return listing
        for path in sorted(self.root.glob(f"*{SUFFIX}"), key=lambda p: p.name.lower()):
            try:
                if whole:
                    self._check_whole(path)
                elif problem := header_problem(path.name, check_header(path)):
                    raise AdapterFormatError(problem)
                listing.adapters.append(self._info(path))
            except SdloraError as exc:
                listing.problems.append(str(exc))
        return listing

    def _check_whole(self, path: Path) -> None:
        """Read the whole file once (again only when it changes): a damaged one is listed with its reason."""
        stat = path.stat()
        identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size, id(self.reference))
        known = self._checked.get(path.name)
        if known is None or known[0] != identity:
            try:
                read_adapter(path, self.reference)
                known = (identity, "")
            except SdloraError as exc:
                known = (identity, str(exc))
            self._checked[path.name] = known
        if known[1]:
            raise AdapterFormatError(known[1])

    def get(self, name: str) -> AdapterInfo:
        path = self.path_of(name)
        if not path.is_file():
            known = ", ".join(a.name for a in self.list().adapters) or "none"
            raise AdapterNotFound(f"no adapter named {name!r} in {self.root} (known: {known})")
        return self._info(path)

    def _info(self, path: Path) -> AdapterInfo:
        header = check_header(path)
        meta = header_metadata(header)
        kind, rank = summarize(header)
        if not kind:
            raise AdapterFormatError(f"{path.name} is not a LoRA adapter")
        name = path.name[: -len(SUFFIX)]
        preview = path.with_name(f"{name}.preview.png")
        triggers = _split(meta.get("modelspec.trigger_phrase") or meta.get("sdlora.trigger_word", ""))
        stat = path.stat()
        return AdapterInfo(
            name=name,
            path=path,
            base_model=meta.get("sdlora.base_model") or meta.get("ss_sd_model_name", ""),
            family=claimed_family(meta) or "unknown",
            rank=rank,
            alpha=_number(meta.get("sdlora.alpha") or meta.get("ss_network_alpha"))
            or file_alpha(path, header),
            steps=_int(meta.get("sdlora.steps") or meta.get("ss_steps")),
            trigger_words=triggers,
            size_bytes=stat.st_size,
            modified=stat.st_mtime,
            preview=preview if preview.is_file() else None,
            kind=kind,
            title=meta.get("modelspec.title", ""),
            author=meta.get("modelspec.author", ""),
            description=meta.get("modelspec.description", ""),
            license=meta.get("modelspec.license", ""),
            tags=_split(meta.get("modelspec.tags", "")),
        )

    def reserved_names(self) -> set[str]:
        """Names that queued and running training jobs will save under: no other verb may take them."""
        from sdlora.jobs.queue import JobQueue

        return JobQueue(self.root).reserved_names() if (self.root / ".queue").is_dir() else set()

    def refuse_reserved(self, name: str) -> None:
        """Refuse, in one line, a name a queued or running training job will save under."""
        if safe_name(name) in self.reserved_names():
            raise SdloraError(
                f"a queued training job will save an adapter named {safe_name(name)!r}; pick another name"
            )

    def unique_name(self, wanted: str) -> str:
        base = safe_name(wanted)
        name, n, reserved = base, 2, self.reserved_names()
        while self.path_of(name).exists() or name in reserved:
            name, n = f"{base[: MAX_NAME_CHARS - len(str(n)) - 1].rstrip('.- ')}-{n}", n + 1
        return name

    def read(self, name: str) -> Adapter:
        """An adapter of the library in memory, checked against the base model when one is known."""
        return read_adapter(self.get(name).path, self.reference)

    def import_file(
        self, source: str | Path, name: str | None = None, alpha: float | None = None
    ) -> AdapterInfo:
        """Check a LoRA file of any supported format and bring it in; the library is unchanged on any error.

        `alpha`: for files that keep none (a PEFT file without its adapter_config.json)."""
        source = Path(source)
        if name is not None:
            self.refuse_reserved(name)
        adapter = read_adapter(source, self.reference, alpha=alpha)
        target = self.path_of(self.unique_name(name if name is not None else name_from_file(source.name)))
        if adapter.source_format.startswith(("kohya", "LyCORIS")):
            atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))  # other tools read it as it is
        else:
            write_adapter(target, adapter, "kohya", family=self._family(adapter), blocks=self._blocks())
        return self._info(target)

    def add(self, adapter: Adapter, name: str) -> AdapterInfo:
        """Save a new adapter made here (block weights applied, ...) under `name`, which must be free."""
        self.refuse_reserved(name)
        target = self.path_of(name)
        if target.exists():
            raise SdloraError(f"an adapter named {safe_name(name)!r} already exists; pick another name")
        family = self._family(adapter)
        named = {"ss_output_name": target.stem, "modelspec.title": target.stem, "sdlora.family": family}
        write_adapter(target, adapter, "kohya", family=family, blocks=self._blocks(), metadata=named)
        return self._info(target)

    def export(self, name: str, fmt: str = "kohya", out_dir: str | Path | None = None) -> Path:
        """Write the adapter in 'kohya' or 'diffusers' format as <out_dir>/<name>.safetensors (kohya, which
        every tool loads) or <out_dir>/<name>.<format>.safetensors, so two downloads never share a name."""
        info = self.get(name)
        adapter = read_adapter(info.path, self.layout_for_export(info))
        out = Path(out_dir) if out_dir else self.root / ".exports" / fmt
        file_name = info.name + ("" if fmt == "kohya" else f".{fmt}") + SUFFIX
        return write_adapter(
            out / file_name, adapter, fmt, family=self._family(adapter), blocks=self._blocks()
        )

    def needs_base(self, name: str) -> bool:
        """Whether exporting needs the base model's layout: LyCORIS files store convolutions flat (the
        layer's shape is the base's), and original-SD block numbers depend on the base's ResNets per level
        (kohya's SDXL names excepted: every SDXL has two)."""
        info = self.get(name)
        if info.kind.startswith("LyCORIS"):
            return True
        ldm = "original SD block names" in info.kind or info.kind.startswith("ComfyUI")
        return ldm and not (
            is_family_name(info.family) and family_named(info.family).kohya_original_unet_names
        )

    def layout_for_export(self, info: AdapterInfo) -> ModelLayout | None:
        """The base model's layout, found when the export needs one; a one-line refusal when none is known."""
        if self.reference is None and self.needs_base(info.name) and self.find_reference is not None:
            self.reference = self.find_reference()
        if self.reference is None and self.needs_base(info.name):
            raise AdapterFormatError(
                f"{info.path.name}: a {info.kind} file takes its layers' shapes and block numbers from "
                "its base model, and none is known here; export it with the base model (--base-model)"
            )
        return self.reference

    def _family(self, adapter: Adapter) -> str:
        return self.reference.family if self.reference is not None else family_of(adapter)

    def _blocks(self):
        return self.reference.blocks if self.reference is not None else None

    def rename(self, name: str, new_name: str) -> AdapterInfo:
        old, new = self.get(name).path, self.path_of(new_name)
        self.refuse_reserved(new_name)
        if new.exists():
            raise SdloraError(f"an adapter named {safe_name(new_name)!r} already exists; pick another name")
        for suffix in (SUFFIX, *SIDE_FILES):
            side = old.with_name(old.name[: -len(SUFFIX)] + suffix)
            if side.exists():
                side.rename(new.with_name(new.name[: -len(SUFFIX)] + suffix))
        new_stem = new.name[: -len(SUFFIX)]
        old_stem = old.name[: -len(SUFFIX)]

        def rename_inside(metadata: dict[str, str]) -> None:
            metadata["ss_output_name"] = new_stem  # the name AUTOMATIC1111 shows
            if metadata.get("modelspec.title", old_stem) in (old_stem, ""):
                metadata["modelspec.title"] = new_stem

        _rewrite_header(new, rename_inside)
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
            raise SdloraError(
                f"unknown adapter field(s) {', '.join(sorted(unknown))}; known: {', '.join(USER_FIELDS)}"
            )
        path = self.get(name).path

        def write_fields(metadata: dict[str, str]) -> None:
            for key, value in fields.items():
                text = ", ".join(value) if isinstance(value, (tuple, list)) else str(value)
                metadata[USER_FIELDS[key]] = text
                if key == "trigger_words":
                    metadata["sdlora.trigger_word"] = text

        _rewrite_header(path, write_fields)
        return self._info(path)


def remove_leftovers(root: Path) -> list[Path]:
    """What killed writes left in a library: stale atomic-write temp files and half-written checkpoints."""
    from sdlora.training.checkpoints import remove_stale_partials

    return remove_stale_temp_files(root) + remove_stale_partials(root / ".runs", STALE_AFTER_S)


def _rewrite_header(path: Path, change) -> None:
    """Rewrite a file's metadata in place; its tensors stay exactly as they were."""
    metadata = header_metadata(check_header(path))
    change(metadata)
    save_tensors(path, load_tensors(path), metadata)


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "", "None") else None
    except ValueError:
        return None
    return value if value is None or math.isfinite(value) else None


def _int(text: str | None) -> int | None:
    value = _number(text)
    return int(value) if value is not None else None
