"""Merge: several adapters with weights folded into one, exactly or to a target rank.

Exact: per layer the inputs' downs are stacked and their ups set side by side with each one's
weight and alpha/r folded in, so the merged ΔW is Σ wᵢ·ΔWᵢ to float precision and its rank is
the sum of theirs. To a rank: the truncated SVD of that sum (the best approximation of it).
A layer that only some inputs adapt is kept, with the others' contribution zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from sdlora.errors import AdapterFormatError, ConfigError
from sdlora.library.formats import Adapter, LoraLayer, family_of
from sdlora.library.formats.read import claimed_family, family_words
from sdlora.library.tools.low_rank import (
    LayerFigures,
    RankRule,
    Report,
    check_rank_fits,
    flat_factors,
    truncate,
)
from sdlora.library.tools.saving import check_new_name, file_size_note, new_metadata, save_new_adapter
from sdlora.models.families import family_named

if TYPE_CHECKING:
    from sdlora.library.store import AdapterLibrary

Progress = Callable[[int, int], None]  # (layers done, layers in all)


def merge(
    weighted: list[tuple[Adapter, float]],
    rank: int | None = None,
    names: list[str] | None = None,
    on_progress: Progress | None = None,
) -> tuple[Adapter, Report]:
    """One adapter whose ΔW is Σ wᵢ·ΔWᵢ: exact (ranks add up), or its best rank-`rank` approximation."""
    names = names or [f"adapter {i + 1}" for i in range(len(weighted))]
    check_inputs(weighted, names)
    rule = RankRule(rank).check() if rank is not None else None
    check_rank_fits(rank, (layer for adapter, _ in weighted for layer in adapter.layers.values()))
    keys = list(dict.fromkeys(key for adapter, _ in weighted for key in adapter.layers))
    dtype = _widest(layer.up.dtype for adapter, _ in weighted for layer in adapter.layers.values())
    layers, report = (
        {},
        Report(f"exact merge of {len(weighted)}" if rule is None else f"merge to {rule.words()}"),
    )
    for done, key in enumerate(keys, 1):
        present = [
            (adapter.layers[key], w, n)
            for (adapter, w), n in zip(weighted, names, strict=True)
            if key in adapter.layers
        ]
        down_shape = common_shape(key, [(layer, n) for layer, _, n in present])
        factors = [flat_factors(layer, weight) for layer, weight, _ in present]
        up, down = torch.cat([u for u, _ in factors], 1), torch.cat([d for _, d in factors], 0)
        if rule is None:
            layers[key] = _stacked(up, down, down_shape, dtype)
            report.layers.append(LayerFigures(key, up.shape[1], up.shape[1], 0.0, 0.0))
        else:
            layers[key], figures = truncate(key, up, down, down_shape, rule, dtype)
            report.layers.append(figures)
        if on_progress is not None:
            on_progress(done, len(keys))
    return Adapter(layers, merged_metadata([a for a, _ in weighted]), "sdlora"), report


def check_inputs(weighted: list[tuple[Adapter, float]], names: list[str]) -> None:
    """Refuse, in one line, no inputs, a weight that is not a number, or adapters of different families."""
    if not weighted:
        raise ConfigError("give at least one adapter to merge, as NAME:WEIGHT")
    for (_, weight), name in zip(weighted, names, strict=True):
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"{name}: weight {weight!r} is not a finite number")
    claims = [(claimed_family(a.metadata), n) for (a, _), n in zip(weighted, names, strict=True)]
    first = next(((f, n) for f, n in claims if f), None)
    for family, name in claims:
        if family and family != first[0]:
            raise _different(first[1], first[0], name, family)
    guessed = [(family_of(a), n) for (a, _), n in zip(weighted, names, strict=True)]
    for family, name in guessed[1:]:  # files that name no family: what their parts are
        if family_named(family).denoiser != family_named(guessed[0][0]).denoiser:
            raise _different(guessed[0][1], guessed[0][0], name, family)


def _different(name_a: str, family_a: str, name_b: str, family_b: str) -> AdapterFormatError:
    return AdapterFormatError(
        f"cannot merge {name_a} ({family_words(family_a)}) with {name_b} ({family_words(family_b)}): "
        "adapters of different model families"
    )


def common_shape(key: str, present: list[tuple[LoraLayer, str]]) -> tuple[int, ...]:
    """The down shape the merged layer takes (a convolution's 4-D form over a 2-D one of the same size);
    inputs whose ΔW sizes differ at this layer are refused, naming both."""
    sizes = [((layer.up.shape[0], layer.down[0].numel()), name) for layer, name in present]
    for size, name in sizes[1:]:
        if size != sizes[0][0]:
            raise AdapterFormatError(
                f"{key} is {sizes[0][0]} in {sizes[0][1]} but {size} in {name}: "
                "these adapters are for different models"
            )
    return tuple(max((layer.down for layer, _ in present), key=lambda d: d.dim()).shape)


def _stacked(up: torch.Tensor, down: torch.Tensor, down_shape: tuple[int, ...], dtype) -> LoraLayer:
    """The exact merged layer: alpha = its rank (scale 1), since weights and scales are in `up`."""
    rank = up.shape[1]
    return LoraLayer(
        down.reshape(rank, *down_shape[1:]).to(dtype),
        up.reshape(up.shape[0], rank, *([1] * (len(down_shape) - 2))).to(dtype),
        float(rank),
    )


def _widest(dtypes) -> torch.dtype:
    result = None
    for dtype in dtypes:
        result = dtype if result is None else torch.promote_types(result, dtype)
    return result or torch.float32


def merged_metadata(adapters: list[Adapter]) -> dict[str, str]:
    """The first input's header (one that names its family first), with every input's trigger words."""
    first = next((a for a in adapters if claimed_family(a.metadata)), adapters[0])
    metadata = dict(first.metadata)
    triggers: list[str] = []
    for adapter in adapters:
        text = adapter.metadata.get("modelspec.trigger_phrase") or adapter.metadata.get(
            "sdlora.trigger_word", ""
        )
        triggers += [t.strip() for t in text.split(",") if t.strip()]
    if triggers:
        joined = ", ".join(dict.fromkeys(triggers))
        metadata.update({"modelspec.trigger_phrase": joined, "sdlora.trigger_word": joined})
    for key in ("modelspec.description", "sdlora.steps", "ss_steps", "ss_tag_frequency"):
        metadata.pop(key, None)  # facts of one input's training, not of the merge
    return metadata


def parse_weighted(text: str) -> tuple[str, float]:
    """'NAME:WEIGHT' (or NAME alone, weight 1) as typed on the command line."""
    name, sep, weight = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return name, float(weight)
    except ValueError:
        raise ConfigError(f"{text!r}: expected NAME:WEIGHT, e.g. style:0.7") from None


def merge_in_library(
    library: AdapterLibrary,
    weighted: list[tuple[str, float]],
    new_name: str,
    rank: int | None = None,
    overwrite: bool = False,
    on_progress: Progress | None = None,
) -> Report:
    """Merge the library's adapters `weighted` (name, weight) into a new adapter `new_name`."""
    check_new_name(library, new_name, overwrite)  # refused before any work
    infos = [library.get(name) for name, _ in weighted]
    adapters = [(library.read(info.name), weight) for info, (_, weight) in zip(infos, weighted, strict=True)]
    merged, report = merge(adapters, rank, [info.name for info in infos], on_progress)
    recipe = " + ".join(
        f"{info.name} x {weight:g}" for info, (_, weight) in zip(infos, weighted, strict=True)
    )
    how = f", SVD to rank {rank}" if rank is not None else " (exact)"
    merged.metadata = new_metadata(merged, new_name, f"merge of {recipe}{how}")
    path = report.saved = save_new_adapter(library, merged, new_name, overwrite=overwrite)
    report.title = f"{recipe} -> {path.stem}, {report.title}"
    report.notes.append(
        file_size_note(sum(i.size_bytes for i in infos), path.stat().st_size) + " (inputs together)"
    )
    return report
