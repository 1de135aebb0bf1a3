"""What a run records after each step: its metrics row, the validation loss when due, checkpoint adapters,
and whether the validation loss has risen long enough to stop (the loop's `_after_step` asks it)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from fractions import Fraction

from sdlora.config import TrainConfig
from sdlora.training.checkpoint_adapters import checkpoint_adapters_folder
from sdlora.training.encode import EncodedConcepts
from sdlora.training.metrics import MetricsLog, metrics_path
from sdlora.training.validation import RiseWatch, ValidationSet, evaluation_steps


@dataclass
class Watch:
    """A run's validation set (if any), its metrics file and the lowest validation loss so far."""

    config: TrainConfig
    held: ValidationSet | None
    metrics: MetricsLog | None  # None on processes other than the main one
    rises: RiseWatch
    steps_per_epoch: Fraction = Fraction(1)  # optimizer steps per pass over the concept images

    @classmethod
    def start(
        cls, config: TrainConfig, held: ValidationSet | None, start: int, main: bool, per_epoch: Fraction
    ) -> Watch:
        """Open the metrics file (a resumed run keeps its rows up to `start` and the lowest loss in them);
        a fresh run starts without the checkpoint adapters an earlier run of its name left."""
        rises = RiseWatch()
        metrics = None
        if main:
            if not start:
                shutil.rmtree(checkpoint_adapters_folder(config.output_dir, config.name), ignore_errors=True)
            metrics = MetricsLog(metrics_path(config), start)
            for row in metrics.rows:
                if row.validation_loss is not None:
                    rises.add(row.step, row.validation_loss)
        return cls(config, held, metrics, rises, per_epoch)

    def evaluation_due(self, step: int) -> bool:
        """Whether the validation loss is computed after `step`: every N steps and at the last."""
        every = evaluation_steps(self.config.validation, self.config.steps)
        return self.held is not None and (step % every == 0 or step == self.config.steps)

    def adapter_due(self, step: int, evaluated: bool) -> bool:
        """Whether a checkpoint adapter is saved after `step`: every `adapter_every` steps and at the last,
        or (without that setting) at each evaluation, so every point of the curve can be kept."""
        every, epochs = self.config.validation.adapter_every, self.config.validation.adapter_every_epochs
        if epochs:  # the steps at which an Nth epoch is completed
            return (
                self._epochs(step) // epochs > self._epochs(step - 1) // epochs or step == self.config.steps
            )
        if every:
            return step % every == 0 or step == self.config.steps
        return evaluated

    def _epochs(self, step: int) -> int:
        """Epochs completed after `step` optimizer steps."""
        return int(step / self.steps_per_epoch)

    @property
    def saves_adapters(self) -> bool:
        validation = self.config.validation
        return bool(validation.adapter_every or validation.adapter_every_epochs or self.held is not None)

    def overfitting(self) -> bool:
        """Whether the validation loss stayed above its lowest for `stop_when_validation_rises` evaluations."""
        return self.rises.overfitting(self.config.validation.stop_when_validation_rises)


def steps_per_epoch(encoded: EncodedConcepts, batch_size: int, processes: int, accumulation: int) -> Fraction:
    """Optimizer steps per pass over the concept images, as EncodedConcepts.batch_indices draws them.

    One bucket: batches run on across epochs, so an epoch is images / batch micro-batches (a fraction);
    several buckets: each bucket's images cut into batches, the last of each smaller."""
    groups = encoded.groups()
    if len(groups) == 1:
        micro_batches = Fraction(len(encoded), batch_size)
    else:
        micro_batches = Fraction(sum(-(-len(g) // batch_size) for g in groups))
    return micro_batches / (processes * accumulation)
