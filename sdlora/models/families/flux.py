"""Flux.1 (dev, schnell): a rectified-flow transformer over packed 16-channel latents, CLIP-L + T5, 1024 px.

Latents go in as 2x2-patch tokens with (0, row, column) ids and come back unpacked; the timestep is
the sigma itself. dev is guidance-distilled: training feeds its guidance embedding one constant;
schnell has none. Sigmas are drawn uniformly (diffusers' Flux script) and shifted by the token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdlora.config import TrainConfig
from sdlora.errors import ConfigError
from sdlora.models.families.base import Noised, SamplingDefaults
from sdlora.models.families.sd1 import _claimed
from sdlora.models.families.sd3 import JOINT_ATTENTION
from sdlora.models.families.transformer import (
    PROMPT_BATCH,
    TransformerFamily,
    flow_sampling,
    parts_to,
    unwrapped_config,
)

if TYPE_CHECKING:  # torch loads only when a model is used: the config road stays light
    import torch

TEXT_PARTS = ("text_encoder", "text_encoder_2")
NATIVE_RESOLUTION = 1024  # Flux's transformer config has no sample size; both models were trained at 1024


@dataclass(frozen=True)
class FluxFamily(TransformerFamily):
    """Flux.1 dev and schnell."""

    def recognises(self, denoiser_config: dict) -> bool:
        """Flux's transformer: by class name, or a config with single-stream blocks."""
        if denoiser_config.get("_class_name"):
            return denoiser_config["_class_name"] == "FluxTransformer2DModel"
        return "num_single_layers" in denoiser_config

    def native_resolution(self, denoiser_config: dict, vae_config: dict) -> int:
        """1024 px for dev and schnell."""
        return NATIVE_RESOLUTION

    def claimed_by(self, metadata: dict[str, str]) -> bool:
        """kohya's flux1 or modelspec's flux-1-dev / flux-1-schnell."""
        return _claimed(metadata).startswith(("flux", "flux-1"))

    def trained_with(self, config: TrainConfig) -> FluxFamily:
        """As every transformer family, and T5 stays: Flux.1's text tokens all come from it."""
        if config.drop_t5:
            raise ConfigError("drop_t5: Flux.1 reads every text token from T5 and cannot train without it")
        return super().trained_with(config)

    def variant(self, denoiser_config: dict) -> str:
        """'dev' (guidance embedding) or 'schnell' (none)."""
        return "dev" if denoiser_config.get("guidance_embeds") else "schnell"

    def sampling_defaults(self, denoiser_config: dict) -> SamplingDefaults:
        """dev: 28 steps at guidance 3.5 (FLUX.1-dev's card and FluxPipeline); schnell: 4 steps, no guidance
        (FLUX.1-schnell's card: timestep-distilled, guidance 0). Neither takes a negative prompt (no CFG)."""
        if self.variant(denoiser_config) == "schnell":
            return flow_sampling(4, 0.0, guidance_used=False, negative_prompt_used=False)
        return flow_sampling(28, 3.5, negative_prompt_used=False)

    def architecture_of(self, denoiser_config: dict) -> str:
        """flux-1-dev/lora or flux-1-schnell/lora, as kohya's sai_model_spec names them."""
        return f"flux-1-{self.variant(denoiser_config)}/lora"

    def encode_captions(
        self, pipeline: Any, captions: list[str], time_ids: list[tuple], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The pipeline's own prompt encoding: T5's states and CLIP-L's pooled embedding."""
        import torch

        parts_to(pipeline, device, TEXT_PARTS)
        embeddings, pooled = [], []
        with torch.no_grad():
            for i in range(0, len(captions), PROMPT_BATCH):
                embeds, pooled_embeds, _ = pipeline.encode_prompt(
                    captions[i : i + PROMPT_BATCH],
                    None,
                    device=device,
                    num_images_per_prompt=1,
                    max_sequence_length=self.max_sequence_length,
                )
                embeddings.append(embeds.float().cpu())
                pooled.append(pooled_embeds.float().cpu())
        return torch.cat(embeddings), {"pooled": torch.cat(pooled)}

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """One token per 2x2 latent patch: Flux's shift grows with it."""
        from sdlora.training.flow_matching import flux_image_seq_len

        return flux_image_seq_len(latents.shape[-2], latents.shape[-1])

    def latents_for_vae(self, pipeline: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Flux's 'latent' output is its packed tokens: unpacked to the image's latent grid first."""
        unpacked = pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
        return super().latents_for_vae(pipeline, unpacked, height, width)

    def call_transformer(self, transformer: Any, noised: Noised, batch: Any) -> torch.Tensor:
        """The transformer's velocity: packed latents, sigma as the timestep, dev's guidance, position ids."""
        from sdlora.training import flow_matching as fm

        noisy = noised.noisy
        height, width = noisy.shape[-2:]
        config = unwrapped_config(transformer)
        sigmas = noised.timesteps / 1000.0  # flow_sample's timesteps are sigma x num_train_timesteps
        guidance = (
            fm.flux_guidance(noisy.shape[0], self.guidance, noisy.device) if config.guidance_embeds else None
        )
        tokens = transformer(
            hidden_states=fm.pack_flux_latents(noisy),
            timestep=sigmas.to(noisy.dtype),
            guidance=guidance,
            pooled_projections=batch.extras["pooled"],
            encoder_hidden_states=batch.embeddings,
            txt_ids=fm.flux_text_ids(batch.embeddings.shape[1], noisy.device, noisy.dtype),
            img_ids=fm.flux_image_ids(height, width, noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
        return fm.unpack_flux_latents(tokens, height, width)


FLUX = FluxFamily(
    name="flux",
    words="Flux.1",
    pipeline_classes=("FluxPipeline",),
    block_weights="flux-double-single",
    original_layout="bfl",  # as flux1-dev.safetensors: the transformer alone
    original_parts=("transformer",),
    kohya_version="flux1",
    modelspec_architecture="flux-1-dev/lora",
    modelspec_implementation="https://github.com/black-forest-labs/flux",
    kohya_text_prefixes={"text_encoder": "lora_te1_"},
    single_file_kind="flux-dev",
    single_file_parts={},
    # The UNet-style numbers, for Flux.1 dev at 1024 px: the estimate uses the transformer's below.
    activation_gb_per_latent_pixel=6.0 / 128**2,
    # 19 double blocks x 8 projections + 38 single blocks x 3 (no output projection), width 3072 (in + out)
    lora_parameters_per_rank=(19 * 8 + 38 * 3) * 2 * 3072,
    estimate_variants=(("flux-1-dev", 11_901_408_320, (19 * 8 + 38 * 3) * 2 * 3072),),  # schnell: same sizes
    # bf16 autocast, rank-16 attention LoRA, saved tensors counted by autograd hooks (bench/real_size.py)
    activation_bytes_per_token_width_block=35.0,
    estimate_text_tokens=77,  # T5 at the default max_sequence_length
    text_encoder_parameters=123_060_480 + 4_762_310_656,  # CLIP-L, T5-XXL encoder
    lora_targets=JOINT_ATTENTION,  # the single blocks' to_q/to_k/to_v share these names
    named_in_estimate=True,
    single_file_key="double_blocks.0.img_attn.qkv.weight",
    default_weighting="uniform",
)
