"""One training step: micro-batches drawn from the cache, the family's loss, the optimizer.

Everything a step needs travels in one `Run`. The loss asks the family's objective how a batch
is noised, what the target is, how each sample is weighted and how the denoiser is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from sdlora.config import TrainConfig
from sdlora.models.families import Objective
from sdlora.training.encode import Batch, EncodedConcepts
from sdlora.training.lora import trainable_parameters


@dataclass(frozen=True)
class Run:
    """The inputs of every training step, together."""

    config: TrainConfig
    accelerator: Accelerator
    denoiser: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: Any
    objective: Objective  # the family's: how a batch is noised, the target, the weighting, the call
    encoded: EncodedConcepts
    encoded_prior: EncodedConcepts | None


def optimizer_step(run: Run, step: int) -> float:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the mean loss.

    With regularisation images, each micro-batch also holds as many of them as concept
    images (DreamBooth's prior preservation), weighted by `prior_loss_weight`.
    """
    config, accelerator = run.config, run.accelerator
    losses = []
    for micro in range(config.gradient_accumulation_steps):
        # Noise, timesteps and image order are a pure function of (seed, step, process):
        # a resumed run draws exactly what an uninterrupted one would.
        generator = torch.Generator().manual_seed(
            ((config.seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + accelerator.process_index
        )
        micro_batch = step * config.gradient_accumulation_steps + micro
        batch = _micro_batch(run, run.encoded, config.seed, micro_batch)
        prior = (
            _micro_batch(run, run.encoded_prior, config.seed + 1, micro_batch) if run.encoded_prior else None
        )
        with accelerator.accumulate(run.denoiser):
            loss = batch_loss(run, batch, prior, generator)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable_parameters(run.denoiser), config.max_grad_norm)
            run.optimizer.step()
            run.lr_schedule.step()
            run.optimizer.zero_grad(set_to_none=True)
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
    return sum(losses) / len(losses)


def _micro_batch(run: Run, encoded: EncodedConcepts, seed: int, micro_batch: int) -> Batch:
    """This process's share of one micro-batch of cached examples, on its device."""
    accelerator = run.accelerator
    index = encoded.batch_indices(
        seed, micro_batch, run.config.batch_size, accelerator.process_index, accelerator.num_processes
    )
    return encoded.batch(index, accelerator.device)


def batch_loss(run: Run, batch: Batch, prior: Batch | None, generator: torch.Generator) -> torch.Tensor:
    """The concept batch's loss plus the weighted loss of its regularisation rows: one denoiser call when
    both are the same size, two when their buckets differ (the sum is the same)."""
    weight = run.config.prior_loss_weight
    if prior is None:
        return diffusion_loss(run.denoiser, run.objective, batch, generator)
    if batch.fits(prior):
        rows = batch.cat(prior)
        return diffusion_loss(run.denoiser, run.objective, rows, generator, len(prior.latents), weight)
    concept = diffusion_loss(run.denoiser, run.objective, batch, generator)
    return concept + weight * diffusion_loss(run.denoiser, run.objective, prior, generator)


def diffusion_loss(
    denoiser,
    objective: Objective,
    batch: Batch,
    generator: torch.Generator,
    prior_samples: int = 0,
    prior_loss_weight: float = 1.0,
) -> torch.Tensor:
    """MSE between the denoiser's prediction and the family objective's target, weighted as it says.

    The last `prior_samples` rows are regularisation images: their mean loss is added with
    weight `prior_loss_weight` to the mean loss of the others.
    """
    noised = objective.noised(batch.latents, generator)
    prediction = objective.predict(denoiser, noised, batch)
    per_sample = F.mse_loss(prediction.float(), noised.target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    weights = objective.weights(noised)
    if weights is not None:
        per_sample = per_sample * weights
    if prior_samples:
        concept, prior = per_sample[:-prior_samples], per_sample[-prior_samples:]
        return concept.mean() + prior_loss_weight * prior.mean()
    return per_sample.mean()
