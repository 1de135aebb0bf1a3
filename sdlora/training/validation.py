"""Validation loss: the adapter scored on images it never trains on, at fixed noise and fixed timesteps.

The training loss says little about when to stop: each step draws its own noise and timestep, so it
is mostly noise, and it falls whether the adapter generalises or memorises. A validation loss
compares like with like instead: every evaluation noises the same held-out latents with the same
noise at the same points of the schedule (VALIDATION_POINTS quantiles, evenly spread), so two
evaluations differ only by the adapter. That noise comes from its own generator seeded from the
run's seed, never the training stream; the denoiser runs in eval mode under no_grad and the
optimizer is not touched, so training with a validation folder ends on the same tensors as without.

Held-out images (`validation_images` N): the concept images sorted by file name, N of them picked by
`random.Random(seed).sample`, so the same seed holds out the same images; at least one must remain.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from sdlora.config import DataConfig, ValidationConfig, validation_interval
from sdlora.errors import ConceptImagesError
from sdlora.models.families import Objective
from sdlora.training.data import ConceptImage, ConceptSet, load_concept_images
from sdlora.training.encode import Batch, EncodedConcepts

VALIDATION_POINTS = 4  # timesteps per image, at the quantiles (i + 0.5) / k of the schedule
ROWS_PER_CALL = 8  # denoiser rows per validation call: bounds the memory an evaluation adds
NOISE_SEED_OFFSET = 104_729  # keeps the validation noise apart from any seed the training stream uses


def hold_out(concepts: ConceptSet, count: int, seed: int) -> tuple[ConceptSet, list[ConceptImage]]:
    """The concept set without `count` seeded-chosen images, and those images (in file-name order)."""
    images = sorted(concepts.images, key=lambda c: c.path.name)
    if count >= len(images):
        raise ConceptImagesError(
            f"validation_images {count} holds out every one of the {len(images)} concept images; "
            "at least one must remain to train on (hold out fewer or use --validation-folder)"
        )
    picked = set(random.Random(seed).sample(range(len(images)), count))
    kept = [c for i, c in enumerate(images) if i not in picked]
    held = [c for i, c in enumerate(images) if i in picked]
    return replace(concepts, images=kept), held


def load_validation_folder(data: DataConfig, folder: str, bucket_step: int) -> ConceptSet:
    """The validation folder's images, captioned as the concept images are (trigger word, template)."""
    return load_concept_images(
        replace(data, images=folder), what="validation images", bucket_step=bucket_step
    )


@dataclass
class ValidationSet:
    """Encoded held-out images with the noise and schedule points they are always scored at."""

    encoded: EncodedConcepts
    seed: int
    points: int = VALIDATION_POINTS
    noise: list[torch.Tensor] = field(default_factory=list)  # one (points, C, h, w) block per image

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.seed + NOISE_SEED_OFFSET)
        self.noise = [
            torch.randn((self.points, *latent.shape), generator=generator) for latent in self.encoded.latents
        ]

    @property
    def fractions(self) -> torch.Tensor:
        """Where on the schedule each image is scored: evenly spaced quantiles, clear of both ends."""
        return (torch.arange(self.points, dtype=torch.float64) + 0.5) / self.points


@torch.no_grad()
def validation_loss(denoiser: torch.nn.Module, objective: Objective, held: ValidationSet, device) -> float:
    """The mean MSE of the objective's target over every held-out image and schedule point."""
    was_training = denoiser.training
    denoiser.eval()  # LoRA dropout off: the score depends on the weights alone
    try:
        total, rows = 0.0, 0
        for group in held.encoded.groups():  # one bucket per call: latents of one size stack
            pairs = [(i, k) for i in group for k in range(held.points)]
            for start in range(0, len(pairs), ROWS_PER_CALL):
                chunk = pairs[start : start + ROWS_PER_CALL]
                total += _rows_loss(denoiser, objective, held, chunk, device) * len(chunk)
                rows += len(chunk)
        return total / rows
    finally:
        denoiser.train(was_training)


def _rows_loss(denoiser, objective: Objective, held: ValidationSet, pairs: list[tuple[int, int]], device):
    """The mean loss of (image, schedule point) rows in one denoiser call."""
    index = torch.tensor([i for i, _ in pairs])
    batch: Batch = held.encoded.batch(index, device)
    noise = torch.stack([held.noise[i][k] for i, k in pairs])
    fractions = held.fractions[[k for _, k in pairs]]
    noised = objective.noised_at(batch.latents, noise, fractions)
    prediction = objective.predict(denoiser, noised, batch)
    return F.mse_loss(prediction.float(), noised.target.float()).item()


def evaluation_steps(config: ValidationConfig, steps: int) -> int:
    """Steps between evaluations: the setting, else validation_interval(steps)."""
    return config.validation_every or validation_interval(steps)


@dataclass
class RiseWatch:
    """The lowest validation loss so far and how many evaluations in a row stayed above it."""

    best_step: int = 0
    best_loss: float = float("inf")
    rises: int = 0

    def add(self, step: int, loss: float) -> None:
        """Take one evaluation into account."""
        if loss < self.best_loss:
            self.best_step, self.best_loss, self.rises = step, loss, 0
        else:
            self.rises += 1

    def overfitting(self, patience: int) -> bool:
        """Whether the loss has stayed above its lowest for `patience` evaluations (never when 0)."""
        return bool(patience) and self.rises >= patience
