"""What the UNet families (SD 1.x, SD 2.x, SDXL) share: the UNet's config and DDPM training.

A batch is noised at a random step of the training schedule; the UNet answers the noise
(epsilon) or the velocity v. Min-SNR weighting (Hang et al. 2023) damps the easy low-noise steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdlora.errors import ConfigError
from sdlora.models.families.base import Family, Noised

if TYPE_CHECKING:  # torch loads only when a model is used: the config road stays light
    import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class DdpmObjective:
    """Epsilon or v targets from a DDPM schedule, with optional noise offset and Min-SNR weighting."""

    scheduler: Any  # a diffusers DDPMScheduler
    prediction_type: str
    call: Callable[[Any, Noised, Any], torch.Tensor]  # the family's denoiser call
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0

    def noised(self, latents: torch.Tensor, generator: torch.Generator) -> Noised:
        """Noise at one random step per sample; the draws are fixed by `generator` alone."""
        import torch

        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"prediction type {self.prediction_type!r} is not supported (epsilon or v_prediction)"
            )
        batch = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        if self.noise_offset:
            offset = torch.randn((batch, latents.shape[1], 1, 1), generator=generator)
            noise = noise + self.noise_offset * offset.to(noise)
        timesteps = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (batch,), generator=generator
        ).to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return Noised(noisy, timesteps, target)

    def noised_at(self, latents: torch.Tensor, noise: torch.Tensor, fractions: torch.Tensor) -> Noised:
        """The batch with the given noise at fixed points of the schedule (fractions in [0, 1]: first to
        last training step), for a validation loss that compares like with like; no noise offset."""
        last = self.scheduler.config.num_train_timesteps - 1
        timesteps = (fractions.double() * last).round().long().to(latents.device)
        noise = noise.to(latents)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            return Noised(noisy, timesteps, self.scheduler.get_velocity(latents, noise, timesteps))
        return Noised(noisy, timesteps, noise)

    def predict(self, denoiser: Any, noised: Noised, batch: Any) -> torch.Tensor:
        """The denoiser's answer for a noised batch, called the family's way."""
        return self.call(denoiser, noised, batch)

    def weights(self, noised: Noised) -> torch.Tensor | None:
        """Min-SNR-gamma weights per sample (v targets divide by SNR+1), or None when it is off."""
        if not self.min_snr_gamma:
            return None
        import torch
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, noised.timesteps)
        divisor = snr + 1 if self.prediction_type == "v_prediction" else snr
        return torch.clamp(snr, max=self.min_snr_gamma) / divisor


def ddpm_objective(
    scheduler_config: Any,
    prediction_type: str,
    call: Callable[[Any, Noised, Any], torch.Tensor],
    min_snr_gamma: float = 0.0,
    noise_offset: float = 0.0,
) -> DdpmObjective:
    """A DDPM objective over the base model's own training schedule."""
    from diffusers import DDPMScheduler

    return DdpmObjective(
        DDPMScheduler.from_config(scheduler_config), prediction_type, call, min_snr_gamma, noise_offset
    )


def cross_attention_width(unet_config: dict) -> int | None:
    """The width of the text conditioning a UNet attends to (a list per block in some configs)."""
    cross = unet_config.get("cross_attention_dim")
    if cross is None:
        return None
    return int(cross[0] if isinstance(cross, (list, tuple)) else cross)


def is_unet(config: dict) -> bool:
    """A text-conditioned UNet's config (a loaded model's config carries no class name)."""
    return config.get("_class_name", "UNet2DConditionModel") == "UNet2DConditionModel" and (
        cross_attention_width(config) is not None
    )


@dataclass(frozen=True)
class UNetFamily(Family):
    """A family whose denoiser is a UNet trained by DDPM."""

    def native_resolution(self, denoiser_config: dict, vae_config: dict) -> int:
        """The UNet's latent size times the VAE's downscaling."""
        return int(denoiser_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)

    def call_unet(self, unet: Any, noised: Noised, batch: Any) -> torch.Tensor:
        """The UNet's prediction for a noised batch conditioned on its text embeddings."""
        return unet(noised.noisy, noised.timesteps, encoder_hidden_states=batch.embeddings).sample

    def objective(
        self,
        scheduler_config: Any,
        prediction_type: str,
        min_snr_gamma: float = 0.0,
        noise_offset: float = 0.0,
    ) -> DdpmObjective:
        """DDPM over the base model's schedule, epsilon or v as the model was trained."""
        return ddpm_objective(scheduler_config, prediction_type, self.call_unet, min_snr_gamma, noise_offset)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Text embeddings as Stable Diffusion's pipeline makes them (last hidden state, padded to max length)."""
    import torch

    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(device))[0].float()
