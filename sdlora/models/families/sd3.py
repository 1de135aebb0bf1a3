"""SD3.5 (Medium, Large): an MMDiT over 16-channel latents, CLIP-L + CLIP-G + T5 prompts, 1024 px.

Trained by flow matching with sigmas drawn logit-normally (the SD3 paper; diffusers' SD3 script)
and the scheduler's fixed shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdlora.models.families.base import Noised, SamplingDefaults
from sdlora.models.families.sd1 import _claimed
from sdlora.models.families.transformer import (
    PROMPT_BATCH,
    TransformerFamily,
    flow_sampling,
    parts_to,
)

if TYPE_CHECKING:  # torch loads only when a model is used: the config road stays light
    import torch

TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# The joint blocks' image-stream and text-stream attention projections.
JOINT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class SD3Family(TransformerFamily):
    """Stable Diffusion 3 and 3.5."""

    def recognises(self, denoiser_config: dict) -> bool:
        """SD3's transformer: by class name, or a joint-attention config with a position-embedding grid."""
        if denoiser_config.get("_class_name"):
            return denoiser_config["_class_name"] == "SD3Transformer2DModel"
        return "joint_attention_dim" in denoiser_config and "pos_embed_max_size" in denoiser_config

    def native_resolution(self, denoiser_config: dict, vae_config: dict) -> int:
        """The transformer's latent size times the VAE's downscaling (128 x 8 = 1024 for SD3.5)."""
        return int(denoiser_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)

    def claimed_by(self, metadata: dict[str, str]) -> bool:
        """kohya's sd3 or modelspec's stable-diffusion-3."""
        return _claimed(metadata).startswith(("sd3", "stable-diffusion-3", "stable-diffusion-v3"))

    def sampling_defaults(self, denoiser_config: dict) -> SamplingDefaults:
        """The model cards' settings: 3.5 Medium (MMDiT-X, dual-attention layers) 40 steps at guidance 4.5;
        3.5 Large (and others) 28 steps at 3.5."""
        if denoiser_config.get("dual_attention_layers"):
            return flow_sampling(40, 4.5)
        return flow_sampling(28, 3.5)

    def architecture_of(self, denoiser_config: dict) -> str:
        """The model's own modelspec id, told as kohya's sd3_utils tells them: SD3.5 normalises q and k
        (qk_norm) where SD3 Medium does not, and SD3.5 Medium adds second attention layers (MMDiT-X)."""
        if not denoiser_config.get("qk_norm"):
            return "stable-diffusion-3-medium/lora"
        size = "medium" if denoiser_config.get("dual_attention_layers") else "large"
        return f"stable-diffusion-3-5-{size}/lora"

    def encode_captions(
        self, pipeline: Any, captions: list[str], time_ids: list[tuple], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The pipeline's own prompt encoding: CLIP-L and CLIP-G states beside T5's, and both pooled."""
        import torch

        if self.drop_t5:
            # The pipeline then gives zeros for T5's tokens (as SD3 was trained to accept); letting the
            # encoder go frees its memory, and previews draw without it, as the adapter trains.
            pipeline.text_encoder_3 = None
        parts_to(pipeline, device, TEXT_PARTS)
        embeddings, pooled = [], []
        with torch.no_grad():
            for i in range(0, len(captions), PROMPT_BATCH):
                embeds, _, pooled_embeds, _ = pipeline.encode_prompt(
                    captions[i : i + PROMPT_BATCH],
                    None,
                    None,
                    device=device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=False,
                    max_sequence_length=self.max_sequence_length,
                )
                embeddings.append(embeds.float().cpu())
                pooled.append(pooled_embeds.float().cpu())
        return torch.cat(embeddings), {"pooled": torch.cat(pooled)}

    def call_transformer(self, transformer: Any, noised: Noised, batch: Any) -> torch.Tensor:
        """The MMDiT's velocity: latents, timestep (sigma x 1000), text states and pooled text."""
        return transformer(
            hidden_states=noised.noisy,
            timestep=noised.timesteps,
            encoder_hidden_states=batch.embeddings,
            pooled_projections=batch.extras["pooled"],
            return_dict=False,
        )[0]


SD3 = SD3Family(
    name="sd3",
    words="SD3.5",
    pipeline_classes=("StableDiffusion3Pipeline",),
    block_weights="mmdit-joint",
    original_layout="mmdit",  # as sd3.5_large.safetensors: the transformer and the VAE
    original_parts=("transformer", "vae"),
    kohya_version="sd3",
    modelspec_architecture="stable-diffusion-3/lora",
    modelspec_implementation="https://github.com/Stability-AI/sd3.5",
    kohya_text_prefixes={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
    single_file_kind="sd3",
    single_file_parts={},
    # The UNet-style numbers, for SD3.5 Medium at 1024 px: the estimate uses the transformer's below.
    activation_gb_per_latent_pixel=8.0 / 128**2,
    lora_parameters_per_rank=746_496,
    # Counted by peft on the published configs: Medium's 24 joint blocks (the last has no text-stream
    # output) and 13 second attentions at width 1536; Large's 38 joint blocks at width 2432.
    estimate_variants=(
        ("stable-diffusion-3.5-medium", 2_243_171_520, 746_496),
        ("stable-diffusion-3.5-large", 8_056_627_520, 1_473_792),
    ),
    # bf16 autocast, rank-16 attention LoRA, saved tensors counted by autograd hooks (bench/real_size.py)
    activation_bytes_per_token_width_block=40.0,
    estimate_text_tokens=77 + 77,  # CLIP-L/G's 77 tokens, then T5's at the default max_sequence_length
    text_encoder_parameters=123_650_304 + 694_659_840 + 4_762_310_656,  # CLIP-L, CLIP-G, T5-XXL encoder
    lora_targets=JOINT_ATTENTION,
    named_in_estimate=True,
    single_file_key="joint_blocks.0.x_block.attn.qkv.weight",
    default_weighting="logit_normal",
)
