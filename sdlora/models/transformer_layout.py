"""An SD3.5 or Flux.1 transformer in the layout of the single files people download.

The inverse of diffusers' single-file conversion (`convert_sd3_transformer_checkpoint_to_diffusers`,
`convert_flux_transformer_checkpoint_to_diffusers`): the original models compute q, k and v of a
stream with one fused projection (and Flux's single blocks q, k, v and the MLP's input with one,
`linear1`), so diffusers' separate projections are stacked back in that order; the final
modulation (and SD3's last text-stream modulation, which has no block after it) is stored
shift-then-scale in the originals and scale-then-shift in diffusers, so its halves are swapped.
Flux.1 is written as Black Forest Labs ship it (`flux1-dev.safetensors`: the transformer alone,
bare keys), SD3.5 as Stability does (`sd3.5_large.safetensors`: under `model.diffusion_model.`).
"""

from __future__ import annotations

import torch

from sdlora.errors import ModelLoadError

Rule = tuple[
    str, tuple[str, ...], bool
]  # original module, the diffusers modules stacked into it, swap halves

SD3_TOP: tuple[Rule, ...] = (
    ("x_embedder.proj", ("pos_embed.proj",), False),
    ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), False),
    ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), False),
    ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), False),
    ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), False),
    ("context_embedder", ("context_embedder",), False),
    ("final_layer.linear", ("proj_out",), False),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), True),
)
SD3_BLOCK: tuple[Rule, ...] = (  # joint_blocks.N. <- transformer_blocks.N.
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), False),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), False),
    ("x_block.attn.ln_q", ("attn.norm_q",), False),  # SD3.5's qk norm
    ("x_block.attn.ln_k", ("attn.norm_k",), False),
    ("context_block.attn.ln_q", ("attn.norm_added_q",), False),
    ("context_block.attn.ln_k", ("attn.norm_added_k",), False),
    ("x_block.attn.proj", ("attn.to_out.0",), False),
    ("context_block.attn.proj", ("attn.to_add_out",), False),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v"), False),  # 3.5 Medium's MMDiT-X
    ("x_block.attn2.ln_q", ("attn2.norm_q",), False),
    ("x_block.attn2.ln_k", ("attn2.norm_k",), False),
    ("x_block.attn2.proj", ("attn2.to_out.0",), False),
    ("x_block.adaLN_modulation.1", ("norm1.linear",), False),
    ("context_block.adaLN_modulation.1", ("norm1_context.linear",), False),
    ("x_block.mlp.fc1", ("ff.net.0.proj",), False),
    ("x_block.mlp.fc2", ("ff.net.2",), False),
    ("context_block.mlp.fc1", ("ff_context.net.0.proj",), False),
    ("context_block.mlp.fc2", ("ff_context.net.2",), False),
)
FLUX_TOP: tuple[Rule, ...] = (
    ("img_in", ("x_embedder",), False),
    ("txt_in", ("context_embedder",), False),
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), False),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), False),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), False),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), False),
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), False),  # dev only
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), False),
    ("final_layer.linear", ("proj_out",), False),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), True),
)
FLUX_DOUBLE: tuple[Rule, ...] = (  # double_blocks.N. <- transformer_blocks.N.
    ("img_mod.lin", ("norm1.linear",), False),
    ("txt_mod.lin", ("norm1_context.linear",), False),
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), False),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), False),
    ("img_attn.norm.query_norm", ("attn.norm_q",), False),
    ("img_attn.norm.key_norm", ("attn.norm_k",), False),
    ("txt_attn.norm.query_norm", ("attn.norm_added_q",), False),
    ("txt_attn.norm.key_norm", ("attn.norm_added_k",), False),
    ("img_attn.proj", ("attn.to_out.0",), False),
    ("txt_attn.proj", ("attn.to_add_out",), False),
    ("img_mlp.0", ("ff.net.0.proj",), False),
    ("img_mlp.2", ("ff.net.2",), False),
    ("txt_mlp.0", ("ff_context.net.0.proj",), False),
    ("txt_mlp.2", ("ff_context.net.2",), False),
)
FLUX_SINGLE: tuple[Rule, ...] = (  # single_blocks.N. <- single_transformer_blocks.N.
    ("modulation.lin", ("norm.linear",), False),
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), False),
    ("norm.query_norm", ("attn.norm_q",), False),
    ("norm.key_norm", ("attn.norm_k",), False),
    ("linear2", ("proj_out",), False),
)


def sd3_tensors(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The MMDiT's weights under the names of Stability's SD3/SD3.5 files (without their prefix)."""
    state = dict(transformer.state_dict())
    out = {"pos_embed": state.pop("pos_embed.pos_embed")}
    out.update(_renamed(state, "", "", SD3_TOP))
    last = transformer.config.num_layers - 1
    for i in range(transformer.config.num_layers):
        # The last block's text stream ends in a final-layer style norm (scale, shift in diffusers).
        rules = tuple((o, s, i == last and o == "context_block.adaLN_modulation.1") for o, s, _ in SD3_BLOCK)
        out.update(_renamed(state, f"transformer_blocks.{i}.", f"joint_blocks.{i}.", rules))
    return _all_named(out, state)


def flux_tensors(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The Flux.1 transformer's weights under the names of Black Forest Labs' files."""
    state = dict(transformer.state_dict())
    out = _renamed(state, "", "", FLUX_TOP)
    for i in range(transformer.config.num_layers):
        out.update(_renamed(state, f"transformer_blocks.{i}.", f"double_blocks.{i}.", FLUX_DOUBLE))
    for i in range(transformer.config.num_single_layers):
        out.update(_renamed(state, f"single_transformer_blocks.{i}.", f"single_blocks.{i}.", FLUX_SINGLE))
    return _all_named(out, state)


def _renamed(state: dict, ours: str, theirs: str, rules: tuple[Rule, ...]) -> dict[str, torch.Tensor]:
    """The rules applied to one block's weights and biases, taken out of `state` (absent modules skipped)."""
    out = {}
    for original, sources, swap in rules:
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{ours}{source}.{kind}", None) for source in sources]
            if all(p is None for p in parts):
                continue
            if any(p is None for p in parts):
                raise ModelLoadError(
                    f"the transformer's {ours}{sources[0]} lacks a {kind} its neighbours have"
                )
            tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
            # Flux's RMS norms keep their one weight as `scale`.
            name = "scale" if original.endswith("_norm") else kind
            out[f"{theirs}{original}.{name}"] = _swap_halves(tensor) if swap else tensor
    return out


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale) along the output rows; its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def _all_named(out: dict[str, torch.Tensor], left: dict) -> dict[str, torch.Tensor]:
    """The converted tensors, or a one-line refusal naming weights the original layout has no name for."""
    if left:
        raise ModelLoadError(
            f"the transformer has weights its single-file layout has no name for: {sorted(left)[:3]}; "
            "save a diffusers folder instead"
        )
    return out
