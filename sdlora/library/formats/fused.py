"""Exact LoRA layers for fused projections: one original weight that stacks several diffusers ones.

A fused weight W (rows of q, then k, then v, ...) gets one LoRA (down, up, alpha); each diffusers
projection j owns a block of W's rows, so its own update is the same rows of the fused update.

Joining members into one fused layer: down is the members' downs stacked (rank = the sum of
their ranks), up is block-diagonal (member j's up in its rows and its rank columns, zeros
elsewhere), and alpha is chosen so alpha/rank is every member's scale; when the members' scales
differ, each member's scale goes into its up block and the joined scale is 1. A member with no
layer contributes zero rows.

Splitting a fused layer: if the up's row blocks use disjoint columns (a joined or kohya
`split_qkv` file), each member takes its own columns of down and up, with alpha scaled by its
share of the rank so its scale is unchanged; otherwise each member shares the whole down and
takes its rows of up, at the same alpha. Both are exact: ΔW per member equals the fused ΔW's rows.
"""

from __future__ import annotations

import torch

from sdlora.library.formats.adapter import LoraLayer


def swap_halves(up: torch.Tensor) -> torch.Tensor:
    """Rows (a, b) -> (b, a): the original final layers' (scale, shift) as diffusers' (shift, scale)."""
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def join(layers: list[LoraLayer | None], widths: list[int]) -> LoraLayer:
    """One fused layer whose update's row blocks are the members' updates (None: a block of zeros)."""
    present = [(j, layer) for j, layer in enumerate(layers) if layer is not None]
    if not present:
        raise ValueError("nothing to join")
    if len(layers) == 1:
        return present[0][1]
    scales = {layer.scale for _, layer in present}
    rank = sum(layer.rank for _, layer in present)
    shared = len(scales) == 1
    alpha = rank * scales.pop() if shared else float(rank)
    first = present[0][1]
    up = torch.zeros(sum(widths), rank, *first.up.shape[2:], dtype=torch.float32)
    row_starts = [sum(widths[:j]) for j in range(len(widths))]
    column = 0
    for j, layer in present:
        block = layer.up.float() if shared else layer.up.float() * layer.scale
        up[row_starts[j] : row_starts[j] + widths[j], column : column + layer.rank] = block
        column += layer.rank
    down = torch.cat([layer.down.float() for _, layer in present], dim=0)
    return LoraLayer(down, up, alpha)


def split(layer: LoraLayer, widths: list[int]) -> list[LoraLayer | None]:
    """The members' layers of a fused layer (None for a member whose update is zero)."""
    if len(widths) == 1:
        return [layer]
    if sum(widths) != layer.up.shape[0]:
        raise ValueError(f"the fused layer has {layer.up.shape[0]} rows, its parts {sum(widths)}")
    ups = torch.split(layer.up, widths, dim=0)
    columns = [up.flatten(1).ne(0).any(dim=0) if up.ndim > 2 else up.ne(0).any(dim=0) for up in ups]
    disjoint = bool(torch.stack(columns).sum(dim=0).le(1).all()) and bool(torch.stack(columns).any())
    if not disjoint:
        return [LoraLayer(layer.down, up, layer.alpha) for up in ups]
    parts: list[LoraLayer | None] = []
    for up, used in zip(ups, columns, strict=True):
        rank = int(used.sum())
        if rank == 0:
            parts.append(None)
            continue
        alpha = layer.alpha * rank / layer.rank  # keeps alpha/rank, the scale, as it was
        parts.append(LoraLayer(layer.down[used], up[:, used], alpha))
    return parts


def widths_for(
    members: tuple[str, ...], ratios: tuple[int, ...], known: dict[str, int], total: int | None = None
) -> list[int]:
    """Each member's row count: from the model when it says, else from the present members or the fused total."""
    if all(m in known for m in members):
        return [known[m] for m in members]
    if total is not None:
        unit, rest = divmod(total, sum(ratios))
        if rest == 0:
            return [unit * r for r in ratios]
    for member, ratio in zip(members, ratios, strict=True):
        if member in known:
            unit = known[member] // ratio
            return [known.get(m, unit * r) for m, r in zip(members, ratios, strict=True)]
    raise ValueError(f"cannot tell the widths of {', '.join(members)}")
