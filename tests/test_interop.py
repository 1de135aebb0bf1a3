"""The library's files against the loaders of AUTOMATIC1111, ComfyUI and kohya, on SD 1.5's real layout.

The UNet and CLIP text encoder are built from SD 1.5's published configs on the meta device
(names and shapes, no weights). An adapter over every layer kohya's LoCon rules target (all
attention projections, feed-forward, proj_in/out, the ResNet convolutions and time
projections, the samplers, and the text encoder's attention and MLP) is written by sdlora's
library writer; each tool's own key-matching and scaling rule, re-implemented below from its
loader's documented behaviour, must find every layer and apply it at alpha/rank.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from ldm_layout import unet_key_to_ldm
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

import sdlora
from sdlora.library.formats import Adapter, LoraLayer, ModelLayout, write_adapter

CONFIGS = Path(sdlora.__file__).parent / "models" / "configs" / "stable-diffusion-v1"
ALPHAS = {"attention": 4.0, "resnet": 1.5, "sampler": 3.0, "text": 0.5}  # distinct, none equal to the rank 2


@pytest.fixture(scope="module")
def sd15():
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIGS / "unet")))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(CONFIGS / "text_encoder")))
    return SimpleNamespace(unet=unet, text_encoder=text_encoder)


def kohya_targets(model, part: str) -> dict[str, tuple[str, str]]:
    """kohya networks/lora.py: Linear and Conv2d children of the target classes, by lora name."""
    if part == "unet":
        classes = {
            "Transformer2DModel": "attention",
            "ResnetBlock2D": "resnet",
            "Downsample2D": "sampler",
            "Upsample2D": "sampler",
        }
        prefix = "lora_unet"
    else:
        classes = {"CLIPAttention": "text", "CLIPSdpaAttention": "text", "CLIPMLP": "text"}
        prefix = "lora_te_text_model"  # kohya's CLIPTextModel still nests text_model
    names = {}
    for name, module in model.named_modules():
        kind = classes.get(type(module).__name__)
        if kind is None:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) and child_name:
                names[f"{prefix}.{name}.{child_name}".replace(".", "_")] = (f"{name}.{child_name}", kind)
    return names


@pytest.fixture(scope="module")
def library_file(sd15, tmp_path_factory):
    """The file sdlora's library holds for an adapter over every layer kohya targets."""
    layout = ModelLayout.of(sd15, "sd1")
    g = torch.Generator().manual_seed(0)
    layers = {}
    for part, model in (("unet", sd15.unet), ("text_encoder", sd15.text_encoder)):
        for path, kind in kohya_targets(model, part).values():
            key = f"{part}.{path}" if part == "unet" else f"text_encoder.text_model.{path}"
            shape = layout.shapes[key]
            down = torch.randn(2, *shape[1:], generator=g)
            up = torch.randn(shape[0], 2, *([1, 1] if len(shape) == 4 else []), generator=g)
            layers[key] = LoraLayer(down, up, ALPHAS[kind])
    path = write_adapter(
        tmp_path_factory.mktemp("lib") / "every-layer.safetensors",
        Adapter(layers),
        "kohya",
        family="sd1",
        blocks=layout.blocks,
    )
    return load_file(str(path)), layers, layout


def stems(tensors) -> set[str]:
    return {key.split(".", 1)[0] for key in tensors}


def same_update(tensors, stem: str, shape, layer: LoraLayer) -> bool:
    """What all three tools add, alpha / (lora_down's rows) · up · down in the weight's shape, equals the
    layer's ΔW; compared on a random probe, since the full ΔW of SD 1.5's convolutions is large."""
    down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
    alpha = tensors[f"{stem}.alpha"].item()
    assert up.shape[0] == shape[0] and down[0].numel() == torch.Size(shape[1:]).numel()  # reshapes onto W
    probe = torch.randn(down[0].numel(), 3, generator=torch.Generator().manual_seed(1))
    applied = alpha / down.shape[0] * (up.flatten(1) @ (down.flatten(1) @ probe))
    expected = layer.scale * (layer.up.flatten(1) @ (layer.down.flatten(1) @ probe))
    return torch.allclose(applied, expected, atol=1e-5, rtol=1e-5)


def ldm_module_names(unet) -> dict[str, str]:
    """diffusers module path -> original SD path, by the single-file mapping tested in test_single_file."""
    up_attention = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    return {
        path: unet_key_to_ldm(path + ".weight", up_attention).removesuffix(".weight")
        for path, module in unet.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }


# --- AUTOMATIC1111 / Forge: extensions-builtin/Lora, convert_diffusers_name_to_compvis --------------

