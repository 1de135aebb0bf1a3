"""Single files in the original layouts people download, written here from the tiny models' weights.

The SD3 MMDiT names are diffusers' single-file conversion rules (single_file_utils) read in reverse:
the fused qkv of each stream, `joint_blocks.N.{x_block,context_block}`, and the halves of the final
(and last context) modulation swapped back to shift-then-scale. An all-in-one file prefixes them with
`model.diffusion_model.` and carries the VAE and text encoders beside (a stand-in key for each here).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# diffusers' names in transformer_blocks.N. -> MMDiT names in joint_blocks.N.
SD3_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
SD3_FUSED = {  # one MMDiT qkv per stream <- diffusers' three projections
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
ALL_IN_ONE_EXTRAS = (  # the parts an SD3.5 all-in-one file holds beside the MMDiT
    "first_stage_model.decoder.conv_in.weight",
    "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
    "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight",
    "text_encoders.t5xxl.transformer.shared.weight",
)


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' (scale, shift) <-> the original (shift, scale): its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_original_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tiny SD3 transformer's weights under the MMDiT names of Stability's files."""
    state = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    last = transformer.config.num_layers - 1
    out = {"pos_embed": state.pop("pos_embed.pos_embed")}
    for name, original in SD3_TOP.items():
        for kind in ("weight", "bias"):
            tensor = state.pop(f"{name}.{kind}")
            out[f"{original}.{kind}"] = swap_halves(tensor) if name == "norm_out.linear" else tensor
    for i in range(transformer.config.num_layers):
        prefix = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            for original, parts in SD3_FUSED.items():
                out[f"joint_blocks.{i}.{original}.{kind}"] = torch.cat(
                    [state.pop(f"{prefix}{part}.{kind}") for part in parts]
                )
            for name, original in SD3_BLOCK.items():
                key = f"{prefix}{name}.{kind}"
                if key in state:  # the last block's text stream has no output projection or mlp
                    tensor = state.pop(key)
                    swapped = i == last and name == "norm1_context.linear"
                    out[f"joint_blocks.{i}.{original}.{kind}"] = swap_halves(tensor) if swapped else tensor
    assert not state, f"left unmapped: {sorted(state)}"
    return out


def write_sd3_all_in_one(transformer: torch.nn.Module, path: Path, nudge: float = 0.0) -> Path:
    """An SD3.5-style all-in-one file: the MMDiT under model.diffusion_model. plus the other parts' keys.

    `nudge` is added to every transformer weight, so a test can tell the file's weights from the folder's."""
    tensors = {
        "model.diffusion_model." + key: (value + nudge).contiguous()
        for key, value in sd3_original_state(transformer).items()
    }
    tensors.update({key: torch.zeros(4) for key in ALL_IN_ONE_EXTRAS})
    save_file(tensors, str(path))
    return path


def write_flux_transformer_only(path: Path, guidance: bool = True, prefix: str = "") -> Path:
    """A header like BFL's transformer-only Flux.1 files (their key names, toy shapes): for recognition."""
    keys = [
        "img_in.weight",
        "txt_in.weight",
        "time_in.in_layer.weight",
        "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.0.img_attn.norm.key_norm.scale",
        "single_blocks.0.linear1.weight",
        "final_layer.linear.weight",
    ] + (["guidance_in.in_layer.weight", "guidance_in.in_layer.bias"] if guidance else [])
    save_file({prefix + key: torch.zeros(2, 2) for key in keys}, str(path))
    return path
