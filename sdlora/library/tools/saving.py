"""A tool's result saved as a new library adapter: its header says what it was made from."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sdlora.errors import SdloraError
from sdlora.library.formats import Adapter, family_of, write_adapter
from sdlora.library.formats.files import file_size

if TYPE_CHECKING:
    from sdlora.library.store import AdapterLibrary

# Header keys that describe the source file's tensors or training and would be false of the result.
STALE_KEYS = (
    "sshs_model_hash",
    "sshs_legacy_hash",
    "modelspec.hash_sha256",
    "sdlora.train_config",
    "sdlora.rank",
    "sdlora.alpha",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "lora_adapter_metadata",
)


def new_metadata(adapter: Adapter, name: str, made_from: str) -> dict[str, str]:
    """The header of a new adapter made by a tool from `adapter`'s: its name, ranks and origin."""
    metadata = {k: v for k, v in adapter.metadata.items() if k not in STALE_KEYS}
    ranks = {layer.rank for layer in adapter.layers.values()}
    alphas = {layer.alpha for layer in adapter.layers.values()}
    if len(ranks) == 1 and len(alphas) == 1:
        rank, alpha = ranks.pop(), alphas.pop()
        metadata.update({"sdlora.rank": str(rank), "sdlora.alpha": repr(alpha)})
        metadata.update({"ss_network_dim": str(rank), "ss_network_alpha": repr(alpha)})
    else:  # a rank and alpha per layer, as kohya's dynamic resize writes them
        metadata.update({"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"})
    metadata.update(
        {
            "ss_network_module": "networks.lora",
            "ss_output_name": name,
            "modelspec.title": name,
            "modelspec.date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "sdlora.made_from": made_from,
        }
    )
    return metadata


def check_new_name(library: AdapterLibrary, name: str, overwrite: bool = False) -> Path:
    """The file a new adapter `name` goes to, or a one-line refusal (a bad, reserved or taken name)."""
    path = library.path_of(name)
    library.refuse_reserved(name)
    if path.exists() and not overwrite:
        raise SdloraError(
            f"an adapter named {path.stem!r} already exists; pick another name (or ask to overwrite it)"
        )
    return path


def save_new_adapter(library: AdapterLibrary, adapter: Adapter, name: str, overwrite: bool = False) -> Path:
    """Write `adapter` as the library's `name` (kohya format, atomically); an existing one only if asked."""
    path = check_new_name(library, name, overwrite)
    reference = library.reference
    family = reference.family if reference is not None else family_of(adapter)
    write_adapter(path, adapter, "kohya", family=family, blocks=reference.blocks if reference else None)
    for stale in (".preview.png", ".config.json"):  # an overwritten adapter's side files describe the old one
        path.with_name(path.stem + stale).unlink(missing_ok=True)
    return path


def check_against(library: AdapterLibrary, base_model: str | None) -> AdapterLibrary:
    """The library, checking the adapters it reads against `base_model` when one is given (else as they are)."""
    if base_model:
        from sdlora.library.store import reference_from_pipeline
        from sdlora.models.loading import load_pipeline

        library.reference = reference_from_pipeline(load_pipeline(base_model))
    return library


def file_size_note(before: int, after: int) -> str:
    """The file size before and after, as the report says it."""
    return f"file size {file_size(before, 2)} -> {file_size(after, 2)} ({after / before:.0%})"
