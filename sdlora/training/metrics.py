"""A run's figures on disk: `<output>/<name>.metrics.csv`, one row per step, and accelerate's trackers.

The CSV sits beside the adapter (columns step, loss, validation_loss, learning_rate; the validation
cell is empty between evaluations). A row is appended and flushed as each step ends, so a killed run
keeps what it did; a resumed run first drops the rows after the step it resumes from, so no step is
written twice. TensorBoard and wandb, when asked for (`log_with`), get the same figures and the
previews through accelerate's trackers.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdlora.config import TrainConfig
from sdlora.errors import ConfigError
from sdlora.library.formats import atomic_write_text

COLUMNS = ("step", "loss", "validation_loss", "learning_rate")


def metrics_path(config: TrainConfig) -> Path:
    """Where a run's figures go: <output>/<name>.metrics.csv, beside the adapter."""
    return Path(config.output_dir) / f"{config.name}.metrics.csv"


@dataclass(frozen=True)
class MetricsRow:
    step: int
    loss: float
    validation_loss: float | None
    learning_rate: float


def read_metrics(path: Path) -> list[MetricsRow]:
    """The rows of a metrics file (none when it is missing)."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [
            MetricsRow(
                int(row["step"]),
                float(row["loss"]),
                float(row["validation_loss"]) if row["validation_loss"] else None,
                float(row["learning_rate"]),
            )
            for row in csv.DictReader(handle)
        ]


class MetricsLog:
    """Appends one row per step to the metrics file (kept up to `start` when a run resumes)."""

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        kept = [row for row in read_metrics(path) if row.step <= start] if start else []
        lines = [",".join(COLUMNS)] + [_line(row) for row in kept]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(lines) + "\n")
        self.rows = kept

    def add(self, row: MetricsRow) -> None:
        """Append one step's figures and flush them to disk."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(_line(row) + "\n")
        self.rows.append(row)


def _line(row: MetricsRow) -> str:
    validation = "" if row.validation_loss is None else repr(row.validation_loss)
    return f"{row.step},{row.loss!r},{validation},{row.learning_rate!r}"


def check_tracker(config: TrainConfig) -> None:
    """Refuse, before anything loads, a tracker whose package is not installed here."""
    import importlib.util

    name = config.validation.log_with
    if name and importlib.util.find_spec(name) is None:
        raise ConfigError(f"log_with {name}: the {name} package is not installed; pip install {name}")


def start_trackers(accelerator, config: TrainConfig) -> None:
    """Open the asked-for trackers (no-op without `log_with`), with the run's settings as hyperparameters."""
    if config.validation.log_with:
        accelerator.init_trackers(config.name, config=_hyperparameters(config))


def log_step(accelerator, config: TrainConfig, row: MetricsRow) -> None:
    """Send one step's figures to the trackers."""
    if not config.validation.log_with:
        return
    values = {"loss": row.loss, "learning_rate": row.learning_rate}
    if row.validation_loss is not None:
        values["validation_loss"] = row.validation_loss
    accelerator.log(values, step=row.step)


def log_preview(accelerator, config: TrainConfig, images, step: int) -> None:
    """Send preview images to the trackers, in the form each one takes."""
    if not config.validation.log_with:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            pixels = np.stack([np.asarray(image.convert("RGB")) for image in images])
            tracker.log_images({"preview": pixels}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({"preview": list(images)}, step=step)


def _hyperparameters(config: TrainConfig) -> dict:
    """The settings as flat scalars (what TensorBoard's hparams accept): lists become text."""
    flat: dict = {}

    def walk(values: dict, prefix: str) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (int, float, str, bool)) and not (
                isinstance(value, float) and not math.isfinite(value)
            ):
                flat[prefix + key] = value
            else:
                flat[prefix + key] = str(value)

    walk(config.to_dict(), "")
    return flat
