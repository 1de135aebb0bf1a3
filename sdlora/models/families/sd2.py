"""Stable Diffusion 2.x: an OpenCLIP text encoder 1024 wide; 512 px (epsilon) or 768 px (v-prediction)."""

from __future__ import annotations

from dataclasses import dataclass

from sdlora.models.families.sd1 import SD1, SD1Family, _claimed
from sdlora.models.families.unet import cross_attention_width, is_unet


@dataclass(frozen=True)
class SD2Family(SD1Family):
    """Encodes and trains like SD 1.x; told apart by its text width, and named differently."""

    def recognises(self, denoiser_config: dict) -> bool:
        """A UNet attending to 1024-wide text (OpenCLIP ViT-H) without SDXL's size conditioning."""
        return is_unet(denoiser_config) and cross_attention_width(denoiser_config) == 1024

    def config_folder(self, prediction_type: str) -> str:
        """2.0-v/2.1 (768 px, v-prediction) and 2.x-base (512 px, epsilon) have their own configs."""
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"

    def claimed_by(self, metadata: dict[str, str]) -> bool:
        """kohya's ss_v2 flag or sd_v2, or modelspec's stable-diffusion-v2."""
        return metadata.get("ss_v2") == "True" or _claimed(metadata).startswith(
            ("sd_v2", "stable-diffusion-v2")
        )

    def prediction_from_weights(self) -> bool:
        """SD 2.x files do not record their objective: both kinds were published."""
        return True


SD2 = SD2Family(
    **vars(SD1)
    | {
        "name": "sd2",
        "words": "SD 2.x",
        "kohya_version": "sd_v2",
        "kohya_v2": True,
        "modelspec_architecture": "stable-diffusion-v2-512/lora",
        "single_file_kind": "v2",
        "single_file_parts": {**SD1.single_file_parts, "text encoder": ("cond_stage_model.model.",)},
        "original_text_encoders": (("text_encoder", "open_clip", "cond_stage_model.model."),),
    }
)
