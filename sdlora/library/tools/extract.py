"""Extract: a LoRA from the difference of two full models (a fine-tuned one and its base).

Per adapted layer, ΔW = W_tuned - W_base is factored by SVD and cut to a rank (or to the smallest
rank keeping a fraction of ΔW's Frobenius norm); the singular values are shared between up and
down, and alpha equals the rank, so the adapter at weight 1 adds the truncated ΔW. The layers are
those a LoRA of the family adapts (kohya's extract: attention, feed-forward and ResNet layers of the
denoiser, attention and MLP of the text encoders; on SD3 and Flux.1 the transformer's attention
projections), so the result is an ordinary library adapter.
A diffusers folder is read one tensor at a time (model_weights.py): memory holds one layer's pair,
difference and factors, and the adapter so far; a single file is loaded whole.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdlora.errors import ConfigError, ModelLoadError, SdloraError
from sdlora.library.formats.adapter import Adapter, LoraLayer
from sdlora.library.formats.names import canonical_text_path
from sdlora.library.tools.saving import check_new_name
from sdlora.models.families.sd3 import JOINT_ATTENTION

if TYPE_CHECKING:
    from sdlora.library.store import AdapterInfo, AdapterLibrary
    from sdlora.library.tools.model_weights import FolderWeights, LoadedWeights

    ModelWeights = FolderWeights | LoadedWeights

DEFAULT_THRESHOLD = 1e-6  # ‖ΔW‖/‖W‖ below this counts as unchanged (float16 rounding is ~1e-4 per element)
DENOISER_BLOCKS = (
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "transformer_blocks.",
    "single_transformer_blocks.",
)
UNET_KINDS = (".attentions.", ".resnets.", ".downsamplers.", ".upsamplers.")
TEXT_KINDS = (".self_attn.", ".mlp.")
TEXT_PARTS = ("text_encoder", "text_encoder_2")
OVERSAMPLING, POWER_ITERATIONS = 10, 4  # the randomized SVD's extra directions and refinement passes


@dataclass(frozen=True)
class LayerFigure:
    """One extracted layer: the rank kept and the fraction of ΔW's Frobenius norm it keeps."""

    key: str
    rank: int
    retained: float
    change: float  # ‖ΔW‖/‖W_base‖: how much fine-tuning moved this layer


@dataclass
class ExtractReport:
    """Per layer and overall: ranks, the norm retained, and the layers left out as unchanged."""

    family: str
    threshold: float
    layers: list[LayerFigure] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept_squares: float = 0.0  # Σ over layers of the kept singular values squared
    total_squares: float = 0.0

    @property
    def retained(self) -> float:
        """The fraction of the whole difference's Frobenius norm that the adapter reproduces."""
        return math.sqrt(self.kept_squares / self.total_squares) if self.total_squares else 1.0

    def lines(self) -> list[str]:
        """One line per layer, then the totals, for the CLI and the app."""
        out = [
            f"{f.key}: rank {f.rank}, {f.retained:.2%} of ΔW kept (changed {f.change:.2e})"
            for f in self.layers
        ]
        ranks = sorted(f.rank for f in self.layers)
        out.append(
            f"{len(self.layers)} layers extracted ({self.family}), ranks {ranks[0] if ranks else 0}-"
            f"{ranks[-1] if ranks else 0}, {self.retained:.2%} of the difference kept; "
            f"{len(self.unchanged)} layers left out as unchanged (below {self.threshold:g})"
        )
        return out


def extract(
    base_model: str,
    tuned_model: str,
    rank: int | None = None,
    keep: float | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Adapter, ExtractReport]:
    """A LoRA that turns `base_model` into `tuned_model` (hub ids, diffusers folders or .safetensors files)."""
    check_rule(rank, keep, threshold)
    return _extracted(base_model, tuned_model, rank, keep, threshold, progress)[1:]


def _extracted(base_model: str, tuned_model: str, rank, keep, threshold, progress):
    """The opened base (its layout names the result) with the adapter and report (rule already checked)."""
    base, tuned = open_pair(base_model, tuned_model)
    return (base, *extract_weights(base, tuned, rank, keep, threshold, progress))


