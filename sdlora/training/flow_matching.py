"""The flow-matching objective SD3 and Flux.1 were trained with, as pure functions.

A training sample is a point on the straight line from the clean latents x (sigma 0) to pure
noise (sigma 1): noisy = (1 - sigma)·x + sigma·noise. The transformer predicts the velocity
along that line, noise - x, which is exactly what the flow-matching Euler sampler integrates
(`FlowMatchEulerDiscreteScheduler.step` moves by (sigma_next - sigma)·prediction), so one step
from `noisy` to sigma 0 with the true velocity lands on x.

Sigmas are drawn by a weighting scheme (diffusers' `compute_density_for_timestep_sampling`: SD3
uses logit-normal, Flux uniform or logit-normal) and then bent by the model's own timestep
shift, taken from its scheduler: SD3's fixed shift of 3.0, Flux's shift that grows with the
image's token count. All randomness comes from the generator passed in, so the loop's noise
stays a pure function of (seed, step, process).

Flux works on packed latents: 2x2 latent patches become one token, with (0, row, column) ids;
FluxPipeline's own static helpers do the packing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from sdlora.config import FLUX_TRAINING_GUIDANCE, WEIGHTING_SCHEMES  # noqa: F401 - read here too
from sdlora.errors import ConfigError

# How sigmas are drawn and losses weighted (config.WEIGHTING_SCHEMES, diffusers' script names):
# logit_normal and mode sample non-uniform sigmas with a flat loss; uniform draws sigmas evenly,
# sigma_sqrt and cosmap draw them evenly and weight the loss instead.
SD3_WEIGHTING = "logit_normal"  # diffusers' train_dreambooth_lora_sd3.py and SD3 paper
FLUX_WEIGHTING = "uniform"  # diffusers' train_dreambooth_lora_flux.py ("none")


@dataclass(frozen=True)
class TimestepSampling:
    """How training draws sigmas: the weighting scheme and its parameters (diffusers' defaults)."""

    weighting_scheme: str = SD3_WEIGHTING  # one of WEIGHTING_SCHEMES
    logit_mean: float = 0.0  # logit_normal: mean of the normal before the sigmoid
    logit_std: float = 1.0  # logit_normal: its standard deviation
    mode_scale: float = 1.29  # mode: how strongly mid-range sigmas are favoured

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ConfigError(
                f"weighting_scheme {self.weighting_scheme!r} is unknown; use one of {', '.join(WEIGHTING_SCHEMES)}"
            )
        if self.logit_std <= 0:
            raise ConfigError(f"logit_std must be above 0, not {self.logit_std}")

    @property
    def diffusers_name(self) -> str:
        return "none" if self.weighting_scheme == "uniform" else self.weighting_scheme


@dataclass
class FlowSample:
    """One batch's training sample: the noisy latents, the velocity target and where on the line they lie."""

    noisy: torch.Tensor  # (1 - sigma)·x + sigma·noise, shaped like the latents
    target: torch.Tensor  # noise - x
    sigmas: torch.Tensor  # (batch,), after the model's shift
    timesteps: (
        torch.Tensor
    )  # sigma x the scheduler's num_train_timesteps (SD3 takes these; Flux takes sigmas)


def shift_mu(scheduler_config, image_seq_len: int | None) -> float | None:
    """The resolution-dependent shift's mu for models whose scheduler shifts by token count (Flux); else None."""
    if not scheduler_config.get("use_dynamic_shifting"):
        return None
    if image_seq_len is None:
        raise ValueError("this scheduler shifts by resolution: pass the image's token count")
    return calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )


def shifted_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler, sigmas: torch.Tensor, image_seq_len: int | None = None
) -> torch.Tensor:
    """Unshifted sigmas in (0, 1] through the scheduler's own shift, as the pipeline shifts its schedule."""
    own = copy.deepcopy(
        scheduler
    )  # set_timesteps changes the scheduler's state; the caller's stays as it was
    own.set_timesteps(sigmas=sigmas.double().cpu().numpy(), mu=shift_mu(scheduler.config, image_seq_len))
    return own.sigmas[:-1].to(torch.float32)  # the scheduler appends the terminal sigma 0


