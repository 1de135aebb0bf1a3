"""A loaded SD 1.x/2.x or SDXL pipeline as one state dict in the original (LDM/SGM) checkpoint layout.

This is the layout of the single `.safetensors` files people download, which AUTOMATIC1111, Forge
and ComfyUI load: the UNet under `model.diffusion_model.` with the original block numbering
(the UNet's names are those of `library/formats/names.py`, shared with LoRA files), the VAE under
`first_stage_model.`, and the text encoders under the prefix each family's loader looks for:
OpenAI CLIP keeps transformers' names, OpenCLIP (SD 2.x, SDXL's second encoder) has its own, with
q, k and v stacked in one `in_proj` and the projection stored transposed.
SD3.5 and Flux.1 transformers are written in their own originals' names (transformer_layout.py):
SD3.5 as Stability's `sd3.5_large.safetensors`, the MMDiT under `model.diffusion_model.` and the
VAE under `first_stage_model.`; Flux.1 as Black Forest Labs' `flux1-dev.safetensors`, the
transformer alone with bare keys. Neither holds the text encoders (T5-XXL alone is ~9.5 GB in
fp16; ComfyUI and Forge load the stock encoders beside these files), so a mix that changes one is
refused for a single file rather than silently left out.
"""

from __future__ import annotations

import torch

from sdlora.errors import ModelLoadError
from sdlora.library.formats.names import UNetBlocks, canonical_text_path, to_ldm
from sdlora.models.families import family_named, is_family_name
from sdlora.models.transformer_layout import flux_tensors, sd3_tensors

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


TRANSFORMER_PARTS = {"sd3": ("transformer", "vae"), "flux": ("transformer",)}  # what their files hold


def original_state_dict(pipeline, family: str) -> dict[str, torch.Tensor]:
    """Every weight the family's single file holds, under its original checkpoint key."""
    check_family(family)
    if family == "flux":
        return flux_tensors(pipeline.transformer)
    if family == "sd3":
        out = {UNET_PREFIX + k: v for k, v in sd3_tensors(pipeline.transformer).items()}
        out.update(vae_tensors(pipeline.vae))
        return out
    out = unet_tensors(pipeline.unet)
    out.update(vae_tensors(pipeline.vae))
    for part, kind, prefix in family_named(family).original_text_encoders:
        encoder = getattr(pipeline, part)
        out.update(clip_tensors(encoder, prefix) if kind == "clip" else open_clip_tensors(encoder, prefix))
    return out


def check_family(family: str, changed_parts: set[str] | frozenset[str] = frozenset()) -> None:
    """Refuse, in one line, a family whose single-file layout is not written here, or a change to a
    part its file does not hold (the text encoders of SD3.5 and Flux.1)."""
    if not (
        is_family_name(family)
        and (family_named(family).original_text_encoders or family in TRANSFORMER_PARTS)
    ):
        raise ModelLoadError(
            f"a single file in the original layout is written for SD 1.x, 2.x, SDXL, SD3.5 and Flux.1, "
            f"not {family}; save a diffusers folder instead"
        )
    held = TRANSFORMER_PARTS.get(family)
    left_out = sorted(changed_parts - set(held)) if held else []
    if left_out:
        raise ModelLoadError(
            f"a {family_named(family).words} single file holds the {' and '.join(held)} only, not the "
            f"{', '.join(left_out)} this mix changes; bake to a diffusers folder to keep them"
        )


def unet_tensors(unet) -> dict[str, torch.Tensor]:
    """The UNet under `model.diffusion_model.` with LDM block names."""
    blocks = UNetBlocks.of(unet.config)
    if blocks is None:
        raise ModelLoadError(
            "this UNet has a different number of ResNets per level: it has no original layout"
        )
    out = {}
    for key, value in unet.state_dict().items():
        path, parameter = key.rsplit(".", 1)
        ldm = to_ldm(path, blocks)
        if ldm is None:
            raise ModelLoadError(f"the UNet's {path} has no name in the original layout")
        out[f"{UNET_PREFIX}{ldm}.{parameter}"] = value
    return out


def vae_tensors(vae) -> dict[str, torch.Tensor]:
    """The VAE under `first_stage_model.`; the decoder's levels count from the bottom, attention is 1x1 conv."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        name = vae_name(key, levels)
        if ".mid.attn_1." in name and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + name] = value
    return out


def vae_name(key: str, levels: int) -> str:
    """One diffusers VAE key in LDM names (quant_conv and the outer convs keep theirs)."""
    p = key.split(".")
    side = p[0]
    if side not in ("encoder", "decoder"):
        return key
    if p[1] == "conv_norm_out":
        return f"{side}.norm_out.{p[-1]}"
    if p[1] == "mid_block":
        if p[2] == "attentions":
            return f"{side}.mid.attn_1.{VAE_ATTENTION['.'.join(p[4:-1])]}.{p[-1]}"
        return f"{side}.mid.block_{int(p[3]) + 1}.{_shortcut(p[4])}.{p[-1]}"
    if p[1] in ("down_blocks", "up_blocks"):
        level = int(p[2]) if side == "encoder" else levels - 1 - int(p[2])
        stage = "down" if side == "encoder" else "up"
        if p[3] in ("downsamplers", "upsamplers"):
            return f"{side}.{stage}.{level}.{stage}sample.conv.{p[-1]}"
        return f"{side}.{stage}.{level}.block.{p[4]}.{_shortcut(p[5])}.{p[-1]}"
    return key


def _shortcut(name: str) -> str:
    return "nin_shortcut" if name == "conv_shortcut" else name


def clip_tensors(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP: transformers' own names (with `text_model.`) under the prefix."""
    return {prefix + canonical_text_path(k): v for k, v in encoder.state_dict().items()}


def open_clip_tensors(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP's names: q, k, v stacked as `attn.in_proj`, the projection transposed (identity if absent)."""
    sd = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    projection = sd.pop("text_projection.weight", None)
    out = {
        f"{prefix}token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        f"{prefix}positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        f"{prefix}ln_final.weight": sd.pop("final_layer_norm.weight"),
        f"{prefix}ln_final.bias": sd.pop("final_layer_norm.bias"),
        f"{prefix}text_projection": (
            torch.eye(encoder.config.hidden_size) if projection is None else projection.T.contiguous()
        ),
    }
    for i in range(encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{layer}self_attn.{x}_proj.{kind}") for x in "qkv"]
            )
            for name, original in OPEN_CLIP.items():
                out[f"{block}{original}.{kind}"] = sd.pop(f"{layer}{name}.{kind}")
    sd.pop("embeddings.position_ids", None)
    if sd:
        raise ModelLoadError(
            f"the text encoder has weights the original layout has no name for: {sorted(sd)[:3]}"
        )
    return out
