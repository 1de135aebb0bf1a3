"""Tiny SD3 and Flux.1 pipelines from configs with random weights (no downloads), saved as diffusers folders.

Both use the real component classes at toy widths: an MMDiT/Flux transformer with 16 latent
channels and patch size 2, a 16-channel VAE with the model's own shift and scaling factors, CLIP
text encoders with the demo model's tokenizer, a T5 encoder whose tokenizer is trained here (none
can be downloaded), and a flow-matching Euler scheduler configured as the real model's.

Test modules import the fixtures `tiny_sd3_model` and `tiny_flux_model` from here (pytest finds
fixtures in a test module's namespace); each folder is built once per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

IMAGE_SIZE = 32  # pixels; the VAE halves it to 16x16 latents, the transformer's 2x2 patches make 8x8 tokens
CLIP_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "demo-model" / "tokenizer"
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, as in T5's own vocabulary
# Real models' latent statistics (the VAE configs of SD3.5 and Flux.1).
SD3_VAE_FACTORS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
# Flux.1 dev's scheduler config: the shift grows with the image's token count.
FLUX_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

_WORDS = """
a an the of in on at with and or to from by for under over near beside behind photo picture drawing
painting render portrait landscape close up view red green blue yellow orange purple pink white black
grey gray brown gold silver dark light bright pale circle square triangle star heart ring disc dot line
stripe shape cat dog bird fish horse cow fox owl bear lion tiger mouse rabbit duck frog snake tree
flower rose leaf grass forest mountain river lake sea ocean beach sky cloud sun moon rain snow night
day morning evening house castle city street road bridge car bike boat ship train plane man woman
child girl boy person face hand eye hair hat shirt dress shoe table chair cup bowl book lamp window
door wall floor room garden field park style sks ohwx token trigger concept small large big tiny
round sharp soft hard smooth old new young happy sad calm wild simple detailed high quality best
one two three four many some very sitting standing running flying swimming looking holding wearing
background foreground center left right top bottom corner edge middle""".split()


def write_t5_tokenizer(folder: Path) -> T5Tokenizer:
    """A T5 tokenizer (Unigram, <pad>/</s>/<unk> as T5 has them) trained on a few hundred words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=T5_SPECIALS, unk_token="<unk>", initial_alphabet=list(_ALPHABET)
    )
    sentences = [" ".join(_WORDS[i : i + 8]) for i in range(0, len(_WORDS), 3)] + [_ALPHABET]
    tokenizer.train_from_iterator(sentences, trainer)
    t5 = T5Tokenizer(vocab=_vocab(tokenizer), extra_ids=0, model_max_length=512)
    t5.save_pretrained(folder)
    return t5


_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()<>/_+=*&%$#@"


def _vocab(tokenizer) -> list[tuple[str, float]]:
    """The trained Unigram's (piece, log-probability) list, specials first, as T5Tokenizer takes it."""
    import json

    return [tuple(entry) for entry in json.loads(tokenizer.to_str())["model"]["vocab"]]


def _clip_config(tokenizer: CLIPTokenizer, hidden: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2,  # SD3 reads the penultimate hidden state
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5(tokenizer: T5Tokenizer, width: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as T5-XXL
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _vae(factors: dict[str, float]) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=IMAGE_SIZE,
        use_quant_conv=False,  # SD3 and Flux VAEs have none
        use_post_quant_conv=False,
        **factors,
    )


def _tokenizers(tmp: Path) -> tuple[CLIPTokenizer, T5Tokenizer]:
    clip = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)
    write_t5_tokenizer(tmp / "t5")
    return clip, T5Tokenizer.from_pretrained(tmp / "t5")


def build_tiny_sd3_pipeline(folder_for_tokenizers: Path, seed: int = 0) -> StableDiffusion3Pipeline:
    """A tiny SD3: MMDiT with joint blocks, CLIP-L + CLIP-G (with projections) + T5, shift 3.0."""
    clip, t5_tokenizer = _tokenizers(folder_for_tokenizers)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # the T5 width; CLIP-L + CLIG-G hidden states are padded to it
        caption_projection_dim=32,  # = heads x head dim
        pooled_projection_dim=64,  # CLIP-L + CLIP-G projections
        pos_embed_max_size=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(SD3_VAE_FACTORS),
        text_encoder=CLIPTextModelWithProjection(_clip_config(clip, 32, 32)),
        tokenizer=clip,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(clip, 32, 32)),
        tokenizer_2=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER),
        text_encoder_3=_t5(t5_tokenizer, 64),
        tokenizer_3=t5_tokenizer,
    )


def build_tiny_flux_pipeline(folder_for_tokenizers: Path, seed: int = 0) -> FluxPipeline:
    """A tiny Flux.1 dev: double and single blocks, guidance embedding, CLIP-L + T5, dynamic shift."""
    clip, t5_tokenizer = _tokenizers(folder_for_tokenizers)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed in 2x2 patches
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,  # the T5 width
        pooled_projection_dim=32,  # CLIP-L's pooled output
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to the head dim
    )
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=_vae(FLUX_VAE_FACTORS),
        text_encoder=CLIPTextModel(_clip_config(clip, 32, 32)),
        tokenizer=clip,
        text_encoder_2=_t5(t5_tokenizer, 64),
        tokenizer_2=t5_tokenizer,
    )


def save_tiny_sd3_model(folder: Path, seed: int = 0) -> Path:
    """Build the tiny SD3 and save it as a diffusers folder at `folder`."""
    build_tiny_sd3_pipeline(folder.parent / f".{folder.name}-tokenizers", seed).save_pretrained(folder)
    return folder


def save_tiny_flux_model(folder: Path, seed: int = 0) -> Path:
    """Build the tiny Flux.1 and save it as a diffusers folder at `folder`."""
    build_tiny_flux_pipeline(folder.parent / f".{folder.name}-tokenizers", seed).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd3_model(tmp_path_factory) -> Path:
    """A diffusers folder of a tiny SD3 (MMDiT, three text encoders) with random weights."""
    return save_tiny_sd3_model(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_flux_model(tmp_path_factory) -> Path:
    """A diffusers folder of a tiny Flux.1 dev (guidance embedding, CLIP-L + T5) with random weights."""
    return save_tiny_flux_model(tmp_path_factory.mktemp("models") / "tiny-flux")
