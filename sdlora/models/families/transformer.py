"""What the transformer families (SD3.5, Flux.1) share: flow-matching training and cached prompts.

The objective is flow_matching.py's: a batch lies on the line from the clean latents to noise at a
sigma drawn by the weighting scheme and shifted as the model's scheduler shifts; the transformer
answers the velocity noise - x. Each family says how its transformer is called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdlora.config import FLUX_TRAINING_GUIDANCE, TrainConfig
from sdlora.errors import ConfigError
from sdlora.models.families.base import Family, Noised, SamplingDefaults

if TYPE_CHECKING:  # torch loads only when a model is used: the config road stays light
    import torch

    from sdlora.training.flow_matching import TimestepSampling

# Tokens of T5 conditioning per caption: TrainConfig.max_sequence_length's default (the pipelines allow
# up to 512; 77 keeps the cache and steps small).
MAX_SEQUENCE_LENGTH = TrainConfig.__dataclass_fields__["max_sequence_length"].default
# DDPM's settings: they name a noise schedule flow matching does not have.
DDPM_ONLY = {
    "min_snr_gamma": "Min-SNR weighting is for DDPM noise schedules",
    "noise_offset": "noise offset shifts DDPM noise",
}
PROMPT_BATCH = 16
# Their pipelines draw with their own FlowMatchEulerDiscreteScheduler: Euler steps along the flow
# (Forge and ComfyUI call it Euler too). The UNet samplers do not apply to a flow-matching model.
FLOW_SAMPLERS = ("Euler",)


def flow_sampling(steps: int, guidance: float, **uses: bool) -> SamplingDefaults:
    """Sampling defaults for a flow-matching model: its own Euler sampler only."""
    return SamplingDefaults(steps, guidance, FLOW_SAMPLERS, **uses)


@dataclass(frozen=True)
class FlowObjective:
    """Flow matching over the base model's own scheduler: sigmas by a weighting scheme, velocity targets."""

    scheduler: Any  # a diffusers FlowMatchEulerDiscreteScheduler
    sampling: TimestepSampling
    call: Callable[[Any, Noised, Any], torch.Tensor]  # the family's transformer call
    image_seq_len: Callable[[torch.Tensor], int | None] = lambda latents: None  # the shift's token count

    def noised(self, latents: torch.Tensor, generator: torch.Generator) -> Noised:
        """The batch at one drawn sigma per sample; the draws are fixed by `generator` alone."""
        from sdlora.training.flow_matching import flow_sample

        sample = flow_sample(latents, self.scheduler, self.sampling, generator, self.image_seq_len(latents))
        return Noised(sample.noisy, sample.timesteps, sample.target)

    def noised_at(self, latents: torch.Tensor, noise: torch.Tensor, fractions: torch.Tensor) -> Noised:
        """The batch with the given noise at fixed sigmas (fractions in (0, 1], shifted as the model's
        scheduler shifts), for a validation loss that compares like with like."""
        from sdlora.training.flow_matching import noisy_and_target, shifted_sigmas

        sigmas = shifted_sigmas(self.scheduler, fractions.clamp(1e-5, 1.0), self.image_seq_len(latents))
        sigmas = sigmas.to(latents.device)
        noisy, target = noisy_and_target(latents, noise.to(latents), sigmas)
        return Noised(noisy, sigmas * self.scheduler.config.num_train_timesteps, target)

    def predict(self, denoiser: Any, noised: Noised, batch: Any) -> torch.Tensor:
        """The transformer's velocity for a noised batch, called the family's way."""
        return self.call(denoiser, noised, batch)

    def weights(self, noised: Noised) -> torch.Tensor | None:
        """The scheme's loss weight per sample (sigma_sqrt, cosmap), or None where the loss is flat."""
        if self.sampling.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigmas = noised.timesteps.float() / self.scheduler.config.num_train_timesteps
        return compute_loss_weighting_for_sd3(self.sampling.diffusers_name, sigmas)


def flow_objective(
    scheduler_config: Any,
    weighting_scheme: str,
    call: Callable[[Any, Noised, Any], torch.Tensor],
    image_seq_len: Callable[[torch.Tensor], int | None] | None = None,
) -> FlowObjective:
    """A flow-matching objective over the base model's own scheduler and shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sdlora.training.flow_matching import TimestepSampling

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    extra = {"image_seq_len": image_seq_len} if image_seq_len else {}
    return FlowObjective(scheduler, TimestepSampling(weighting_scheme), call, **extra)


def unwrapped_config(denoiser: Any) -> Any:
    """The transformer's config, through any distributed wrapper around it."""
    return getattr(denoiser, "module", denoiser).config


def parts_to(pipeline: Any, device: torch.device, parts: tuple[str, ...]) -> None:
    """Move the text encoders a family's prompts need to `device` (absent ones are skipped)."""
    for part in parts:
        module = getattr(pipeline, part, None)
        if module is not None:
            module.to(device)


@dataclass(frozen=True)
class TransformerFamily(Family):
    """A family whose denoiser is a diffusion transformer trained by flow matching."""

    denoiser: str = "transformer"
    adapter_layout: str = "transformer"
    bucket_latent_step: int = 2  # the transformer's 2x2 patches: buckets in steps of VAE factor x 2
    prediction_type: str = "flow"
    own_scheduler_only: bool = True
    default_weighting: str = "logit_normal"
    # A header key (less any "model.diffusion_model." prefix) that marks its single files in the original
    # layout: BFL's transformer-only Flux files, Stability's SD3.5 all-in-one files.
    single_file_key: str = ""
    # A run's settings (TrainConfig's fields of these names), set by trained_with:
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    weighting_scheme: str = "default"
    guidance: float = FLUX_TRAINING_GUIDANCE
    drop_t5: bool = False

    def trained_with(self, config: TrainConfig) -> TransformerFamily:
        """This family with the run's text length, weighting, guidance and T5 choice; DDPM settings refused."""
        for name, why in DDPM_ONLY.items():
            value = getattr(config, name)
            if value:
                raise ConfigError(
                    f"{name} {value:g}: {why}; {self.words} trains by flow matching, set it to 0"
                )
        return dataclasses.replace(
            self,
            max_sequence_length=config.max_sequence_length,
            weighting_scheme=config.weighting_scheme,
            guidance=config.guidance,
            drop_t5=config.drop_t5,
        )

    @property
    def weighting(self) -> str:
        """The weighting scheme training uses: the run's, or the family's own for "default"."""
        return self.default_weighting if self.weighting_scheme == "default" else self.weighting_scheme

    def config_folder(self, prediction_type: str) -> str:
        """No single-file configs ship for these: a single file's other parts come from a diffusers folder."""
        from sdlora.errors import ModelLoadError

        raise ModelLoadError(f"{self.words} single files take their configs from a diffusers folder")

    def call_transformer(self, transformer: Any, noised: Noised, batch: Any) -> torch.Tensor:
        """The transformer's velocity for a noised batch (the family's way)."""
        raise NotImplementedError

    def image_seq_len(self, latents: torch.Tensor) -> int | None:
        """The token count a resolution-dependent shift reads; None where the shift is fixed."""
        return None

    def objective(
        self,
        scheduler_config: Any,
        prediction_type: str,
        min_snr_gamma: float = 0.0,
        noise_offset: float = 0.0,
    ) -> FlowObjective:
        """Flow matching as the model was trained (Min-SNR and noise offset are DDPM's and do not apply)."""
        return flow_objective(scheduler_config, self.weighting, self.call_transformer, self.image_seq_len)
