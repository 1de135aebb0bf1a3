"""Single-file checkpoints: detection, refusals with clear messages, and a real offline load.

The end-to-end tests write tiny SD 1.x, 2.x and SDXL models in the original LDM/SGM key
layouts (the layout of the .safetensors checkpoints people download) and load them through
models.load_pipeline, with tiny configs standing in for the shipped ones and the network
blocked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES
from ldm_layout import LAYERS, clip_to_ldm, open_clip_to_ldm, unet_vae_to_ldm
from safetensors.torch import save_file
from tiny_models import write_tiny_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdlora.errors import ModelLoadError
from sdlora.models import loading as models
from sdlora.models import single_file

V1_KEY = CHECKPOINT_KEY_NAMES["v1"]
V2_KEY = CHECKPOINT_KEY_NAMES["v2"]
VAE_KEY = "first_stage_model.encoder.conv_in.weight"
CLIP_KEY = CHECKPOINT_KEY_NAMES["clip"]


def write(path: Path, shapes: dict, metadata: dict | None = None) -> Path:
    """A .safetensors file whose tensors have the given shapes (values do not matter for detection)."""
    save_file(
        {k: v if isinstance(v, torch.Tensor) else torch.zeros(v) for k, v in shapes.items()},
        str(path),
        metadata=metadata,
    )
    return path


def sd1_keys() -> dict:
    return {V1_KEY: (1,), V2_KEY: (1, 768), VAE_KEY: (1,), CLIP_KEY: (77, 1)}


def sd2_keys() -> dict:
    return {V1_KEY: (1,), V2_KEY: (1, 1024), VAE_KEY: (1,), CHECKPOINT_KEY_NAMES["open_clip"]: (1,)}


def sdxl_keys() -> dict:
    return {
        "model.diffusion_model.out.2.weight": (1,),
        VAE_KEY: (1,),
        CHECKPOINT_KEY_NAMES["xl_base"]: (1,),
        CHECKPOINT_KEY_NAMES["clip_sdxl"]: (77, 1),
        CHECKPOINT_KEY_NAMES["open_clip_sdxl"]: (77, 1),
    }


@pytest.mark.parametrize(
    "keys, architecture, prediction",
    [
        (sd1_keys, "stable-diffusion-v1", "epsilon"),
        (sdxl_keys, "stable-diffusion-xl-v1-base", "epsilon"),
    ],
)
def test_detects_family_from_keys(tmp_path, keys, architecture, prediction):
    info = single_file.inspect_checkpoint(write(tmp_path / "m.safetensors", keys()))
    assert (info.architecture, info.prediction_type) == (architecture, prediction)


@pytest.mark.parametrize(
    "metadata, spread, architecture",
    [
        ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, 0.0, "stable-diffusion-v2-768-v"),
        ({"modelspec.architecture": "stable-diffusion-v2-512"}, 1.0, "stable-diffusion-v2-512"),
        ({"modelspec.prediction_type": "epsilon"}, 1.0, "stable-diffusion-v2-512"),
        ({}, 0.01, "stable-diffusion-v2-512"),  # no metadata: the weights decide
        ({}, 0.5, "stable-diffusion-v2-768-v"),
    ],
)
def test_sd2_prediction_type_from_metadata_then_weights(tmp_path, metadata, spread, architecture):
    probe = torch.randn(320, generator=torch.Generator().manual_seed(0)) * spread
    path = write(tmp_path / "m.safetensors", {**sd2_keys(), single_file.SD2_PROBE: probe}, metadata)
    info = single_file.inspect_checkpoint(path)
    assert info.family == "sd2" and info.architecture == architecture
    assert info.prediction_type == ("v_prediction" if architecture.endswith("-v") else "epsilon")


def test_v_pred_marker_key_makes_sd1_v_prediction(tmp_path):
    info = single_file.inspect_checkpoint(write(tmp_path / "m.safetensors", {**sd1_keys(), "v_pred": (0,)}))
    assert (info.architecture, info.prediction_type) == ("stable-diffusion-v1", "v_prediction")


@pytest.mark.parametrize(
    "shapes, message",
    [
        ({**sd1_keys(), CHECKPOINT_KEY_NAMES["inpainting"]: (1, 9, 1, 1)}, "inpainting"),
        ({CHECKPOINT_KEY_NAMES["xl_refiner"]: (1,), VAE_KEY: (1,)}, "SDXL refiner"),
        ({CHECKPOINT_KEY_NAMES["flux"][1]: (1,), "model.diffusion_model.img_in.weight": (1, 64)}, "flux"),
        ({"encoder.weight": (3,)}, "not a Stable Diffusion model"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (1,)}, "LoRA adapter"),
        ({V1_KEY: (1,), CLIP_KEY: (77, 1)}, "no VAE weights"),
    ],
)
def test_refuses_other_models_with_a_clear_message(tmp_path, shapes, message):
    path = write(tmp_path / "other.safetensors", shapes)
    with pytest.raises(ModelLoadError, match=message) as caught:
        single_file.inspect_checkpoint(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_file_is_a_clear_error(tmp_path, damage):
    good = write(tmp_path / "good.safetensors", sd1_keys()).read_bytes()
    data = {
        "truncated": good[:-3],
        "garbage": b"\x20" + b"\0" * 7 + b"this is not json" + b" " * 16,
        "empty": b"",
    }[damage]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError, match="damaged: download it again"):
        models.load_pipeline(str(path))


def test_missing_file_and_pickles_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        models.load_pipeline(str(tmp_path / "absent.safetensors"))
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")  # would unpickle to 1
    with pytest.raises(ModelLoadError, match="pickled checkpoints"):
        models.load_pipeline(str(pickle))
    shouting = write(tmp_path / "MODEL.SAFETENSORS", sd1_keys())
    with pytest.raises(ModelLoadError, match="lowercase .safetensors"):
        models.load_pipeline(str(shouting))


def test_missing_tokenizer_says_what_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv(single_file.TOKENIZER_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    path = write(tmp_path / "sd15.safetensors", sd1_keys())
    with pytest.raises(ModelLoadError) as caught:
        models.load_pipeline(str(path))
    message = str(caught.value)
    assert (
        str(path) in message and "hf download openai/clip-vit-large-patch14 vocab.json merges.txt" in message
    )
    assert single_file.TOKENIZER_ENV in message
    monkeypatch.setenv(single_file.TOKENIZER_ENV, str(tmp_path))
    with pytest.raises(ModelLoadError, match=f"tokenizer folder {tmp_path} has no vocab.json"):
        models.load_pipeline(str(path))


def test_tokenizer_found_in_the_hugging_face_cache(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc123"
    write_tiny_tokenizer(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    import huggingface_hub.constants

    monkeypatch.delenv(single_file.TOKENIZER_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert single_file.find_tokenizer_folder(Path("m.safetensors")) == snapshot


def test_tokenizers_get_each_models_pad_token(tmp_path):
    write_tiny_tokenizer(tmp_path)
    sdxl = single_file.load_tokenizers(single_file.CONFIG_ROOT / "stable-diffusion-xl-v1-base", tmp_path)
    assert (sdxl["tokenizer"].pad_token, sdxl["tokenizer_2"].pad_token) == ("<|endoftext|>", "!")
    sd2 = single_file.load_tokenizers(single_file.CONFIG_ROOT / "stable-diffusion-v2-768-v", tmp_path)
    assert sd2["tokenizer"].pad_token == "!" and sd2["tokenizer"].model_max_length == 77


# Parameter counts of the published models; the shipped configs must rebuild them exactly.
PUBLISHED = {
    "stable-diffusion-v1": (859_520_964, 123_060_480, None),
    "stable-diffusion-v2-512": (865_910_724, 340_387_840, None),
    "stable-diffusion-v2-768-v": (865_910_724, 340_387_840, None),
    "stable-diffusion-xl-v1-base": (2_567_463_684, 123_060_480, 694_659_840),
}


@pytest.mark.parametrize("architecture", sorted(PUBLISHED))
def test_shipped_configs_rebuild_the_published_architectures(architecture):
    folder = single_file.CONFIG_ROOT / architecture
    unet_size, text_size, text2_size = PUBLISHED[architecture]
    with torch.device("meta"):  # shapes only: no memory, no weights
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text2 = (
            CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
            if text2_size
            else None
        )
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text)) == (unet_size, 83_653_863, text_size)
    assert text2 is None or count(text2) == text2_size
    expected = "v_prediction" if architecture.endswith("-v") else "epsilon"
    assert single_file._scheduler(folder, expected).config.prediction_type == expected


# --- genuine tiny checkpoints in the original LDM / SGM layouts ------------------------------


def tiny_unet(cross_attention_dim: int, xl: bool = False, **extra) -> UNet2DConditionModel:
    if xl:  # SDXL's layout: no attention at the top level, deeper transformers further down
        levels = dict(
            block_out_channels=(8, 16, 16),
            transformer_layers_per_block=(1, 1, 2),
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
        )
    else:
        levels = dict(
            block_out_channels=(8, 8, 16, 16),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    return UNet2DConditionModel(
        sample_size=8,
        layers_per_block=LAYERS,
        norm_num_groups=4,
        attention_head_dim=2,
        cross_attention_dim=cross_attention_dim,
        **levels,
        **extra,
    )


def tiny_text_encoder(tokenizer, hidden: int, layers: int = 2, projection: bool = False):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_family(family: str, tokenizer) -> tuple[dict, dict[str, torch.Tensor], tuple[str, ...]]:
    """Random tiny components of one family, its checkpoint in the original layout, and its config folders."""
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    if family == "sd1":
        parts = {"unet": tiny_unet(16), "vae": vae, "text_encoder": tiny_text_encoder(tokenizer, 16)}
        text = clip_to_ldm(parts["text_encoder"], "cond_stage_model.transformer.")
        return parts, {**unet_vae_to_ldm(parts["unet"], vae), **text}, ("stable-diffusion-v1",)
    if family == "sd2":  # SD 2.x is recognised by its 1024-wide cross-attention
        parts = {
            "unet": tiny_unet(1024, use_linear_projection=True),
            "vae": vae,
            "text_encoder": tiny_text_encoder(tokenizer, 1024, layers=1),
        }
        text = open_clip_to_ldm(parts["text_encoder"], "cond_stage_model.model.")
        return (
            parts,
            {**unet_vae_to_ldm(parts["unet"], vae), **text},
            ("stable-diffusion-v2-512", "stable-diffusion-v2-768-v"),
        )
    # SDXL: two encoders of different widths; the second has >= 10 layers, which is how SDXL is recognised
    parts = {
        "text_encoder": tiny_text_encoder(tokenizer, 16),
        "text_encoder_2": tiny_text_encoder(tokenizer, 24, layers=10, projection=True),
        "vae": vae,
        "unet": tiny_unet(
            16 + 24,
            xl=True,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 24,
        ),
    }
    text = {
        **clip_to_ldm(parts["text_encoder"], "conditioner.embedders.0.transformer."),
        **open_clip_to_ldm(parts["text_encoder_2"], "conditioner.embedders.1.model."),
    }
    return parts, {**unet_vae_to_ldm(parts["unet"], vae), **text}, ("stable-diffusion-xl-v1-base",)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per family: a tiny .safetensors checkpoint and its components; one config root describing them all."""
    root = tmp_path_factory.mktemp("tiny-single-file")
    tokenizer = write_tiny_tokenizer(root / "tokenizer")
    out = {"configs": root / "configs", "tokenizer": root / "tokenizer"}
    torch.manual_seed(0)
    for family in ("sd1", "sd2", "sdxl"):
        parts, tensors, architectures = tiny_family(family, tokenizer)
        for architecture in architectures:  # shipped model_index, scheduler, tokenizer; tiny model configs
            folder = out["configs"] / architecture
            shutil.copytree(single_file.CONFIG_ROOT / architecture, folder)
            for name, part in parts.items():
                (part.config.save_pretrained if name.startswith("text") else part.save_config)(folder / name)
        path = root / f"{family}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        out[family] = {"path": path, **parts}
    return out


