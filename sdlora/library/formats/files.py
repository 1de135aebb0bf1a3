"""safetensors files: checked header-first, written atomically, readable like any other file.

Foreign files are checked before any tensor is read: pickles are refused unopened, and a header
that claims more bytes than the file holds is refused before anything is allocated.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sdlora.errors import AdapterFormatError

if TYPE_CHECKING:  # torch loads on first tensor read or write: the queue and captions write files without it
    import torch

MAX_HEADER_BYTES = 64 * 1024 * 1024  # real LoRA headers are kilobytes; metadata-heavy ones a few MB
MAX_TENSOR_ELEMENTS = 1 << 31
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
# Trained LoRA factors hold values of about 1e-4..1 and alphas at most a few hundred. A factor past
# 1e4 makes up @ down exceed 1e8 per element (x rank), far over float16's 65504: a fused half-precision
# UNet turns to inf and every image goes black. Such a file is damaged or hostile, never a real LoRA.
MAX_ABS_VALUE = 1e4
# atomic_write's temp files: mkstemp(prefix=".<name>.", suffix=".tmp") adds 8 random [a-z0-9_] characters.
TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
STALE_AFTER_S = (
    600  # our slowest atomic write (an SDXL-size file) takes seconds; a temp file idle 10 min is dead
)


def file_mode() -> int:
    """What open() would give a new file under the current umask (mkstemp's 0600 would hide the
    library from a ComfyUI or AUTOMATIC1111 running as another user)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[Path], None], durable: bool = True) -> None:
    """Write through a temp file in the same folder and rename, so a crash never leaves half a file.

    `durable`: on disk before the rename, so a power cut leaves the old file; a file rewritten
    often whose loss costs little (a running job's step) may skip the fsync.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        if durable:
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """An atomic safetensors write with string metadata."""
    tensors = {key: value.contiguous() for key, value in tensors.items()}
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return Path(path)


def check_header(path: Path) -> dict:
    """Parse and sanity-check a safetensors header without reading any tensor data."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if head.startswith(PICKLE_MAGIC):
                raise AdapterFormatError(
                    f"{name} is a pickled PyTorch file; pickles can run code when opened "
                    "and are refused. Use the .safetensors version of this adapter"
                )
            if len(head) < 8:
                raise AdapterFormatError(f"{name} is empty or too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise AdapterFormatError(
                    f"{name}: header claims {header_len:,} bytes but the file has {size:,}; "
                    "damaged or not a safetensors file"
                )
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise AdapterFormatError(f"{name} cannot be read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterFormatError(f"{name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{name} is not a safetensors file (bad header)")
    _check_tensor_sizes(name, header, size - 8 - header_len)
    return header


def _check_tensor_sizes(name: str, header: dict, data_bytes: int) -> None:
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            elements = math.prod(info["shape"])
            width = DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise AdapterFormatError(f"{name}: tensor {_short(key)!r} has a malformed header entry") from None
        if (
            elements > MAX_TENSOR_ELEMENTS
            or not 0 <= start <= end <= data_bytes
            or end - start != elements * width
        ):
            raise AdapterFormatError(
                f"{name}: tensor {_short(key)!r} claims a size the file does not hold "
                f"(shape {info['shape']}); damaged or hostile file refused"
            )


SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e"}


def read_scalars(path: Path, header: dict, keys: list[str]) -> list[float]:
    """The values of one-element float tensors of a checked file, read byte by byte (no torch): what a
    listing needs of a file (its alphas) without loading it."""
    values = []
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        for key in keys:
            info = header[key]
            if math.prod(info["shape"]) != 1 or info["dtype"] not in (*SCALAR_FORMATS, "BF16"):
                continue
            handle.seek(8 + header_len + info["data_offsets"][0])
            raw = handle.read(DTYPE_BYTES[info["dtype"]])
            if info["dtype"] == "BF16":  # bfloat16 is the upper half of a float32
                raw, fmt = b"\x00\x00" + raw, "<f"
            else:
                fmt = SCALAR_FORMATS[info["dtype"]]
            values.append(struct.unpack(fmt, raw)[0])
    return values


def header_metadata(header: dict) -> dict[str, str]:
    return {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's string metadata; AdapterFormatError if it is not a safetensors file."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise AdapterFormatError(f"{Path(path).name} is not a readable safetensors file: {exc}") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checked file; refuses NaN, infinities and values past MAX_ABS_VALUE, which
    would poison a fused base."""
    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad data
        raise AdapterFormatError(f"{Path(path).name} could not be read: {exc}") from None
    for key, value in tensors.items():
        if not value.is_floating_point() or value.numel() == 0:
            continue
        checked = value.float()  # float8 has no isfinite
        if not bool(torch.isfinite(checked).all()):
            raise AdapterFormatError(
                f"{Path(path).name}: tensor {_short(key)!r} holds NaN or infinite values; "
                "damaged file refused"
            )
        largest = float(checked.abs().max())
        if largest > MAX_ABS_VALUE:
            raise AdapterFormatError(
                f"{Path(path).name}: tensor {_short(key)!r} holds a value of {largest:.3g}, "
                f"past the {MAX_ABS_VALUE:g} no real LoRA reaches; damaged file refused"
            )
    return tensors


def remove_stale_temp_files(folder: Path, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete atomic_write's leftovers (a killed write) under `folder` that are older than `max_age_s`."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    cutoff = time.time() - max_age_s
    for path in folder.rglob("*.tmp"):
        try:
            if TEMP_FILE.match(path.name) and path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except OSError:  # gone meanwhile, or not ours to delete: leave it
            continue
    return removed


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def file_size(n: int, digits: int = 1) -> str:
    """A file's size as every report and table here writes it: in units of 2**20 bytes called MB, as the
    browser's file boxes (gradio) count them, so that one file shows one number everywhere."""
    return f"{n / 2**20:.{digits}f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"
