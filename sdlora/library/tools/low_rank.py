"""The best low-rank form of a layer's update ΔW, by truncated SVD, and the figures of what was kept.

A LoRA layer's ΔW = up·down is already low rank, so its SVD never needs the full (out × in)
matrix: a QR of each factor leaves a small (r × r) core whose SVD gives ΔW's singular values
and vectors exactly. That is why resizing an SDXL adapter takes seconds, not minutes, and why
the arithmetic can afford float64 (results are stored in the adapter's own dtype).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import ConfigError
from sdlora.library.formats.adapter import LoraLayer


@dataclass(frozen=True)
class RankRule:
    """How many singular values each layer keeps: a fixed rank, a kept fraction of ΔW's Frobenius norm
    (kohya's sv_fro) or those at least `ratio` × the largest (kohya's sv_ratio); `rank` caps the rules."""

    rank: int | None = None
    keep: float | None = None
    ratio: float | None = None

    def check(self) -> RankRule:
        """This rule, or a one-line refusal naming the setting that is wrong."""
        if self.keep is not None and self.ratio is not None:
            raise ConfigError("give a kept fraction (keep) or a ratio, not both")
        if self.rank is None and self.keep is None and self.ratio is None:
            raise ConfigError("give a rank, a kept fraction (keep, e.g. 0.95) or a ratio (e.g. 0.1)")
        if self.rank is not None and (
            isinstance(self.rank, bool) or int(self.rank) != self.rank or self.rank < 1
        ):
            raise ConfigError(f"rank must be a whole number of at least 1, not {self.rank!r}")
        for name in ("keep", "ratio"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0 < value <= 1):
                raise ConfigError(f"{name} must be a fraction above 0 and at most 1, not {value!r}")
        return self

    def words(self) -> str:
        """The rule as the report says it."""
        cap = f", at most rank {self.rank}" if self.rank is not None else ""
        if self.keep is not None:
            return f"{self.keep:.0%} of each layer's norm{cap}"
        if self.ratio is not None:
            return f"singular values >= {self.ratio:g} x the largest{cap}"
        return f"rank {self.rank}"


@dataclass(frozen=True)
class LayerFigures:
    """One layer's ranks before and after, and ΔW's Frobenius norm before and after."""

    key: str
    rank_before: int
    rank_after: int
    norm: float
    kept_norm: float

    @property
    def retained(self) -> float:
        """The fraction of ΔW's Frobenius norm kept (1 for a layer whose ΔW is zero)."""
        return self.kept_norm / self.norm if self.norm > 0 else 1.0


@dataclass
class Report:
    """What a tool did, per layer and overall, for the CLI and the app."""

    title: str
    layers: list[LayerFigures] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    saved: Path | None = None  # the new adapter's file, once the library has it

    @property
    def retained(self) -> float:
        """The fraction of the whole adapter's Frobenius norm kept (all layers' ΔW together)."""
        total = sum(f.norm**2 for f in self.layers)
        return math.sqrt(sum(f.kept_norm**2 for f in self.layers) / total) if total > 0 else 1.0

    def summary(self) -> str:
        """One line: layers, ranks kept and the fraction of the norm retained overall."""
        if not self.layers:
            return f"{self.title}: no layers"
        ranks = [f.rank_after for f in self.layers]
        span = str(ranks[0]) if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}"
        worst = min(f.retained for f in self.layers)
        return (
            f"{self.title}: {len(ranks)} layers at rank {span} (mean {sum(ranks) / len(ranks):.1f}); "
            f"{self.retained:.2%} of ΔW's Frobenius norm retained overall, {worst:.2%} in the worst layer"
        )

    def lines(self, per_layer: bool = True) -> list[str]:
        """The summary, the notes (file sizes), then one line per layer."""
        out = [self.summary(), *self.notes]
        if per_layer:
            out += [
                f"  {f.key}: rank {f.rank_before} -> {f.rank_after}, {f.retained:.2%} of its norm retained"
                for f in self.layers
            ]
        return out


def check_rank_fits(rank: int | None, layers: Iterable[LoraLayer]) -> None:
    """Refuse a rank that no layer can hold (above the smaller side of every layer's ΔW)."""
    largest = max((min(layer.up.shape[0], layer.down[0].numel()) for layer in layers), default=0)
    if rank is not None and largest and rank > largest:
        raise ConfigError(f"rank {rank} is above the size of every layer (the largest allows rank {largest})")


def factor_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of up·down (out × r and r × in) in float64, from a QR of each factor and a small SVD."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u, s, vh @ q_down.T


def kept_count(singular: torch.Tensor, rule: RankRule) -> int:
    """How many of these singular values (largest first) the rule keeps; at least one."""
    count = len(singular)
    if count == 0 or float(singular[0]) <= 0:
        return 1
    if rule.keep is not None:
        squares = singular.pow(2)
        fraction = torch.cumsum(squares, 0) / squares.sum()
        # the first count whose kept norm reaches the wanted fraction (a hair of float tolerance)
        count = (
            int(torch.searchsorted(fraction, torch.tensor(rule.keep**2 - 1e-12, dtype=fraction.dtype))) + 1
        )
    elif rule.ratio is not None:
        count = int((singular >= rule.ratio * singular[0]).sum())
    if rule.rank is not None:
        count = min(count, rule.rank)
    return max(1, min(count, len(singular)))


def truncate(
    key: str,
    up: torch.Tensor,
    down: torch.Tensor,
    down_shape: tuple[int, ...],
    rule: RankRule,
    dtype: torch.dtype,
) -> tuple[LoraLayer, LayerFigures]:
    """The best approximation of ΔW = up·down (2-D, scale folded in) that the rule allows, as a layer with
    alpha = its rank (scale 1, so weight 1 means what it meant), and the figures of what it kept."""
    u, s, vh = factor_svd(up, down)
    k = kept_count(s, rule)
    root = s[:k].sqrt()
    new_up = (u[:, :k] * root).to(dtype)
    new_down = (root[:, None] * vh[:k]).to(dtype)
    layer = LoraLayer(
        new_down.reshape(k, *down_shape[1:]),
        new_up.reshape(new_up.shape[0], k, *([1] * (len(down_shape) - 2))),
        float(k),
    )
    norm = float(s.pow(2).sum().sqrt())
    figures = LayerFigures(key, up.shape[1], k, norm, float(s[:k].pow(2).sum().sqrt()))
    return layer, figures


def flat_factors(layer: LoraLayer, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight · alpha/r · up, down) as 2-D float matrices: ΔW·weight = their product."""
    return layer.up.float().flatten(1) * (weight * layer.scale), layer.down.float().flatten(1)
