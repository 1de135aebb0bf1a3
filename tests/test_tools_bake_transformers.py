"""Bake into SD3.5 and Flux.1 single files: the transformer in the layout of Stability's and Black Forest
Labs' own files, read back by diffusers' from_single_file as the very tensors of the fused model, with the
keys ComfyUI tells these models by."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors import safe_open
from tiny_transformers import tiny_flux_model, tiny_sd3_model  # noqa: F401 - fixtures

from sdlora.errors import ModelLoadError
from sdlora.library.formats import Adapter, LoraLayer
from sdlora.library.tools.bake import bake
from sdlora.library.tools.extract import target_modules
from sdlora.models.families import family_named
from sdlora.models.loading import load_pipeline

MIX = (0.8, -0.5)  # two random adapters at these weights
PRECISION = {"sd3": None, "flux": "bf16"}  # one of each: float32 as it is, and a half precision


def random_adapter(transformer, seed: int) -> Adapter:
    """A rank-4 LoRA with random factors on every attention projection a transformer LoRA adapts."""
    generator, layers = torch.Generator().manual_seed(seed), {}
    for path, module in target_modules(transformer, "transformer").items():
        rows, columns = module.weight.shape
        down, up = torch.randn(4, columns, generator=generator), torch.randn(rows, 4, generator=generator)
        layers[f"transformer.{path}"] = LoraLayer(0.1 * down, 0.1 * up, 2.0)
    return Adapter(layers, {"modelspec.title": f"random {seed}"})


@pytest.fixture(scope="module", params=["sd3", "flux"])
def baked(request, tmp_path_factory):
    """(family, model folder, the mix baked as a diffusers folder, the same mix baked as a single file)."""
    family = request.param
    folder = request.getfixturevalue(f"tiny_{family}_model")
    transformer = load_pipeline(str(folder)).transformer
    weighted = [(random_adapter(transformer, seed), weight) for seed, weight in enumerate(MIX)]
    root = tmp_path_factory.mktemp(f"baked-{family}")
    as_folder = bake(str(folder), weighted, root / "baked", names=["a", "b"])
    single = bake(str(folder), weighted, root / f"{family}.safetensors", PRECISION[family], names=["a", "b"])
    return family, folder, as_folder.out, single


def flux_width_stand_in(transformer_config: dict):
    """diffusers' Flux conversion splits each single block's linear1 at Flux.1's real sizes (3072 wide, an
    MLP 4x that): the same rule at the tiny model's width (q, k and v one width each, the MLP the rest)."""
    width = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    stand_in = types.ModuleType("torch")
    stand_in.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})

    def split(tensor, sizes, dim=0):
        if isinstance(sizes, tuple) and len(sizes) == 4:
            sizes = (width, width, width, tensor.shape[dim] - 3 * width)
        return torch.split(tensor, sizes, dim)

    stand_in.split = split
    return stand_in


