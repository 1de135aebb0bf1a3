"""Adapters saved along a run, to compare and keep one: `<name>-step<N>.safetensors`.

Unlike resumable checkpoints (optimizer and RNG state), these are real adapter files, written as the
finished adapter is (kohya format, full metadata) with their validation loss in the header
(`sdlora.validation_loss`). They live in the run's folder, `<output>/.runs/<name>/adapters/`, so the
library lists only the adapter itself (AUTOMATIC1111 and ComfyUI skip hidden folders too), and they
go when the adapter is deleted. `keep_checkpoint` copies one over `<name>.safetensors`; the others
stay until the adapter is deleted.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sdlora.config import check_adapter_name
from sdlora.errors import SdloraError
from sdlora.library.formats import atomic_write
from sdlora.library.formats.files import read_metadata

VALIDATION_KEY = "sdlora.validation_loss"
BEST_KEY = "sdlora.best_validation_step"  # written into the adapter when the best checkpoint was kept


def checkpoint_adapters_folder(output_dir: str | Path, name: str) -> Path:
    """Where a run's checkpoint adapters go."""
    return Path(output_dir) / ".runs" / name / "adapters"


def checkpoint_adapter_path(output_dir: str | Path, name: str, step: int) -> Path:
    """The file of the adapter saved at `step`."""
    return checkpoint_adapters_folder(output_dir, name) / f"{name}-step{step}.safetensors"


@dataclass(frozen=True)
class CheckpointAdapter:
    step: int
    path: Path
    validation_loss: float | None


def list_checkpoint_adapters(output_dir: str | Path, name: str) -> list[CheckpointAdapter]:
    """The adapters a run saved along the way, by step (headers only: no torch)."""
    folder = checkpoint_adapters_folder(output_dir, name)
    if not folder.is_dir():
        return []
    pattern = re.compile(re.escape(name) + r"-step(\d+)\.safetensors")
    found = []
    for path in folder.iterdir():
        match = pattern.fullmatch(path.name)
        if match:
            loss = read_metadata(path).get(VALIDATION_KEY, "")
            found.append(CheckpointAdapter(int(match.group(1)), path, float(loss) if loss else None))
    return sorted(found, key=lambda c: c.step)


def best_checkpoint(checkpoints: list[CheckpointAdapter]) -> CheckpointAdapter | None:
    """The checkpoint of the lowest validation loss (the earliest of equals), or None without any."""
    scored = [c for c in checkpoints if c.validation_loss is not None]
    return min(scored, key=lambda c: (c.validation_loss, c.step)) if scored else None


def find_checkpoint(output_dir: str | Path, name: str, step: int) -> CheckpointAdapter:
    """The checkpoint adapter of `name` at `step`; a one-line error names the steps there are."""
    check_adapter_name(name)
    checkpoints = list_checkpoint_adapters(output_dir, name)
    for checkpoint in checkpoints:
        if checkpoint.step == step:
            return checkpoint
    steps = ", ".join(str(c.step) for c in checkpoints)
    raise SdloraError(
        f"{name!r} has no checkpoint adapter at step {step}; "
        + (f"its steps: {steps}" if steps else "it saved none (train with --adapter-every N or validation)")
    )


def keep_checkpoint(output_dir: str | Path, name: str, step: int, target: Path | None = None) -> Path:
    """Make the checkpoint of `step` the adapter (`<output>/<name>.safetensors` unless `target`), atomically."""
    checkpoint = find_checkpoint(output_dir, name, step)
    target = target or Path(output_dir) / f"{name}.safetensors"
    atomic_write(target, lambda tmp: shutil.copyfile(checkpoint.path, tmp))
    return target


def keep_best(output_dir: str | Path, name: str, target: Path, stopped_at: int, rises: int) -> str:
    """Make the lowest-validation checkpoint adapter the adapter at `target`; the one line that says so."""
    best = best_checkpoint(list_checkpoint_adapters(output_dir, name))
    if best is None:
        return ""
    keep_checkpoint(output_dir, name, best.step, target)
    return (
        f"validation loss rose for {rises} evaluations after step {best.step} "
        f"(lowest {best.validation_loss:.4f}); stopped at step {stopped_at} and kept step {best.step} "
        "as the adapter"
    )