def sample_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler,
    batch_size: int,
    sampling: TimestepSampling,
    generator: torch.Generator,
    image_seq_len: int | None = None,
) -> torch.Tensor:
    """`batch_size` training sigmas: drawn by the weighting scheme, then shifted as the model's scheduler shifts."""
    u = compute_density_for_timestep_sampling(
        weighting_scheme=sampling.diffusers_name,
        batch_size=batch_size,
        logit_mean=sampling.logit_mean,
        logit_std=sampling.logit_std,
        mode_scale=sampling.mode_scale,
        generator=generator,
    )
    # 0 would be a clean image with nothing to learn, and the scheduler's shift divides by nothing there
    return shifted_sigmas(scheduler, u.clamp(1e-5, 1.0), image_seq_len)


def noisy_and_target(
    latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The point at each sigma on the line from the latents to the noise, and the velocity along it."""
    s = sigmas.to(latents.device, torch.float32).reshape(-1, *([1] * (latents.ndim - 1)))
    noisy = (1.0 - s) * latents.float() + s * noise.float()
    return noisy.to(latents.dtype), (noise.float() - latents.float()).to(latents.dtype)


def flow_sample(
    latents: torch.Tensor,
    scheduler: FlowMatchEulerDiscreteScheduler,
    sampling: TimestepSampling,
    generator: torch.Generator,
    image_seq_len: int | None = None,
) -> FlowSample:
    """Noise (drawn on the CPU, so every device draws the same), sigmas, noisy latents and target for a batch."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    sigmas = sample_sigmas(scheduler, latents.shape[0], sampling, generator, image_seq_len).to(latents.device)
    noisy, target = noisy_and_target(latents, noise, sigmas)
    return FlowSample(noisy, target, sigmas, sigmas * scheduler.config.num_train_timesteps)


def flow_loss(prediction: torch.Tensor, sample: FlowSample, sampling: TimestepSampling) -> torch.Tensor:
    """Per-sample MSE between the predicted and true velocity, weighted as the scheme says; shape (batch,)."""
    weight = compute_loss_weighting_for_sd3(sampling.diffusers_name, sample.sigmas.float())
    error = (prediction.float() - sample.target.float()) ** 2
    return (weight.reshape(-1, *([1] * (error.ndim - 1))) * error).flatten(1).mean(dim=1)


def flux_image_seq_len(latent_height: int, latent_width: int) -> int:
    """How many tokens Flux sees for latents of this size: one per 2x2 patch (what its shift depends on)."""
    return (latent_height // 2) * (latent_width // 2)


def pack_flux_latents(latents: torch.Tensor) -> torch.Tensor:
    """(batch, 16, h, w) latents as Flux's (batch, h/2·w/2, 64) token sequence."""
    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def unpack_flux_latents(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Flux's token sequence back to (batch, 16, h, w) latents."""
    # _unpack_latents takes pixel sizes and the VAE factor; with a factor of 1 they are latent sizes
    return FluxPipeline._unpack_latents(tokens, latent_height, latent_width, 1)


def flux_image_ids(latent_height: int, latent_width: int, device, dtype) -> torch.Tensor:
    """The (row, column) position ids of each packed token, as FluxPipeline builds them."""
    return FluxPipeline._prepare_latent_image_ids(1, latent_height // 2, latent_width // 2, device, dtype)


def flux_text_ids(sequence_length: int, device, dtype) -> torch.Tensor:
    """Text tokens all sit at position (0, 0, 0), as FluxPipeline.encode_prompt gives them."""
    return torch.zeros(sequence_length, 3, device=device, dtype=dtype)


def flux_guidance(batch_size: int, guidance: float, device) -> torch.Tensor:
    """The constant guidance value fed to Flux dev's guidance embedding, one per sample."""
    return torch.full((batch_size,), float(guidance), device=device, dtype=torch.float32)
