"""The original LDM / SGM key layout of single-file checkpoints, written from diffusers modules by tests.

Tests that need a checkpoint as people download it (tiny ones, test_single_file) or LoRA names in
the LDM layout (test_interop, foreign_formats) convert diffusers keys with these.
"""

from __future__ import annotations

import torch

LAYERS = 2  # resnets per down block, as in SD; the LDM block numbering depends on it
RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_NAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _resnet(rest: str) -> str:
    name, tail = rest.split(".", 1)
    return f"{RESNET_NAMES[name]}.{tail}"


def unet_key_to_ldm(key: str, up_blocks_with_attention: set[int], layers: int = LAYERS) -> str:
    """diffusers UNet key -> LDM key: blocks are numbered flat, layers + 1 slots per level."""
    LAYERS = layers  # noqa: N806 - the formulas below read as the LDM layout does
    p = key.split(".")
    if ".".join(p[:-1]) in UNET_TOP:
        return f"{UNET_TOP['.'.join(p[:-1])]}.{p[-1]}"
    if p[0] == "mid_block":
        rest = ".".join(p[3:])
        return (
            f"middle_block.{2 * int(p[2])}.{_resnet(rest)}" if p[1] == "resnets" else f"middle_block.1.{rest}"
        )
    level, kind, rest = int(p[1]), p[2], ".".join(p[4:])
    if kind == "downsamplers":
        return f"input_blocks.{(level + 1) * (LAYERS + 1)}.0.op.{p[-1]}"
    if kind == "upsamplers":  # after the level's last resnet (and its attention, if any)
        slot = 2 if level in up_blocks_with_attention else 1
        return f"output_blocks.{level * (LAYERS + 1) + LAYERS}.{slot}.conv.{p[-1]}"
    if p[0] == "down_blocks":
        block = f"input_blocks.{level * (LAYERS + 1) + int(p[3]) + 1}"
    else:
        block = f"output_blocks.{level * (LAYERS + 1) + int(p[3])}"
    return f"{block}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"


def vae_key_to_ldm(key: str, levels: int) -> str:
    """diffusers VAE key -> LDM key; the decoder's levels are numbered from the bottom."""
    side, p = key.split(".", 1)[0], key.split(".")
    if side not in ("encoder", "decoder"):
        return key
    if p[1] == "conv_norm_out":
        return f"{side}.norm_out.{p[-1]}"
    if p[1] == "mid_block":
        if p[2] == "attentions":
            return f"{side}.mid.attn_1.{VAE_ATTENTION['.'.join(p[4:-1])]}.{p[-1]}"
        return f"{side}.mid.block_{int(p[3]) + 1}.{p[4].replace('conv_shortcut', 'nin_shortcut')}.{p[-1]}"
    if p[1] in ("down_blocks", "up_blocks"):
        level = int(p[2]) if side == "encoder" else levels - 1 - int(p[2])
        stage = "down" if side == "encoder" else "up"
        if p[3] in ("downsamplers", "upsamplers"):
            return f"{side}.{stage}.{level}.{stage}sample.conv.{p[-1]}"
        return f"{side}.{stage}.{level}.block.{p[4]}.{p[5].replace('conv_shortcut', 'nin_shortcut')}.{p[-1]}"
    return key


def unet_vae_to_ldm(unet, vae) -> dict[str, torch.Tensor]:
    with_attention = {
        int(k.split(".")[1]) for k in unet.state_dict() if k.startswith("up_blocks") and ".attentions." in k
    }
    out = {
        f"model.diffusion_model.{unet_key_to_ldm(k, with_attention)}": v for k, v in unet.state_dict().items()
    }
    for key, value in vae.state_dict().items():
        ldm = vae_key_to_ldm(key, len(vae.config.block_out_channels))
        if ".mid.attn_1." in ldm and value.ndim == 2:  # LDM stores these as 1x1 convolutions
            value = value[:, :, None, None]
        out[f"first_stage_model.{ldm}"] = value
    return out


def clip_to_ldm(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP keeps the transformers names under a prefix (the flattened 5.x model lost `text_model.`)."""
    return {
        f"{prefix}{k if k.startswith('text_model.') else 'text_model.' + k}": v
        for k, v in encoder.state_dict().items()
    }


def open_clip_to_ldm(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP names, fused q/k/v and a transposed projection, as SD 2.x and SDXL store them."""
    sd = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {
        f"{prefix}token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        f"{prefix}positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        f"{prefix}ln_final.weight": sd.pop("final_layer_norm.weight"),
        f"{prefix}ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    projection = sd.pop("text_projection.weight", None)  # SD 2.x has one in the file but does not use it
    out[f"{prefix}text_projection"] = (
        torch.eye(encoder.config.hidden_size) if projection is None else projection.T
    )
    for i in range(encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{layer}self_attn.{x}_proj.{kind}") for x in "qkv"]
            )
            for name, ldm in OPEN_CLIP_NAMES.items():
                out[f"{block}{ldm}.{kind}"] = sd.pop(f"{layer}{name}.{kind}")
    assert not sd, f"unmapped text encoder weights: {sorted(sd)}"
    return out