def test_the_single_file_reads_back_as_the_fused_transformer(baked, monkeypatch):
    """diffusers' from_single_file (the tiny model's config, offline) gives the baked folder's transformer
    tensor for tensor: exactly, or exactly as rounded to the chosen precision."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.loaders import single_file_utils

    family, folder, fused_folder, single = baked
    model_class = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    fused = model_class.from_pretrained(str(fused_folder), subfolder="transformer").state_dict()
    base = model_class.from_pretrained(str(folder), subfolder="transformer").state_dict()
    if family == "flux":
        config = json.loads((folder / "transformer" / "config.json").read_text())
        monkeypatch.setattr(single_file_utils, "torch", flux_width_stand_in(config))
    loaded = model_class.from_single_file(
        str(single.out), config=str(folder), subfolder="transformer", local_files_only=True
    ).state_dict()
    assert loaded.keys() == fused.keys()
    rounded = torch.bfloat16 if PRECISION[family] == "bf16" else torch.float32
    for key, tensor in fused.items():
        assert torch.equal(loaded[key].float(), tensor.to(rounded).float()), key
    changed = [k for k in fused if not torch.equal(fused[k], base[k])]
    assert len(changed) == len(target_modules(load_pipeline(str(folder)).transformer, "transformer"))


def test_sdlora_opens_the_baked_file_as_the_fused_model(baked, monkeypatch):
    """The file read as sdlora reads downloaded ones: its transformer, the other parts from the folder."""
    from diffusers.loaders import single_file_utils

    from sdlora.models.transformer_single_file import PARTS_ENV

    family, folder, fused_folder, single = baked
    monkeypatch.setenv(PARTS_ENV, str(folder))
    if family == "flux":
        config = json.loads((folder / "transformer" / "config.json").read_text())
        monkeypatch.setattr(single_file_utils, "torch", flux_width_stand_in(config))
    opened = load_pipeline(str(single.out)).transformer.state_dict()
    fused = load_pipeline(str(fused_folder)).transformer.state_dict()
    rounded = torch.bfloat16 if PRECISION[family] == "bf16" else torch.float32
    assert all(torch.equal(opened[k].float(), v.to(rounded).float()) for k, v in fused.items())


def header(path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], set[str]]:
    with safe_open(str(path), framework="pt") as file:
        shapes = {k: tuple(file.get_slice(k).get_shape()) for k in file.keys()}
        return shapes, file.metadata(), {file.get_slice(k).get_dtype() for k in file.keys()}


def test_the_keys_follow_the_rules_comfyui_tells_the_models_by(baked):
    """ComfyUI (comfy/model_detection.py) takes a file's model prefix to be the one more than five keys
    start with (`model.diffusion_model.` first), else reads the keys bare; it tells an MMDiT by
    `joint_blocks.0.context_block.attn.qkv.weight` and reads its latent channels and patch size from
    `x_embedder.proj.weight`, the output channels from `final_layer.linear.weight` (patch² x channels),
    the grid from `pos_embed`, the pooled width from `y_embedder.mlp.0.weight`, qk norm from `ln_q` and
    MMDiT-X layers from `x_block.attn2.qkv`; it tells Flux by `double_blocks.0.img_attn.norm.key_norm.scale`,
    reads the latent channels as `img_in.weight`'s columns over the 2x2 patch, counts `double_blocks.N.`
    and `single_blocks.N.`, and gives guidance (dev) when `guidance_in.in_layer.weight` is there."""
    family, folder, _, single = baked
    config = json.loads((folder / "transformer" / "config.json").read_text())
    shapes, metadata, dtypes = header(single.out)

    def blocks(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in shapes if k.startswith(prefix)})

    if family == "sd3":  # Stability's layout: the MMDiT under model.diffusion_model., the VAE beside it
        top = "model.diffusion_model."
        assert all(k.startswith((top, "first_stage_model.")) for k in shapes)
        assert sum(k.startswith(top) for k in shapes) > 5
        assert f"{top}joint_blocks.0.context_block.attn.qkv.weight" in shapes
        hidden, channels, patch, _ = shapes[f"{top}x_embedder.proj.weight"]
        assert (channels, patch) == (config["in_channels"], config["patch_size"])
        assert shapes[f"{top}final_layer.linear.weight"][0] == patch * patch * config["out_channels"]
        assert shapes[f"{top}pos_embed"][1] == config["pos_embed_max_size"] ** 2
        assert shapes[f"{top}y_embedder.mlp.0.weight"][1] == config["pooled_projection_dim"]
        assert (f"{top}joint_blocks.0.context_block.attn.ln_q.weight" in shapes) == bool(
            config.get("qk_norm")
        )
        assert not any(".attn2." in k for k in shapes)  # no MMDiT-X layers in this model
        assert blocks(f"{top}joint_blocks.") == config["num_layers"]
        assert shapes[f"{top}joint_blocks.0.x_block.attn.qkv.weight"] == (3 * hidden, hidden)
        assert "first_stage_model.decoder.mid.attn_1.q.weight" in shapes
    else:  # Black Forest Labs' layout: the transformer alone, bare keys
        assert not any(k.startswith(("model.", "first_stage_model.", "text_encoders.")) for k in shapes)
        assert "double_blocks.0.img_attn.norm.key_norm.scale" in shapes
        assert shapes["img_in.weight"][1] // 4 == 16  # 16 latent channels in 2x2 patches
        assert blocks("double_blocks.") == config["num_layers"]
        assert blocks("single_blocks.") == config["num_single_layers"]
        assert ("guidance_in.in_layer.weight" in shapes) == config["guidance_embeds"]
        width = config["num_attention_heads"] * config["attention_head_dim"]
        mlp = shapes["single_blocks.0.linear2.weight"][1] - width  # linear2 reads attention and MLP outputs
        assert shapes["single_blocks.0.linear1.weight"] == (3 * width + mlp, width)  # q, k, v, MLP in
    assert dtypes == ({"F32"} if PRECISION[family] is None else {"BF16"})
    kind = family_named(family)
    assert metadata["modelspec.architecture"] == kind.architecture_of(config).removesuffix("/lora")
    assert json.loads(metadata["sdlora.baked"]) == [["a", MIX[0]], ["b", MIX[1]]]
    assert "modelspec.prediction_type" not in metadata  # flow matching has no modelspec value
    assert single.size_bytes == single.out.stat().st_size


def test_a_mix_that_changes_a_text_encoder_is_refused_for_a_single_file(tiny_flux_model, tmp_path):  # noqa: F811
    """The single file holds no text encoder (as the files people download): a change to one would be lost."""
    pipeline = load_pipeline(str(tiny_flux_model))
    path, module = next(iter(target_modules(pipeline.text_encoder, "text_encoder").items()))
    rows, columns = module.weight.shape
    adapter = Adapter(
        {f"text_encoder.{path}": LoraLayer(torch.ones(2, columns), torch.ones(rows, 2), 2.0)}, {}
    )
    with pytest.raises(ModelLoadError, match="not the text_encoder this mix changes") as caught:
        bake(str(tiny_flux_model), [(adapter, 1.0)], tmp_path / "te.safetensors", names=["te"])
    assert "\n" not in str(caught.value) and not (tmp_path / "te.safetensors").exists()


# The real models' transformer configs (the shape-setting parts of their transformer/config.json).
REAL_MODELS = {
    "sd3.5-large": dict(
        attention_head_dim=64, caption_projection_dim=2432, in_channels=16, joint_attention_dim=4096,
        num_attention_heads=38, num_layers=38, out_channels=16, patch_size=2, pooled_projection_dim=2048,
        pos_embed_max_size=192, qk_norm="rms_norm", sample_size=128,
    ),
    "sd3.5-medium": dict(  # MMDiT-X: second attention layers in the first 13 blocks
        attention_head_dim=64, caption_projection_dim=1536, dual_attention_layers=tuple(range(13)),
        in_channels=16, joint_attention_dim=4096, num_attention_heads=24, num_layers=24, out_channels=16,
        patch_size=2, pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128,
    ),
    "flux.1-dev": dict(
        attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
        num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768,
        axes_dims_rope=(16, 56, 56),
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    "model, diffusers_type",
    [("sd3.5-large", "sd35_large"), ("sd3.5-medium", "sd35_medium"), ("flux.1-dev", "flux-dev")],
)
def test_at_the_real_sizes_diffusers_and_comfyui_tell_the_model_and_read_every_weight(model, diffusers_type):
    """The real transformers built on the meta device (names and shapes, no memory): diffusers tells the
    file's model by its keys and shapes and converts every weight back to its own name and shape; ComfyUI's
    shape rules (an MMDiT's depth is its width / 64, its MMDiT-X layers those with `x_block.attn2`, qk norm
    by `ln_q`; Flux.1 is 3072 wide over 16 latent channels) hold. The tiny models' tests check the values."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.loaders import single_file_utils as diffusers_single_file

    from sdlora.models.transformer_layout import flux_tensors, sd3_tensors

    config, flux = REAL_MODELS[model], model.startswith("flux")
    with torch.device("meta"):
        transformer = (FluxTransformer2DModel if flux else SD3Transformer2DModel)(**config)
    if flux:
        theirs = flux_tensors(transformer)
        back = diffusers_single_file.convert_flux_transformer_checkpoint_to_diffusers(dict(theirs))
        assert theirs["img_in.weight"].shape == (3072, 16 * 4)
    else:
        theirs = {f"model.diffusion_model.{k}": v for k, v in sd3_tensors(transformer).items()}
        back = diffusers_single_file.convert_sd3_transformer_checkpoint_to_diffusers(dict(theirs))
        top = "model.diffusion_model.joint_blocks."
        assert theirs["model.diffusion_model.x_embedder.proj.weight"].shape[0] // 64 == config["num_layers"]
        second = {int(k[len(top) :].split(".")[0]) for k in theirs if k.endswith(".x_block.attn2.qkv.weight")}
        assert second == set(config.get("dual_attention_layers", ()))
        assert f"{top}0.context_block.attn.ln_q.weight" in theirs
    assert diffusers_single_file.infer_diffusers_model_type(theirs) == diffusers_type
    ours = transformer.state_dict()
    assert back.keys() == ours.keys()
    assert all(back[k].shape == ours[k].shape for k in ours)
