"""The demo model's tiny components and their export as a diffusers folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdlora.assets import DEMO_MARKER
from sdlora.demo.shapes import SIZE
from sdlora.demo.tokenizer import write_vocab_files

LATENT_SIZE = SIZE // 4
# Stable Diffusion's own noise schedule, so trainers written for SD need no special case.
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)
BUILD_INFO = DEMO_MARKER  # training state stored beside the weights, for resuming without build/


def make_vae() -> AutoencoderKL:
    """~1M-parameter VAE: 64x64x3 pixels <-> 16x16x4 latents."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
    )
    # Start with a nearly deterministic posterior (std ~0.05): with the default std of 1 the
    # decoder first learns to ignore noisy latents, and reconstructions stalled near 17 dB.
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels :] = -6.0
    return vae


def make_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """Two-layer, 64-wide CLIP text encoder sized to the tiny vocabulary."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        projection_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet() -> UNet2DConditionModel:
    """~6M-parameter UNet with cross-attention (to_q/to_k/to_v/to_out.0 for LoRA) at 16x16 and 8x8."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def make_train_scheduler() -> DDPMScheduler:
    """The noise schedule used while training (epsilon prediction)."""
    return DDPMScheduler(**SCHEDULE, prediction_type="epsilon", clip_sample=False)


def make_sample_scheduler() -> DPMSolverMultistepScheduler:
    """The scheduler saved with the model: same schedule, good pictures in 20 steps."""
    return DPMSolverMultistepScheduler(**SCHEDULE, prediction_type="epsilon")


def make_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """An ordinary Stable Diffusion pipeline around the tiny parts, without safety checker."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def export_pipeline(pipe: StableDiffusionPipeline, folder: Path, info: dict) -> None:
    """Save as fp16 safetensors into `folder`, replacing it only once the new copy is complete."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; keep the classic CLIP files beside it.
    write_vocab_files(tmp / "tokenizer")
    for part in ("vae", "text_encoder", "unet"):
        _halve_weights(tmp / part)
    (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _halve_weights(part: Path) -> None:
    """Store float weights as fp16: halves the folder; diffusers upcasts on load when asked."""
    from safetensors.torch import load_file, save_file

    for file in part.glob("*.safetensors"):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})


def folder_size_mb(folder: Path) -> float:
    """Total size of a folder's files in MB."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
