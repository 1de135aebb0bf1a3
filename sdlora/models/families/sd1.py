"""Stable Diffusion 1.x: one CLIP text encoder (768 wide), a UNet trained by DDPM, 512 px.

Also the family of any text-conditioned UNet that is neither SD 2.x nor SDXL (the tiny test
models), and of files that name no family (kohya does the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdlora.models.families.unet import UNetFamily, encode_prompts, is_unet

if TYPE_CHECKING:  # torch loads only when a model is used: the config road stays light
    import torch

# The weights of a single file's parts in the original (LDM) layout.
UNET_KEYS, VAE_KEYS = ("model.diffusion_model.",), ("first_stage_model.", "vae.")


@dataclass(frozen=True)
class SD1Family(UNetFamily):
    """SD 1.x and the UNets laid out like it."""

    def recognises(self, denoiser_config: dict) -> bool:
        """Any text-conditioned UNet (SD 2.x and SDXL are asked first)."""
        return is_unet(denoiser_config)

    def config_folder(self, prediction_type: str) -> str:
        """Its single files are described by the SD 1.x configs."""
        return "stable-diffusion-v1"

    def claimed_by(self, metadata: dict[str, str]) -> bool:
        """kohya's sd_v1 or modelspec's stable-diffusion-v1."""
        return _claimed(metadata).startswith(("sd_v1", "stable-diffusion-v1"))

    def encode_captions(
        self, pipeline: Any, captions: list[str], time_ids: list[tuple], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The one text encoder's last hidden state; no further inputs."""
        pipeline.text_encoder.to(device)
        return encode_prompts(pipeline.tokenizer, pipeline.text_encoder, captions, device).cpu(), {}


def _claimed(metadata: dict[str, str]) -> str:
    return (metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or "").lower()


SD1 = SD1Family(
    name="sd1",
    words="SD 1.x",
    pipeline_classes=("StableDiffusionPipeline",),
    kohya_version="sd_v1",
    modelspec_architecture="stable-diffusion-v1/lora",
    # modelspec names the layer naming: SD 1.x/2.x kohya files use diffusers' paths
    modelspec_implementation="diffusers",
    kohya_text_prefixes={"text_encoder": "lora_te_"},
    single_file_kind="v1",
    single_file_parts={
        "UNet": UNET_KEYS,
        "VAE": VAE_KEYS,
        "text encoder": ("cond_stage_model.transformer.",),
    },
    # From published LoRA runs at batch 1 in bf16 (SimpleTuner on an H100: SD 1.5 at 512 px in 2.9 GiB)
    # less the bf16 weights.
    activation_gb_per_latent_pixel=1.2 / 64**2,
    lora_parameters_per_rank=200_000,
    load_options={"safety_checker": None, "requires_safety_checker": False},
    original_text_encoders=(("text_encoder", "clip", "cond_stage_model.transformer."),),
    original_layout="ldm",
)