A1111_RESNET = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def a1111_compvis_name(stem: str) -> str | None:
    """AUTOMATIC1111's rule for SD 1.x: diffusers-style kohya names to the original model's module names."""

    def suffix(kind: str, rest: str) -> str:
        return A1111_RESNET.get(rest, rest) if kind == "resnets" else rest

    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (
            r"lora_unet_time_embedding_linear_(\d+)(.*)",
            lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}",
        ),
        (
            r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_"
                f"{1 if m[2] == 'attentions' else 0}_{suffix(m[2], m[4])}"
            ),
        ),
        (
            r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix(m[1], m[3])}"
            ),
        ),
        (
            r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_"
                f"{1 if m[2] == 'attentions' else 0}_{suffix(m[2], m[4])}"
            ),
        ),
        (
            r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
            lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op",
        ),
        (
            r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
            lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv",
        ),
        (
            r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
            lambda m: f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}",
        ),
    ]
    for pattern, build in rules:
        match = re.fullmatch(pattern, stem)
        if match:
            return build(match)
    return None


def test_automatic1111_finds_every_layer_at_alpha_over_rank(sd15, library_file):
    tensors, layers, layout = library_file
    # network_layer_mapping: the SD model's own module names with '_' for '.'
    ldm = ldm_module_names(sd15.unet)
    model_modules = {
        "diffusion_model_" + ldm_path.replace(".", "_"): "unet." + path for path, ldm_path in ldm.items()
    }
    model_modules.update(
        {
            "transformer_text_model_" + path.replace(".", "_"): f"text_encoder.text_model.{path}"
            for path, _ in sd15.text_encoder.named_modules()
            if path
        }
    )
    found = {}
    for stem in stems(tensors):
        compvis = a1111_compvis_name(stem)
        assert compvis in model_modules, f"AUTOMATIC1111 would skip {stem} ({compvis})"
        found[stem] = model_modules[compvis]
    assert len(found) == len(layers)
    for stem, key in found.items():
        assert same_update(tensors, stem, layout.shapes[key], layers[key]), stem


# --- ComfyUI: comfy/lora.py model_lora_keys_unet / model_lora_keys_clip ----------------------------


def test_comfyui_finds_every_layer_at_alpha_over_rank(sd15, library_file):
    tensors, layers, layout = library_file
    key_map = {}
    for path, ldm_path in ldm_module_names(sd15.unet).items():  # both spellings of each UNet weight
        key_map["lora_unet_" + ldm_path.replace(".", "_")] = "unet." + path
        key_map["lora_unet_" + path.replace(".", "_")] = "unet." + path
    for index in range(sd15.text_encoder.config.num_hidden_layers):
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "mlp.fc1",
            "mlp.fc2",
        ):
            path = f"text_model.encoder.layers.{index}.{name}"
            key_map["lora_te_" + path.replace(".", "_")] = "text_encoder." + path
    assert stems(tensors) <= key_map.keys(), f"ComfyUI drops: {sorted(stems(tensors) - key_map.keys())[:3]}"
    for stem in stems(tensors):
        assert {f"{stem}.lora_up.weight", f"{stem}.lora_down.weight", f"{stem}.alpha"} <= tensors.keys()
        key = key_map[stem]
        assert same_update(tensors, stem, layout.shapes[key], layers[key]), stem
    assert len(stems(tensors)) == len(layers)


# --- kohya sd-scripts: networks/lora.py create_network_from_weights --------------------------------


def test_kohya_builds_a_module_for_every_layer_at_alpha_over_rank(sd15, library_file):
    tensors, layers, layout = library_file
    names = {**kohya_targets(sd15.unet, "unet"), **kohya_targets(sd15.text_encoder, "text_encoder")}
    assert stems(tensors) == names.keys()  # every layer found, none that kohya would not build
    for stem, (path, kind) in names.items():
        key = f"unet.{path}" if stem.startswith("lora_unet") else f"text_encoder.text_model.{path}"
        assert tensors[f"{stem}.alpha"].item() == ALPHAS[kind]  # the true alpha, per layer
        assert same_update(tensors, stem, layout.shapes[key], layers[key]), stem


def test_original_sd_names_of_the_same_layers_read_back_exactly(sd15, library_file, tmp_path):
    """Civitai's files with original-SD block names (`lora_unet_input_blocks_…`) map onto the same layers."""
    from sdlora.library.formats import read_adapter

    tensors, layers, layout = library_file
    ldm = ldm_module_names(sd15.unet)
    renamed = {}
    for key, value in tensors.items():
        stem, rest = key.split(".", 1)
        if stem.startswith("lora_unet_"):
            path = next(p for p in ldm if "lora_unet_" + p.replace(".", "_") == stem)
            stem = "lora_unet_" + ldm[path].replace(".", "_")
        renamed[f"{stem}.{rest}"] = value
    from safetensors.torch import save_file

    save_file(renamed, str(tmp_path / "ldm.safetensors"))
    adapter = read_adapter(tmp_path / "ldm.safetensors", layout)
    assert adapter.layers.keys() == layers.keys()
    for key, layer in layers.items():
        got = adapter.layers[key]
        assert (
            got.alpha == layer.alpha and torch.equal(got.down, layer.down) and torch.equal(got.up, layer.up)
        ), key
