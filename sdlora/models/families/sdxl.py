"""SDXL: two CLIP text encoders (penultimate states side by side, the second's pooled embedding),
size conditioning per image (original size, crop, target size), 1024 px."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdlora.models.families.base import Noised
from sdlora.models.families.sd1 import UNET_KEYS, VAE_KEYS, _claimed
from sdlora.models.families.unet import UNetFamily, is_unet

if TYPE_CHECKING:  # torch loads only when a model is used: the config road stays light
    import torch

PROMPT_BATCH = 16


@dataclass(frozen=True)
class SDXLFamily(UNetFamily):
    """SDXL base."""

    def recognises(self, denoiser_config: dict) -> bool:
        """The size and pooled-text conditioning only SDXL's UNet has."""
        return is_unet(denoiser_config) and denoiser_config.get("addition_embed_type") == "text_time"

    def config_folder(self, prediction_type: str) -> str:
        """Its single files are described by the SDXL base configs."""
        return "stable-diffusion-xl-v1-base"

    def claimed_by(self, metadata: dict[str, str]) -> bool:
        """Any kohya or modelspec id with 'xl' in it."""
        return "xl" in _claimed(metadata)

    def encode_captions(
        self, pipeline: Any, captions: list[str], time_ids: list[tuple], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Both encoders' states, the pooled embedding and each image's size conditioning."""
        import torch

        pipeline.text_encoder.to(device)
        pipeline.text_encoder_2.to(device)
        embeddings, pooled = encode_sdxl_prompts(pipeline, captions, device)
        return embeddings, {"pooled": pooled, "time_ids": torch.tensor(time_ids, dtype=torch.float32)}

    def call_unet(self, unet: Any, noised: Noised, batch: Any) -> torch.Tensor:
        """The UNet's prediction, given the pooled embedding and size conditioning beside the text."""
        conditions = {"text_embeds": batch.extras["pooled"], "time_ids": batch.extras["time_ids"]}
        return unet(
            noised.noisy,
            noised.timesteps,
            encoder_hidden_states=batch.embeddings,
            added_cond_kwargs=conditions,
        ).sample


def encode_sdxl_prompts(
    pipeline: Any, prompts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning as its pipeline makes it: both encoders' penultimate states side by side,
    and the second encoder's pooled embedding."""
    import torch

    embeddings, pooled = [], []
    with torch.no_grad():
        for i in range(0, len(prompts), PROMPT_BATCH):
            embeds, _, pooled_embeds, _ = pipeline.encode_prompt(
                prompts[i : i + PROMPT_BATCH],
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
            embeddings.append(embeds.float().cpu())
            pooled.append(pooled_embeds.float().cpu())
    return torch.cat(embeddings), torch.cat(pooled)


SDXL = SDXLFamily(
    name="sdxl",
    words="SDXL",
    pipeline_classes=("StableDiffusionXLPipeline",),
    kohya_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base/lora",
    # modelspec names the layer naming: SDXL's kohya files use the original (LDM) UNet paths
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    kohya_text_prefixes={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
    kohya_original_unet_names=True,
    adapter_layout="sdxl-unet",
    block_weights="sdxl-unet",
    original_layout="ldm",
    original_text_encoders=(
        ("text_encoder", "clip", "conditioner.embedders.0.transformer."),
        ("text_encoder_2", "open_clip", "conditioner.embedders.1.model."),
    ),
    single_file_kind="xl_base",
    single_file_parts={
        "UNet": UNET_KEYS,
        "VAE": VAE_KEYS,
        "first text encoder": ("conditioner.embedders.0.transformer.",),
        "second text encoder": ("conditioner.embedders.1.model.",),
    },
    # SimpleTuner on an H100: SDXL at 1024 px in 13 GiB at batch 1 in bf16, less the bf16 weights.
    activation_gb_per_latent_pixel=7.8 / 128**2,
    lora_parameters_per_rank=730_000,
    named_in_estimate=True,
)
