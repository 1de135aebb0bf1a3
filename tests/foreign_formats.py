"""LoRA files as other tools write them, re-implemented here from their documented naming rules.

Each writer takes layers as `{"<part>.<module path>": (down, up, alpha)}` in diffusers names and
writes the tensors that tool would write; none of them uses sdlora's own writer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ldm_layout import unet_key_to_ldm
from safetensors.torch import save_file

Layers = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def ldm_path(path: str, layers: int, up_attention: set[int]) -> str:
    """A diffusers UNet module path in original-SD names (the tested single-file mapping)."""
    return unet_key_to_ldm(path + ".weight", up_attention, layers).removesuffix(".weight")


def _text_path(path: str) -> str:
    return path if path.startswith("text_model.") else "text_model." + path


def kohya(layers: Layers, unet_names=lambda p: p) -> dict[str, torch.Tensor]:
    """kohya sd-scripts: 'lora_unet_' / 'lora_te_' + path with '_' for '.', lora_down/lora_up/alpha."""
    out = {}
    for key, (down, up, alpha) in layers.items():
        part, path = key.split(".", 1)
        stem = ("lora_unet_" + unet_names(path) if part == "unet" else "lora_te_" + _text_path(path)).replace(
            ".", "_"
        )
        out.update(
            {
                f"{stem}.lora_down.weight": down,
                f"{stem}.lora_up.weight": up,
                f"{stem}.alpha": torch.tensor(alpha),
            }
        )
    return out


def comfyui(layers: Layers, layers_per_block: int, up_attention: set[int]) -> dict[str, torch.Tensor]:
    """ComfyUI's own layout: 'diffusion_model.<original SD name>' and 'text_encoder.text_model...'."""
    out = {}
    for key, (down, up, alpha) in layers.items():
        part, path = key.split(".", 1)
        stem = (
            f"diffusion_model.{ldm_path(path, layers_per_block, up_attention)}"
            if part == "unet"
            else f"text_encoder.{_text_path(path)}"
        )
        out.update(
            {
                f"{stem}.lora_down.weight": down,
                f"{stem}.lora_up.weight": up,
                f"{stem}.alpha": torch.tensor(alpha),
            }
        )
    return out


def peft_state(layers: Layers, part: str, fold_alpha: bool) -> dict[str, torch.Tensor]:
    """peft's get_peft_model_state_dict of one part; with fold_alpha, the scale moved into lora_B."""
    out = {}
    for key, (down, up, alpha) in layers.items():
        if not key.startswith(part + "."):
            continue
        path = key.split(".", 1)[1]
        if part != "unet":
            path = path.removeprefix("text_model.")  # transformers 5's CLIPTextModel is flat
        out[f"{path}.lora_A.weight"] = down
        out[f"{path}.lora_B.weight"] = up * (alpha / down.shape[0]) if fold_alpha else up
    return out


def diffusers_save(pipeline_class, layers: Layers, folder: Path, old_keys: bool) -> Path:
    """diffusers' own save_lora_weights: old '.lora.down.' keys as its training scripts wrote them
    (no alpha: the scale is folded in), or peft keys with the LoraConfig in the header."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig

    kwargs = {}
    for part, argument in (("unet", "unet_lora_layers"), ("text_encoder", "text_encoder_lora_layers")):
        state = peft_state(layers, part, fold_alpha=old_keys)
        if not state:
            continue
        kwargs[argument] = convert_state_dict_to_diffusers(state) if old_keys else state
        if not old_keys:
            modules = sorted({k.split(".lora_")[0] for k in state})
            alphas = {
                m: next(
                    a
                    for k, (_, _, a) in layers.items()
                    if k.endswith("." + m) or k.endswith(".text_model." + m)
                )
                for m in modules
            }
            common = max(set(alphas.values()), key=list(alphas.values()).count)
            config = LoraConfig(
                r=next(iter(state.values())).shape[0],
                lora_alpha=common,
                target_modules=modules,
                alpha_pattern={m: a for m, a in alphas.items() if a != common},
            )
            kwargs[argument.replace("_layers", "_adapter_metadata")] = config.to_dict()
    pipeline_class.save_lora_weights(
        str(folder), weight_name="pytorch_lora_weights.safetensors", safe_serialization=True, **kwargs
    )
    return folder / "pytorch_lora_weights.safetensors"


def peft_save_pretrained(unet, layers: Layers, folder: Path) -> Path:
    """peft's own PeftModel.save_pretrained of the UNet: 'base_model.model.' keys, alpha in adapter_config.json."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    state = peft_state(layers, "unet", fold_alpha=False)
    modules = sorted({k.split(".lora_")[0] for k in state})
    alphas = {k.split(".", 1)[1]: a for k, (_, _, a) in layers.items() if k.startswith("unet.")}
    common = max(set(alphas.values()), key=list(alphas.values()).count)
    config = LoraConfig(
        r=next(iter(state.values())).shape[0],
        lora_alpha=common,
        target_modules=modules,
        alpha_pattern={m: a for m, a in alphas.items() if a != common},
    )
    model = get_peft_model(unet, config)
    result = set_peft_model_state_dict(model, {f"base_model.model.{k}": v for k, v in state.items()})
    assert not result.unexpected_keys
    model.save_pretrained(str(folder))
    return folder / "adapter_model.safetensors"