def extract_into_library(
    library: AdapterLibrary,
    name: str,
    base_model: str,
    tuned_model: str,
    rank: int | None = None,
    keep: float | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[AdapterInfo, ExtractReport]:
    """Extract and add the result to the library as `name` (refused if taken), checked against the base."""
    from sdlora.library.formats.adapter import ModelLayout
    from sdlora.library.formats.write import write_adapter
    from sdlora.library.tools.model_weights import layout_pipeline

    check_rule(rank, keep, threshold)
    check_new_name(library, name)  # refused before any work
    base, adapter, report = _extracted(base_model, tuned_model, rank, keep, threshold, progress)
    if not adapter.layers:
        raise SdloraError(f"{tuned_model} does not differ from {base_model}: nothing to extract")
    adapter.metadata["modelspec.title"] = name
    library.reference = ModelLayout.of(layout_pipeline(base), base.family)
    with tempfile.TemporaryDirectory() as scratch:  # the library's own import checks and names it
        written = write_adapter(
            Path(scratch) / f"{name}.safetensors", adapter, "diffusers", family=base.family
        )
        return library.import_file(written, name=name), report


def open_pair(base_model: str, tuned_model: str):
    """Both models' weights (read lazily where they are diffusers folders); two families are refused."""
    from sdlora.library.tools.model_weights import model_weights

    base, tuned = model_weights(base_model), model_weights(tuned_model)
    if base.family != tuned.family:
        raise ModelLoadError(
            f"{tuned_model} is a {tuned.family} model and {base_model} a {base.family} one: "
            "extract needs a fine-tuned model and its own base"
        )
    return base, tuned


def extract_weights(
    base: ModelWeights,
    tuned: ModelWeights,
    rank: int | None,
    keep: float | None,
    threshold: float,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Adapter, ExtractReport]:
    """The extract of two models of one family, one layer at a time."""
    targets = paired_targets(base, tuned)
    pairs = ((f"{part}.{path}", base.weight(part, path), tuned.weight(part, path)) for part, path in targets)
    layers, report = extract_layers(pairs, rank, keep, threshold, base.family, progress, len(targets))
    return Adapter(layers, extract_metadata(base.family, base.source, tuned.source, rank, keep)), report


def check_rule(rank: int | None, keep: float | None, threshold: float) -> None:
    """Exactly one of rank and keep, each in its range; refused in one line naming the field."""
    if (rank is None) == (keep is None):
        raise ConfigError("extract: give either a rank or a kept fraction (keep), not both or neither")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"extract: rank must be a whole number of at least 1, not {rank!r}")
    if keep is not None and not 0 < keep <= 1:
        raise ConfigError(f"extract: keep must be a fraction above 0 and at most 1, not {keep!r}")
    if not threshold >= 0:
        raise ConfigError(f"extract: threshold must be 0 or more, not {threshold!r}")