@pytest.fixture()
def tiny_configs(tiny, monkeypatch):
    """The tiny configs in place of the shipped ones, the tokenizer by env var, and no network at all."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(single_file, "CONFIG_ROOT", tiny["configs"])
    monkeypatch.setenv(single_file.TOKENIZER_ENV, str(tiny["tokenizer"]))
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", False
    )  # our own local_files_only must suffice

    def refuse(*args, **kwargs):
        raise AssertionError("single-file loading tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tiny


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "family, pipeline, pad",
    [
        ("sd1", "StableDiffusionPipeline", "<|endoftext|>"),
        ("sd2", "StableDiffusionPipeline", "!"),
        ("sdxl", "StableDiffusionXLPipeline", "<|endoftext|>"),
    ],
)
def test_tiny_checkpoint_loads_offline_with_every_weight(tiny_configs, family, pipeline, pad):
    expected = tiny_configs[family]
    pipe = models.load_pipeline(str(expected["path"]))
    assert type(pipe).__name__ == pipeline and pipe.tokenizer.pad_token == pad
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in expected:
            assert same_weights(getattr(pipe, name), expected[name]), name
    info = models.inspect_pipeline(pipe)
    # the tiny SD 2.x norm biases start at zero, so the weights say epsilon (2.x-base)
    assert (info.family, info.prediction_type) == (family, "epsilon")
    latents = pipe("a photo", num_inference_steps=1, height=16, width=16, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


def test_tiny_v_prediction_checkpoint_gets_a_v_prediction_scheduler(tiny_configs, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(tiny_configs["sd1"]["path"]))
    path = write(tmp_path / "tiny-v.safetensors", {**tensors, "v_pred": torch.zeros(0)})
    pipe = single_file.load_single_file_pipeline(path, torch.float32)
    assert models.inspect_pipeline(pipe).prediction_type == "v_prediction"


def test_sd2_768_v_metadata_picks_the_768_v_config(tiny_configs, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(tiny_configs["sd2"]["path"]))
    path = write(
        tmp_path / "tiny-768.safetensors", tensors, {"modelspec.architecture": "stable-diffusion-v2-768-v"}
    )
    pipe = single_file.load_single_file_pipeline(path, torch.float32)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert models.inspect_pipeline(pipe).prediction_type == "v_prediction"


def test_checkpoint_with_missing_unet_weights_is_refused(tiny_configs, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(tiny_configs["sd1"]["path"]))
    del tensors["model.diffusion_model.out.2.weight"]
    path = write(tmp_path / "cut.safetensors", tensors)
    with pytest.raises(ModelLoadError, match="incomplete or do not fit"):
        single_file.load_single_file_pipeline(path, torch.float32)


def test_weights_that_do_not_fit_the_architecture_are_refused(tiny, monkeypatch):
    monkeypatch.setenv(single_file.TOKENIZER_ENV, str(tiny["tokenizer"]))  # the real SD 1.5 configs this time
    with pytest.raises(ModelLoadError, match="incomplete or do not fit") as caught:
        single_file.load_single_file_pipeline(tiny["sd1"]["path"], torch.float32)
    assert str(tiny["sd1"]["path"]) in str(caught.value)


def test_model_configs_are_plain_json_without_weights():
    files = [f for f in single_file.CONFIG_ROOT.rglob("*") if f.is_file()]
    assert files and all(f.suffix in (".json", ".md") for f in files)
    for f in files:
        if f.suffix == ".json":
            json.loads(f.read_text())
