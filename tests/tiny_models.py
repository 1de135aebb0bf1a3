"""Tiny Stable-Diffusion-1.x-shaped models from configs with random weights (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

IMAGE_SIZE = 32  # pixels; the VAE halves it to 16x16 latents


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE vocabularies use."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is single characters: every text tokenizes, nothing is downloaded."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab = {tok: i for i, tok in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    tokenizer.save_pretrained(folder)
    return tokenizer


# What the tiny SD 1.x and SDXL share: the UNet's outer shape, the VAE, the text encoders' size, the schedule.
UNET_SHAPE = dict(
    sample_size=IMAGE_SIZE // 2,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(16, 32),
    norm_num_groups=8,
)
SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
)


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=IMAGE_SIZE,
    )


def _tiny_tokenizer() -> CLIPTokenizer:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)


def _text_config(tokenizer: CLIPTokenizer, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_tiny_pipeline(prediction_type: str = "epsilon", seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **UNET_SHAPE,
        cross_attention_dim=32,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = _tiny_vae()
    tokenizer = _tiny_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    scheduler = DDPMScheduler(**SCHEDULE, prediction_type=prediction_type, clip_sample=False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_model(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    build_tiny_pipeline(prediction_type, seed).save_pretrained(folder)
    return folder


def build_tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny SDXL: two CLIP text encoders (the second with a projection), text_time conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **UNET_SHAPE,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
    )
    vae = _tiny_vae()
    tokenizer, tokenizer_2 = _tiny_tokenizer(), _tiny_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer, hidden_act="gelu", projection_dim=32)
    )
    scheduler = EulerDiscreteScheduler(
        **SCHEDULE, prediction_type=prediction_type, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def save_tiny_sdxl_model(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    build_tiny_sdxl_pipeline(seed, prediction_type).save_pretrained(folder)
    return folder