def target_modules(model: torch.nn.Module, part: str) -> dict[str, torch.nn.Module]:
    """The Linear and Conv2d layers a LoRA of the family adapts in one model part, by library path."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        if part in TEXT_PARTS:
            if any(kind in f".{name}" for kind in TEXT_KINDS):
                found[canonical_text_path(name)] = module
        elif part == "transformer":  # SD3, Flux.1: the attention projections their LoRAs adapt
            if name.startswith(DENOISER_BLOCKS) and name.endswith(tuple("." + t for t in JOINT_ATTENTION)):
                found[name] = module
        elif name.startswith(DENOISER_BLOCKS) and any(k in name for k in UNET_KINDS):
            found[name] = module
    return found


def paired_targets(base: ModelWeights, tuned: ModelWeights) -> list[tuple[str, str]]:
    """(part, path) of every target layer, after checking that both models have it at one shape."""
    targets = []
    for part, model in base.parts.items():
        ours = target_modules(model, part)
        theirs = target_modules(tuned.parts[part], part) if part in tuned.parts else {}
        for path, module in ours.items():
            other = theirs.get(path)
            if other is None or other.weight.shape != module.weight.shape:
                shape = "missing" if other is None else tuple(other.weight.shape)
                raise ModelLoadError(
                    f"{tuned.source} and {base.source} differ in architecture: {part}.{path} is "
                    f"{tuple(module.weight.shape)} in the base and {shape} in the tuned model"
                )
            targets.append((part, path))
    return targets


def extract_layers(
    pairs: Iterator[tuple[str, torch.Tensor, torch.Tensor]],
    rank: int | None,
    keep: float | None,
    threshold: float,
    family: str,
    progress: Callable[[int, int], None] | None = None,
    total: int = 0,
) -> tuple[dict[str, LoraLayer], ExtractReport]:
    """Each pair's difference as a LoRA layer, one layer in memory at a time."""
    report, layers = ExtractReport(family, threshold), {}
    for done, (key, before, after) in enumerate(pairs, start=1):
        delta = after.float() - before.float()
        change = float(delta.norm() / before.float().norm().clamp_min(1e-12))
        if change <= threshold:
            report.unchanged.append(key)
        else:
            layer, kept, whole = factor(delta, rank, keep)
            layers[key] = layer
            report.layers.append(LayerFigure(key, layer.rank, math.sqrt(kept / whole), change))
            report.kept_squares, report.total_squares = (
                report.kept_squares + kept,
                report.total_squares + whole,
            )
        del delta
        if progress is not None:
            progress(done, total)
    return layers, report


def factor(delta: torch.Tensor, rank: int | None, keep: float | None) -> tuple[LoraLayer, float, float]:
    """A LoRA layer for ΔW by truncated SVD, with the kept and total squared singular values."""
    matrix = delta.flatten(1)
    whole = float(torch.linalg.vector_norm(matrix)) ** 2  # no float64 copy of a large layer
    if rank is not None and (rank + OVERSAMPLING) * 2 < min(matrix.shape):
        # Only the top `rank` directions are wanted: a randomized SVD (Halko et al.) finds them in a
        # fraction of a full SVD's time. Its factors are an orthogonal projection of ΔW, so the kept
        # and dropped squares still add up to ‖ΔW‖² and the report stays exact.
        u, s, v = torch.svd_lowrank(matrix, q=rank + OVERSAMPLING, niter=POWER_ITERATIONS)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    squares = s.double().square()
    if rank is not None:
        k = min(rank, s.numel())
    else:
        reached = (squares.cumsum(0) >= (keep**2) * whole * (1 - 1e-12)).nonzero()
        k = int(reached[0]) + 1 if len(reached) else s.numel()
    root = s[:k].sqrt()
    up = (u[:, :k] * root).contiguous()
    down = (root[:, None] * vh[:k]).contiguous()
    if delta.ndim == 4:  # a convolution: down keeps the kernel, up is 1x1
        down = down.reshape(k, *delta.shape[1:])
        up = up.reshape(*up.shape, 1, 1)
    return LoraLayer(down, up, float(k)), float(squares[:k].sum()), whole


def extract_metadata(
    family: str, base: str, tuned: str, rank: int | None, keep: float | None
) -> dict[str, str]:
    """What the adapter is for and where it came from, in sdlora's, kohya's and modelspec's keys."""
    from sdlora.models.families import family_named

    kind = family_named(family)
    rule = f"rank {rank}" if rank is not None else f"keep {keep}"
    return {
        "sdlora.family": family,
        "sdlora.extracted_from": f"{tuned} - {base} ({rule})",
        "ss_network_module": "networks.lora",
        "ss_base_model_version": kind.kohya_version,
        "ss_sd_model_name": base,
        "modelspec.architecture": kind.modelspec_architecture,
        "modelspec.implementation": kind.modelspec_implementation,
    }


def run_from_cli(
    library: AdapterLibrary, args, progress: Callable[[int, int], None] | None = None
) -> ExtractReport:
    """`adapters extract`: the parsed flags -> one extract into the library; the report back."""
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    info, report = extract_into_library(
        library, args.new_name, args.base, args.tuned, args.rank, args.keep, threshold, progress
    )
    print(info.path)
    return report
