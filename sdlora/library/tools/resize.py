"""Resize: every layer of an adapter to a new rank, by truncated SVD of its ΔW, with its effect kept.

Each layer's ΔW = (alpha/r)·up·down (a convolution's flattened to out × in·kh·kw) is replaced by
its best approximation of the rank a `RankRule` allows (Eckart-Young: the truncated SVD), with
alpha = the new rank so that weight 1 still means the same strength in every tool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sdlora.library.formats.adapter import Adapter
from sdlora.library.tools.low_rank import RankRule, Report, check_rank_fits, flat_factors, truncate
from sdlora.library.tools.saving import check_new_name, file_size_note, new_metadata, save_new_adapter

if TYPE_CHECKING:
    from sdlora.library.store import AdapterLibrary

Progress = Callable[[int, int], None]  # (layers done, layers in all)


def resize(
    adapter: Adapter,
    rank: int | None = None,
    keep: float | None = None,
    ratio: float | None = None,
    on_progress: Progress | None = None,
) -> tuple[Adapter, Report]:
    """The adapter with each layer at a fixed `rank`, or the rank that keeps `keep` of its ΔW's Frobenius
    norm, or that keeps singular values >= `ratio` × the largest (`rank` then caps it)."""
    rule = RankRule(rank, keep, ratio).check()
    check_rank_fits(rank, adapter.layers.values())
    layers, report = {}, Report(f"resized to {rule.words()}")
    for done, (key, layer) in enumerate(adapter.layers.items(), 1):
        up, down = flat_factors(layer)
        layers[key], figures = truncate(key, up, down, tuple(layer.down.shape), rule, layer.up.dtype)
        report.layers.append(figures)
        if on_progress is not None:
            on_progress(done, len(adapter.layers))
    return Adapter(layers, dict(adapter.metadata)), report


def resize_in_library(
    library: AdapterLibrary,
    name: str,
    new_name: str,
    rank: int | None = None,
    keep: float | None = None,
    ratio: float | None = None,
    overwrite: bool = False,
    on_progress: Progress | None = None,
) -> Report:
    """Resize the library's adapter `name` into a new adapter `new_name` (never over another unless asked)."""
    source = library.get(name)
    check_new_name(library, new_name, overwrite)  # refused before any work
    resized, report = resize(library.read(name), rank, keep, ratio, on_progress)
    resized.metadata = new_metadata(
        resized, new_name, f"{source.name} resized to {RankRule(rank, keep, ratio).words()}"
    )
    path = report.saved = save_new_adapter(library, resized, new_name, overwrite=overwrite)
    report.title = f"{source.name} (rank {source.rank}) -> {path.stem}, {report.title}"
    report.notes.append(file_size_note(source.size_bytes, path.stat().st_size))
    return report