def loha_layers(shapes: dict[str, tuple[int, ...]], rank: int, seed: int, tucker_conv: bool):
    """LyCORIS LoHa tensors for the given layers, and the ΔW LyCORIS defines for each."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for i, (key, shape) in enumerate(shapes.items()):
        stem = kohya({key: (torch.zeros(1), torch.zeros(1), 0.0)}).popitem()[0].split(".")[0]
        out, flat_in = shape[0], int(torch.tensor(shape[1:]).prod())
        alpha = float(rank) / (2 + i % 3)
        if tucker_conv and len(shape) == 4 and shape[2] > 1:
            parts = {
                "hada_w1_a": torch.randn(rank, out, generator=g),
                "hada_w1_b": torch.randn(rank, shape[1], generator=g),
                "hada_t1": torch.randn(rank, rank, *shape[2:], generator=g),
                "hada_w2_a": torch.randn(rank, out, generator=g),
                "hada_w2_b": torch.randn(rank, shape[1], generator=g),
                "hada_t2": torch.randn(rank, rank, *shape[2:], generator=g),
            }
            parts = {k: v * 0.1 for k, v in parts.items()}
            w1 = torch.einsum("ijkl,jr,ip->prkl", parts["hada_t1"], parts["hada_w1_b"], parts["hada_w1_a"])
            w2 = torch.einsum("ijkl,jr,ip->prkl", parts["hada_t2"], parts["hada_w2_b"], parts["hada_w2_a"])
            delta = w1 * w2
        else:
            parts = {
                "hada_w1_a": torch.randn(out, rank, generator=g) * 0.1,
                "hada_w1_b": torch.randn(rank, flat_in, generator=g) * 0.1,
                "hada_w2_a": torch.randn(out, rank, generator=g) * 0.1,
                "hada_w2_b": torch.randn(rank, flat_in, generator=g) * 0.1,
            }
            delta = (
                (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
            ).reshape(shape)
        tensors.update({f"{stem}.{k}": v for k, v in parts.items()})
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        deltas[key] = delta * (alpha / rank)
    return tensors, deltas


def lokr_layers(shapes: dict[str, tuple[int, ...]], rank: int, seed: int):
    """LyCORIS LoKr tensors (factored w2, a full-full layer, a Tucker conv) and each layer's ΔW."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for i, (key, shape) in enumerate(shapes.items()):
        stem = kohya({key: (torch.zeros(1), torch.zeros(1), 0.0)}).popitem()[0].split(".")[0]
        out, inp = shape[0], shape[1]
        f_out, f_in = (4 if out % 4 == 0 else 1), (4 if inp % 4 == 0 else 1)
        o2, i2 = out // f_out, inp // f_in
        w1 = torch.randn(f_out, f_in, generator=g) * 0.3
        alpha = 2.0 + i % 3
        parts = {"lokr_w1": w1}
        conv = len(shape) == 4
        if conv and shape[2] > 1 and i % 2 == 0:  # Tucker w2
            parts.update(
                lokr_t2=torch.randn(rank, rank, *shape[2:], generator=g) * 0.3,
                lokr_w2_a=torch.randn(rank, o2, generator=g) * 0.3,
                lokr_w2_b=torch.randn(rank, i2, generator=g) * 0.3,
            )
            w2 = torch.einsum("ijkl,ip,jr->prkl", parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
            scale = alpha / rank
        elif i % 3 == 1:  # both factors full: LyCORIS ignores alpha
            w2 = torch.randn(o2, i2, *shape[2:], generator=g) * 0.3
            parts["lokr_w2"] = w2
            scale = 1.0
        else:
            parts.update(
                lokr_w2_a=torch.randn(o2, rank, generator=g) * 0.3,
                lokr_w2_b=torch.randn(rank, i2 * int(torch.tensor(shape[2:]).prod()), generator=g) * 0.3,
            )
            w2 = (parts["lokr_w2_a"] @ parts["lokr_w2_b"]).reshape(o2, i2, *shape[2:])
            scale = alpha / rank
        w1_full = w1.reshape(f_out, f_in, 1, 1) if conv else w1
        deltas[key] = torch.kron(w1_full, w2.contiguous()) * scale
        tensors.update({f"{stem}.{k}": v for k, v in parts.items()})
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    return tensors, deltas


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(path),
        metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()},
    )
    return path
