"""Flux.1 and SD3 adapter files: kohya and diffusers round trips, fused qkv exact, foreign files read or refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_transformers import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from transformer_foreign_formats import (
    ai_toolkit_file,
    comfyui_file,
    delta,
    kohya_file,
    kohya_split_qkv,
    lora,
    onetrainer_file,
    xlabs_file,
)

from sdlora.errors import AdapterFormatError
from sdlora.library.formats.adapter import Adapter, LoraLayer
from sdlora.library.formats.fused import join, split
from sdlora.library.formats.transformer_read import read_transformer_adapter
from sdlora.library.formats.transformer_write import transformer_layout, write_transformer_adapter

B0 = "transformer_blocks.0"
S0 = "single_transformer_blocks.0"


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("flux-tokenizers"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3-tokenizers"))


def random_adapter(layout, keys=None, text=True) -> Adapter:
    """A layer on every (or each given) layer of the layout, ranks 2..4 and alphas that differ per layer."""
    layers = {}
    for i, (key, shape) in enumerate(sorted(layout.shapes.items())):
        if keys is not None and key not in keys or (not text and not key.startswith("transformer.")):
            continue
        rank = 2 + i % 3
        g = torch.Generator().manual_seed(i)
        down = torch.randn(rank, *shape[1:], generator=g) * 0.3
        up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=g) * 0.3
        layers[key] = LoraLayer(down, up, float(rank * (1 + i % 4) / 2))
    return Adapter(layers)


def assert_same_updates(got: Adapter, want: Adapter) -> None:
    """ΔW per diffusers layer equal within 1e-5; a layer only one side has must be zero there."""
    for key in set(got.layers) | set(want.layers):
        a = got.layers[key].delta() if key in got.layers else None
        b = want.layers[key].delta() if key in want.layers else None
        if a is None or b is None:
            assert float((a if a is not None else b).abs().max()) == 0.0, f"{key} only on one side"
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_every_layer_round_trips_exactly(family, fmt, request, tmp_path):
    layout = transformer_layout(request.getfixturevalue(family), family)
    source = random_adapter(layout)
    path = write_transformer_adapter(tmp_path / "a.safetensors", source, fmt, family, layout=layout)
    back = read_transformer_adapter(path, layout)
    assert set(back.layers) == set(source.layers)
    assert_same_updates(back, source)
    # the kohya file read without a model (names alone) gives the same layers
    assert_same_updates(read_transformer_adapter(path, family=family), source)


def test_flux_kohya_file_holds_one_fused_layer_per_original_module(flux, tmp_path):
    layout = transformer_layout(flux, "flux")
    source = random_adapter(layout, text=False)
    tensors = load_file(
        write_transformer_adapter(tmp_path / "a.safetensors", source, "kohya", "flux", layout=layout)
    )
    stems = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in stems and "lora_unet_single_blocks_1_linear1" in stems
    assert not any("to_q" in s or "proj_mlp" in s for s in stems)
    # what a tool adds to BFL's fused weight is the diffusers updates stacked row by row
    for stem, members in (
        ("lora_unet_double_blocks_0_img_attn_qkv", [f"{B0}.attn.to_q", f"{B0}.attn.to_k", f"{B0}.attn.to_v"]),
        (
            "lora_unet_single_blocks_0_linear1",
            [f"{S0}.attn.to_q", f"{S0}.attn.to_k", f"{S0}.attn.to_v", f"{S0}.proj_mlp"],
        ),
    ):
        fused = delta(
            (
                tensors[f"{stem}.lora_down.weight"],
                tensors[f"{stem}.lora_up.weight"],
                tensors[f"{stem}.alpha"].item(),
            )
        )
        want = torch.cat([source.layers[f"transformer.{m}"].delta() for m in members])
        torch.testing.assert_close(fused, want, atol=1e-5, rtol=0)
    # the final layer's modulation: BFL holds (scale, shift), diffusers (shift, scale)
    stem = "lora_unet_final_layer_adaLN_modulation_1"
    fused = delta(
        (
            tensors[f"{stem}.lora_down.weight"],
            tensors[f"{stem}.lora_up.weight"],
            tensors[f"{stem}.alpha"].item(),
        )
    )
    shift, scale = source.layers["transformer.norm_out.linear"].delta().chunk(2)
    torch.testing.assert_close(fused, torch.cat([scale, shift]), atol=1e-5, rtol=0)


def test_attention_only_adapter_keeps_its_layers_and_ranks_through_linear1(flux, tmp_path):
    layout = transformer_layout(flux, "flux")
    attention = {k for k in layout.shapes if ".attn.to_" in k or ".attn.add_" in k}
    source = random_adapter(layout, keys=attention)
    path = write_transformer_adapter(tmp_path / "a.safetensors", source, "kohya", "flux", layout=layout)
    back = read_transformer_adapter(path, layout)
    assert set(back.layers) == set(source.layers)  # no proj_mlp layer appears from linear1's zero rows
    assert {k: v.rank for k, v in back.layers.items()} == {k: v.rank for k, v in source.layers.items()}
    assert_same_updates(back, source)


def test_join_and_split_are_exact_with_differing_scales():
    parts = [LoraLayer(*lora(8, 6, r, seed=r)[:2], alpha) for r, alpha in ((2, 1.0), (3, 12.0), (4, 4.0))]
    fused = join([parts[0], None, *parts[1:]], [8, 5, 8, 8])
    assert fused.rank == 9
    rows = fused.delta().split([8, 5, 8, 8])
    assert float(rows[1].abs().max()) == 0.0
    for got, part in zip([rows[0], rows[2], rows[3]], parts, strict=True):
        torch.testing.assert_close(got, part.delta(), atol=1e-6, rtol=0)
    back = split(fused, [8, 5, 8, 8])
    assert back[1] is None and [b.rank for b in (back[0], back[2], back[3])] == [2, 3, 4]
    for got, part in zip([back[0], back[2], back[3]], parts, strict=True):
        torch.testing.assert_close(got.delta(), part.delta(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_flux_files_load_in_diffusers_as_base_plus_delta(fmt, flux, tmp_path):
    layout = transformer_layout(flux, "flux")
    keys = (
        None  # every layer, top-level proj_out beside the single blocks' proj_out at other ranks and alphas
    )
    if fmt == "kohya":  # diffusers' kohya-Flux reader assumes Flux.1's real single-block widths
        keys = {k for k in layout.shapes if k.startswith((f"transformer.{B0}.", "text_encoder."))}
    source = random_adapter(layout, keys=keys)
    base = {k: v.clone() for k, v in flux.transformer.state_dict().items()}
    path = write_transformer_adapter(tmp_path / f"{fmt}.safetensors", source, fmt, "flux", layout=layout)
    flux.load_lora_weights(str(path), adapter_name=fmt)
    flux.fuse_lora(adapter_names=[fmt])
    try:
        for key, layer in source.in_part("transformer").items():
            want = base[f"{key}.weight"] + layer.delta()
            torch.testing.assert_close(weight_of(flux.transformer, key), want, atol=1e-5, rtol=0, msg=key)
    finally:
        flux.unfuse_lora()
        flux.unload_lora_weights()


def test_sd3_diffusers_export_loads_in_diffusers_as_base_plus_delta(sd3, tmp_path):
    layout = transformer_layout(sd3, "sd3")
    source = random_adapter(
        layout, keys={k for k in layout.shapes if ".attn." in k or k.startswith("text_encoder")}
    )
    base = {k: v.clone() for k, v in sd3.transformer.state_dict().items()}
    sd3.load_lora_weights(
        str(write_transformer_adapter(tmp_path / "a.safetensors", source, "diffusers", "sd3"))
    )
    sd3.fuse_lora()
    for key, layer in source.in_part("transformer").items():
        want = base[f"{key}.weight"] + layer.delta()
        torch.testing.assert_close(weight_of(sd3.transformer, key), want, atol=1e-5, rtol=0, msg=key)
    sd3.unfuse_lora()
    sd3.unload_lora_weights()


def weight_of(model, path: str) -> torch.Tensor:
    module = model.get_submodule(path)
    return getattr(module, "base_layer", module).weight.detach()


def _qkv(block: str, rows: int = 32, rank: int = 4, seed: int = 0):
    return [lora(rows, 32, rank, seed + j) for j in range(3)], [
        f"{block}.attn.to_q",
        f"{block}.attn.to_k",
        f"{block}.attn.to_v",
    ]


def read_file(tmp_path, tensors, layout, name="foreign.safetensors"):
    save_file(tensors, tmp_path / name)
    return read_transformer_adapter(tmp_path / name, layout)


def test_kohya_split_qkv_and_plain_fused_files_read_exactly(flux, tmp_path):
    layout = transformer_layout(flux, "flux")
    parts, members = _qkv(B0)
    split_layer = kohya_split_qkv(parts)
    plain = lora(96, 32, 6, seed=9, alpha=3.0)  # one LoRA trained on the fused weight: shared down
    back = read_file(
        tmp_path,
        kohya_file({"double_blocks.0.img_attn.qkv": split_layer, "double_blocks.0.txt_attn.qkv": plain}),
        layout,
    )
    fused_rows = delta(split_layer).split(32)
    for member, rows in zip(members, fused_rows, strict=True):
        torch.testing.assert_close(back.layers[f"transformer.{member}"].delta(), rows, atol=1e-5, rtol=0)
        assert back.layers[f"transformer.{member}"].rank == 4
    for member, rows in zip(("add_q_proj", "add_k_proj", "add_v_proj"), delta(plain).split(32), strict=True):
        torch.testing.assert_close(
            back.layers[f"transformer.{B0}.attn.{member}"].delta(), rows, atol=1e-5, rtol=0
        )
    assert back.source_format == "kohya Flux.1 LoRA"


def test_comfyui_ai_toolkit_onetrainer_and_xlabs_files_read_exactly(flux, tmp_path):
    layout = transformer_layout(flux, "flux")
    qkv = lora(96, 32, 4, seed=1, alpha=2.0)
    linear2 = lora(32, 160, 4, seed=2, alpha=8.0)
    comfy = read_file(
        tmp_path,
        comfyui_file({"double_blocks.0.img_attn.qkv": qkv, "single_blocks.1.linear2": linear2}),
        layout,
    )
    for member, rows in zip(("to_q", "to_k", "to_v"), delta(qkv).split(32), strict=True):
        torch.testing.assert_close(
            comfy.layers[f"transformer.{B0}.attn.{member}"].delta(), rows, atol=1e-5, rtol=0
        )
    torch.testing.assert_close(
        comfy.layers["transformer.single_transformer_blocks.1.proj_out"].delta(),
        delta(linear2),
        atol=1e-5,
        rtol=0,
    )

    q = lora(32, 32, 4, seed=3)
    ait = read_file(tmp_path, ai_toolkit_file({f"{S0}.attn.to_q": q}), layout, "ait.safetensors")
    torch.testing.assert_close(ait.layers[f"transformer.{S0}.attn.to_q"].delta(), delta(q), atol=1e-6, rtol=0)

    ff, te = lora(128, 32, 4, seed=4, alpha=1.0), lora(32, 32, 2, seed=5, alpha=4.0)
    text_path = "text_model.encoder.layers.0.self_attn.q_proj"
    one = read_file(
        tmp_path, onetrainer_file({f"{B0}.ff.net.0.proj": ff}, {text_path: te}), layout, "ot.safetensors"
    )
    torch.testing.assert_close(
        one.layers[f"transformer.{B0}.ff.net.0.proj"].delta(), delta(ff), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(one.layers[f"text_encoder.{text_path}"].delta(), delta(te), atol=1e-6, rtol=0)
    assert one.source_format == "OneTrainer Flux.1 LoRA"

    img, txt_out = lora(96, 32, 4, seed=6), lora(32, 32, 4, seed=7)
    xl = read_file(
        tmp_path, xlabs_file({0: {"qkv_lora1": img, "proj_lora2": txt_out}}), layout, "xlabs.safetensors"
    )
    for member, rows in zip(("to_q", "to_k", "to_v"), delta(img).split(32), strict=True):
        torch.testing.assert_close(
            xl.layers[f"transformer.{B0}.attn.{member}"].delta(), rows, atol=1e-5, rtol=0
        )
    torch.testing.assert_close(
        xl.layers[f"transformer.{B0}.attn.to_add_out"].delta(), delta(txt_out), atol=1e-6, rtol=0
    )
    assert xl.source_format == "XLabs Flux.1 LoRA"


def test_sd3_kohya_and_comfyui_names_read_exactly(sd3, tmp_path):
    layout = transformer_layout(sd3, "sd3")
    qkv, context_norm = lora(96, 32, 4, seed=1, alpha=2.0), lora(64, 32, 2, seed=2)
    g = lora(32, 32, 2, seed=3, alpha=1.0)
    tensors = kohya_file(
        {
            "joint_blocks.1.context_block.attn.qkv": qkv,
            "joint_blocks.1.context_block.adaLN_modulation.1": context_norm,
        }
    )
    tensors.update(kohya_file({"lora_te2_text_model_encoder_layers_1_mlp_fc1": lora(64, 32, 2, seed=4)}))
    back = read_file(tmp_path, tensors, layout)
    for member, rows in zip(("add_q_proj", "add_k_proj", "add_v_proj"), delta(qkv).split(32), strict=True):
        torch.testing.assert_close(
            back.layers[f"transformer.transformer_blocks.1.attn.{member}"].delta(), rows, atol=1e-5, rtol=0
        )
    scale, shift = delta(context_norm).chunk(2)  # the last block's text stream: halves swapped
    torch.testing.assert_close(
        back.layers["transformer.transformer_blocks.1.norm1_context.linear"].delta(),
        torch.cat([shift, scale]),
        atol=1e-6,
        rtol=0,
    )
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc1" in back.layers
    comfy = read_file(
        tmp_path,
        comfyui_file({"joint_blocks.0.x_block.mlp.fc2": lora(32, 128, 2, seed=5)}),
        layout,
        "c.safetensors",
    )
    assert set(comfy.layers) == {"transformer.transformer_blocks.0.ff.net.2"}
    assert g[0].shape == (2, 32)


@pytest.mark.parametrize(
    "tensors_for,made_for,message",
    [
        (
            lambda: kohya_file({"double_blocks.0.img_attn.qkv": lora(96, 32, 4, 0)}),
            "sd3",
            "made for Flux.1; the base model here is SD3",
        ),
        (
            lambda: kohya_file({"joint_blocks.0.x_block.attn.qkv": lora(96, 32, 4, 0)}),
            "flux",
            "made for SD3.5; the base model here is Flux.1",
        ),
        (
            lambda: kohya_file({"down_blocks.0.attentions.0.proj_in": lora(32, 32, 4, 0)}),
            "flux",
            "made for a Stable Diffusion UNet",
        ),
        (
            lambda: kohya_file({"lora_te3_encoder_block_0_layer_0_SelfAttention_q": lora(32, 64, 4, 0)}),
            "flux",
            "T5",
        ),
        (
            lambda: kohya_file({"double_blocks.0.img_attn.qkv": lora(96, 48, 4, 0)}),
            "flux",
            "made for a different base model",
        ),
        (
            lambda: kohya_file({"double_blocks.7.img_attn.qkv": lora(96, 32, 4, 0)}),
            "flux",
            "match nothing in a Flux.1 transformer",
        ),
    ],
)
def test_files_that_do_not_fit_are_refused_in_one_line(tensors_for, made_for, message, flux, sd3, tmp_path):
    layout = transformer_layout(flux if made_for == "flux" else sd3, made_for)
    save_file(tensors_for(), tmp_path / "x.safetensors")
    with pytest.raises(AdapterFormatError, match=message) as caught:
        read_transformer_adapter(tmp_path / "x.safetensors", layout)
    assert "\n" not in str(caught.value) and "x.safetensors" in str(caught.value)


def test_diffusers_names_alone_do_not_say_which_model_and_are_refused_without_one(tmp_path):
    save_file(ai_toolkit_file({f"{B0}.attn.to_q": lora(32, 32, 4, 0)}), tmp_path / "x.safetensors")
    with pytest.raises(AdapterFormatError, match="cannot tell whether it is for SD3 or Flux.1"):
        read_transformer_adapter(tmp_path / "x.safetensors")
    assert read_transformer_adapter(tmp_path / "x.safetensors", family="sd3").source_format.startswith(
        "diffusers SD3"
    )


def test_peft_state_of_a_transformer_keeps_its_module_paths(flux):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = flux.transformer
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"]), adapter_name="probe")
    try:
        state = get_peft_model_state_dict(transformer, adapter_name="probe")
        adapter = Adapter.from_peft(state, 4.0, part="transformer")
    finally:
        transformer.delete_adapters("probe")
    assert f"transformer.{B0}.attn.to_q" in adapter.layers
    assert f"transformer.{S0}.attn.to_q" in adapter.layers and len(adapter.layers) == 3
