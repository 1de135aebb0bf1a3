"""Read any common LoRA file into an Adapter, or refuse it in one line that names the file.

Accepted: kohya LoRA and LoCon (diffusers or original-SD block names, with or without
text-encoder layers), ComfyUI's `diffusion_model.` names, diffusers' `save_lora_weights` output
(old `.lora.down.` and attention-processor keys, new `lora_A/lora_B`), PEFT `base_model.model.`
keys, and LyCORIS LoHa, LoKr and Tucker LoCon. Given the base model's layout, every layer
must exist there with a matching shape.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from sdlora.errors import AdapterFormatError
from sdlora.library.formats.adapter import Adapter, LoraLayer, ModelLayout, alpha_or_rank
from sdlora.library.formats.files import check_header, header_metadata, load_tensors, read_scalars
from sdlora.library.formats.names import (
    SDXL_BLOCKS,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    UNetBlocks,
    canonical_text_path,
    dotted,
    from_ldm,
    split_kohya_stem,
)
from sdlora.models.families import DEFAULT, family_claimed_by, family_named, is_family_name

if TYPE_CHECKING:  # torch loads with a file's tensors; summaries of headers need none
    import torch

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps peft's LoraConfig per model part
ROLE_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),  # attention processors: to_q_lora
    (".alpha", "alpha"),
    *(
        (f".{name}", name)
        for name in (
            "hada_w1_a",
            "hada_w1_b",
            "hada_w2_a",
            "hada_w2_b",
            "hada_t1",
            "hada_t2",
            "lokr_w1_a",
            "lokr_w1_b",
            "lokr_w2_a",
            "lokr_w2_b",
            "lokr_w1",
            "lokr_w2",
            "lokr_t2",
        )
    ),
)
OTHER_NETWORKS = (  # (part of a key, what the file is), for a one-line refusal
    ("dora_scale", "a DoRA adapter"),
    ("lora_magnitude_vector", "a DoRA adapter"),
    ("oft_", "an OFT/BOFT adapter"),
    (".on_input", "an (IA)3 adapter"),
    (".ia3_l", "an (IA)3 adapter"),
    (".w_norm", "a LyCORIS norm-layer adapter"),
    (".diff_b", "a LyCORIS full (weight difference) adapter"),
    (".diff", "a LyCORIS full (weight difference) adapter"),
    (".a1.weight", "a GLoRA adapter"),
    (".b1.weight", "a GLoRA adapter"),
)
RANK_ROLES = ("down", "hada_w1_b", "lokr_w2_b", "lokr_w1_b")  # the tensor whose rows are a layer's rank
LDM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
UNET_ROOTS = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "add_embedding",
)


def read_adapter(path: str | Path, layout: ModelLayout | None = None, alpha: float | None = None) -> Adapter:
    """Any LoRA .safetensors file as an Adapter; with `layout`, checked to fit that base model.

    `alpha`: the alpha of layers whose file keeps none (a PEFT file without its adapter_config.json).
    """
    path = Path(path)
    name = path.name
    if path.suffix.lower() != ".safetensors":
        raise AdapterFormatError(
            f"{name}: only .safetensors adapters are accepted "
            f"({path.suffix or 'no suffix'} files may be pickles, which can run code)"
        )
    header = check_header(path)
    metadata = header_metadata(header)
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        raise AdapterFormatError(f"{name} holds no tensors")
    refuse_other_networks(name, keys)
    if _for_a_transformer(metadata, keys, layout):
        from sdlora.library.formats.transformer_read import read_transformer_adapter

        return read_transformer_adapter(path, layout)
    groups, strays = group_keys(keys)
    if not any("down" in roles or "hada_w1_a" in roles or _is_lokr(roles) for roles in groups.values()):
        raise AdapterFormatError(
            f"{name} is not a LoRA adapter (no lora_down/lora_A tensors); "
            "is it a full model checkpoint or another kind of network?"
        )
    if strays:
        raise AdapterFormatError(
            f"{name}: {len(strays)} of {len(keys)} tensors are not LoRA weights "
            f"(first: {_short(strays[0])!r}); damaged or an unsupported network type"
        )
    check_family(name, metadata, layout)
    tensors = load_tensors(path)
    blocks = _blocks(layout, groups)
    peft_alphas = PeftAlphas(metadata, _peft_config_beside(path, groups))
    if alpha is None:
        refuse_peft_without_config(path, groups, peft_alphas)
    layers, unmatched = {}, []
    for stem, roles in groups.items():
        key = layer_key(stem, blocks, layout)
        if key is None:
            unmatched.append(stem)
            continue
        parts = {role: tensors[k] for role, k in roles.items()}
        own = _alpha(name, key, parts.pop("alpha")) if "alpha" in parts else peft_alphas.get(key)
        shape = layout.shapes.get(key) if layout is not None else None
        layers[key] = build_layer(name, key, parts, alpha if own is None else own, shape)
    if unmatched:
        where = f"this {family_words(layout.family)} base model" if layout else "a Stable Diffusion model"
        raise AdapterFormatError(
            f"{name}: {len(unmatched)} of {len(groups)} layers match nothing in {where} "
            f"(first: {_short(unmatched[0], 70)}); made for a different architecture"
        )
    return Adapter(layers, metadata, describe(groups))


def _for_a_transformer(metadata: dict[str, str], keys: list[str], layout: ModelLayout | None) -> bool:
    """Whether the file is read as an SD3.5/Flux.1 adapter: the base model is one, or (with no base
    model) the header or the layer names say so."""
    if layout is not None:
        return is_family_name(layout.family) and family_named(layout.family).adapter_layout == "transformer"
    claimed = family_claimed_by(metadata)
    if claimed is not None:
        return claimed.adapter_layout == "transformer"
    from sdlora.library.formats.transformer_names import family_of_stems

    return family_of_stems(list(group_keys(keys)[0])) is not None


def _alpha(name: str, key: str, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1:
        raise AdapterFormatError(
            f"{name}: layer {_short(key, 70)} has an alpha of shape {tuple(tensor.shape)}, "
            "not one number; damaged file"
        )
    return float(tensor.item())


def refuse_other_networks(name: str, keys: list[str]) -> None:
    for key in keys:
        for marker, what in OTHER_NETWORKS:
            if marker in key:
                raise AdapterFormatError(
                    f"{name} is {what} ({_short(key, 60)!r}); only LoRA, LoCon, LoHa and "
                    "LoKr files can be used here"
                )


def group_keys(keys: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Tensor names grouped by layer stem: {stem: {role: key}}, and the names that fit no role."""
    groups: dict[str, dict[str, str]] = {}
    strays = []
    for key in keys:
        for suffix, role in ROLE_SUFFIXES:
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[role] = key
                break
        else:
            strays.append(key)
    alpha_only = [stem for stem, roles in groups.items() if set(roles) == {"alpha"}]
    for stem in alpha_only:  # alphas of layers whose weights are missing: reported as strays
        strays.append(groups.pop(stem)["alpha"])
    return groups, strays


def summarize(header: dict) -> tuple[str, int | None]:
    """What a file is and its largest rank, from a checked header alone (no tensor is read)."""
    groups, _ = group_keys([key for key in header if key != "__metadata__"])
    if not groups:
        return "", None
    ranks = []
    for roles in groups.values():
        role = next((r for r in RANK_ROLES if r in roles), None)
        shape = header[roles[role]]["shape"] if role is not None else []
        if shape:  # a 0-d "down" is damaged; reading the file says so, listing it must not crash
            ranks.append(shape[0])
    return describe(groups), max(ranks, default=None)


def file_alpha(path: Path, header: dict) -> float | None:
    """The commonest layer alpha of a file, from its header and its one-number alpha tensors (no torch):
    kohya's ss_network_alpha is not in files that diffusers, ComfyUI or an import wrote."""
    config = PeftAlphas(header_metadata(header)).config
    alphas = [
        float(v) for k, v in config.items() if k.endswith(".lora_alpha") and isinstance(v, (int, float))
    ]
    if not alphas:
        alphas = read_scalars(path, header, [k for k in header if k.endswith(".alpha")])
    alphas = [a for a in alphas if math.isfinite(a)]
    return Counter(alphas).most_common(1)[0][0] if alphas else None


def header_problem(name: str, header: dict) -> str | None:
    """Why a plain LoRA layer cannot be used, from a checked header's shapes alone (no tensor is read)."""
    groups, _ = group_keys([key for key in header if key != "__metadata__"])
    for key, roles in groups.items():
        if "down" in roles and "up" in roles:
            down, up = header[roles["down"]]["shape"], header[roles["up"]]["shape"]
            if len(down) < 2 or len(up) < 2 or up[1] != down[0]:
                return f"{name}: layer {key} has down {tuple(down)} and up {tuple(up)}, which cannot multiply; damaged file"
    return None


def _is_lokr(roles: dict[str, str]) -> bool:
    return any(role.startswith("lokr_") for role in roles)


def claimed_family(metadata: dict[str, str]) -> str | None:
    """The base family a file's header names (sdlora's, kohya's or modelspec's key), if any."""
    family = family_claimed_by(metadata)
    return family.name if family is not None else None


def family_words(name: str) -> str:
    """A family's name as a person says it ('SD 1.x'); an unknown stored name as it is."""
    return family_named(name).words if is_family_name(name) else name


def check_family(name: str, metadata: dict[str, str], layout: ModelLayout | None) -> None:
    """Refuse a file whose header names a family of another layout than the base model's."""
    claimed = metadata.get("ss_base_model_version", "") or metadata.get("modelspec.architecture", "")
    if layout is None or not claimed:
        return
    made_for = family_claimed_by(metadata) or DEFAULT
    base = family_named(layout.family) if is_family_name(layout.family) else DEFAULT
    if made_for.adapter_layout != base.adapter_layout:
        raise AdapterFormatError(
            f"{name} was made for {claimed}; the base model here is {family_words(layout.family)}"
        )


def _blocks(layout: ModelLayout | None, groups: dict) -> UNetBlocks:
    if layout is not None and layout.blocks is not None:
        return layout.blocks
    if any(stem.startswith(("lora_te2_", "text_encoder_2.")) for stem in groups):
        return SDXL_BLOCKS
    return UNetBlocks()


def layer_key(stem: str, blocks: UNetBlocks, layout: ModelLayout | None) -> str | None:
    """`<part>.<diffusers path>` for a file's layer stem, or None if it names no layer of the model."""
    kohya = split_kohya_stem(stem)
    if kohya is not None:
        part, path = kohya
    else:
        part, path = _dotted_part(stem.removeprefix("base_model.model."))
    if part == UNET:
        if path.startswith(LDM_ROOTS) and not path.startswith(UNET_ROOTS):
            path = from_ldm(path, blocks)
            if path is None:
                return None
        path = path.replace(".processor.", ".")
        if path.endswith(".to_out"):
            path += ".0"
    else:
        path = canonical_text_path(_attention_processor_names(path))
    key = f"{part}.{path}"
    if layout is not None:
        return key if key in layout.shapes else None
    plausible = (
        path.startswith(UNET_ROOTS) if part == UNET else path.startswith(("text_model.", "text_projection"))
    )
    return key if plausible else None


def _attention_processor_names(path: str) -> str:
    """Old diffusers text-encoder keys name CLIP's projections as attention processors did."""
    for old, new in (
        (".to_q", ".q_proj"),
        (".to_k", ".k_proj"),
        (".to_v", ".v_proj"),
        (".to_out", ".out_proj"),
    ):
        if path.endswith(old):
            return path[: -len(old)] + new
    return path


def _dotted_part(stem: str) -> tuple[str, str]:
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if stem.startswith(prefix):
            return UNET, stem[len(prefix) :]
    for part in (TEXT_ENCODER_2, TEXT_ENCODER, UNET):
        if stem.startswith(part + "."):
            return part, stem[len(part) + 1 :]
    if stem.startswith(("text_model.", "encoder.layers.")):
        return TEXT_ENCODER, stem
    if "_" in stem and "." not in stem:
        return UNET, dotted(stem)
    return UNET, stem


def build_layer(
    name: str, key: str, parts: dict[str, torch.Tensor], alpha: float | None, shape: tuple[int, ...] | None
) -> LoraLayer:
    """One layer of any algorithm as an exact LoRA layer, shaped to fit `shape` when known; a layer
    with a missing or inconsistent tensor is refused in one line."""
    try:
        layer = _build_layer(name, key, parts, alpha, shape)
    except KeyError as exc:
        raise AdapterFormatError(
            f"{name}: layer {_short(key, 70)} has no {exc.args[0]} tensor; damaged file"
        ) from None
    except (RuntimeError, IndexError, ValueError):
        shapes = ", ".join(f"{role}{tuple(t.shape)}" for role, t in parts.items())
        raise AdapterFormatError(
            f"{name}: layer {_short(key, 70)} has tensors that do not fit together "
            f"({_short(shapes, 90)}); damaged file"
        ) from None
    return layer


def _build_layer(
    name: str, key: str, parts: dict[str, torch.Tensor], alpha: float | None, shape: tuple[int, ...] | None
) -> LoraLayer:
    from sdlora.library.formats import lycoris

    if "hada_w1_a" in parts:
        return _checked(name, key, lycoris.loha(parts, alpha, shape or _loha_shape(parts)), shape)
    if _is_lokr(parts):
        return _checked(name, key, lycoris.lokr(parts, alpha, shape or _lokr_shape(parts)), shape)
    if "down" not in parts or "up" not in parts:
        missing = "up" if "down" in parts else "down"
        raise AdapterFormatError(f"{name}: layer {_short(key, 70)} has no {missing} weight; damaged file")
    down, up = parts["down"].float(), parts["up"].float()
    rank = down.shape[0]
    alpha = alpha_or_rank(alpha, rank)
    if "mid" in parts:
        layer = lycoris.locon_with_mid(down, parts["mid"], up, alpha)
    else:
        layer = LoraLayer(down, up, alpha)
    return _checked(name, key, layer, shape)


def _loha_shape(parts: dict[str, torch.Tensor]) -> tuple[int, ...]:
    if "hada_t1" in parts:
        return (parts["hada_w1_a"].shape[1], parts["hada_w1_b"].shape[1], *parts["hada_t1"].shape[2:])
    return (parts["hada_w1_a"].shape[0], parts["hada_w1_b"].shape[1])


def _lokr_shape(parts: dict[str, torch.Tensor]) -> tuple[int, ...]:
    w1 = (
        parts["lokr_w1"].shape
        if "lokr_w1" in parts
        else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1])
    )
    if "lokr_w2" in parts:
        w2 = tuple(parts["lokr_w2"].shape)
    elif "lokr_t2" in parts:
        w2 = (parts["lokr_w2_a"].shape[1], parts["lokr_w2_b"].shape[1], *parts["lokr_t2"].shape[2:])
    else:
        w2 = (parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"].shape[1])
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


def _checked(name: str, key: str, layer: LoraLayer, shape: tuple[int, ...] | None) -> LoraLayer:
    """Reshape a layer to its weight's shape (1x1 convolutions vs linear), refusing what cannot fit."""
    import torch

    if layer.rank < 1 or layer.up.ndim < 2 or layer.up.shape[0] == 0 or layer.up[0].numel() != layer.rank:
        raise AdapterFormatError(
            f"{name}: layer {_short(key, 70)} has up{tuple(layer.up.shape)} for "
            f"down{tuple(layer.down.shape)}; their ranks differ, damaged file"
        )
    if shape is None:
        return layer
    rank, out = layer.rank, shape[0]
    fits = (
        layer.up.shape[0] == out
        and layer.up[0].numel() == rank
        and layer.down.numel() == rank * int(torch.tensor(shape[1:]).prod())
    )
    if not fits:
        raise AdapterFormatError(
            f"{name}: {_short(key.split('.', 1)[1], 70)} has shapes down{tuple(layer.down.shape)} "
            f"up{tuple(layer.up.shape)}, but the base layer is {tuple(shape)}; made for a different base model"
        )
    up = layer.up.reshape(out, rank, 1, 1) if len(shape) == 4 else layer.up.reshape(out, rank)
    return LoraLayer(layer.down.reshape(rank, *shape[1:]), up, layer.alpha)


def _peft_config_beside(path: Path, groups: dict) -> dict:
    """peft's save_pretrained keeps alpha in adapter_config.json next to the weights, not in them."""
    config_path = path.with_name("adapter_config.json")
    if not config_path.is_file() or not any(stem.startswith("base_model.model.") for stem in groups):
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    text = all(
        stem.startswith(("base_model.model.text_model.", "base_model.model.encoder.")) for stem in groups
    )
    part = TEXT_ENCODER if text else UNET
    return (
        {f"{part}.{k}": v for k, v in config.items() if k in ("lora_alpha", "alpha_pattern")}
        if isinstance(config, dict)
        else {}
    )


def refuse_peft_without_config(path: Path, groups: dict, alphas: PeftAlphas) -> None:
    """A PEFT file's alpha lives in adapter_config.json beside it: without it every scale would be a guess."""
    peft = [roles for stem, roles in groups.items() if stem.startswith("base_model.model.")]
    if peft and not any("alpha" in roles for roles in peft) and not alphas.known():
        raise AdapterFormatError(
            f"{path.name}: a PEFT file keeps its alpha in adapter_config.json beside it, and there is "
            f"none in {path.parent}; put it there, or give the alpha (--alpha) to import it"
        )


class PeftAlphas:
    """Alphas of PEFT-keyed files from diffusers' `lora_adapter_metadata` (peft's LoraConfig per part)."""

    def __init__(self, metadata: dict[str, str], beside: dict | None = None) -> None:
        try:
            self.config = json.loads(metadata.get(DIFFUSERS_METADATA_KEY) or "{}")
        except json.JSONDecodeError:
            self.config = {}
        if not isinstance(self.config, dict):
            self.config = {}
        self.config.update(beside or {})

    def known(self) -> bool:
        """Whether any part's alpha is known (from the header or an adapter_config.json)."""
        return any(k.endswith((".lora_alpha", ".alpha_pattern")) for k in self.config)

    def get(self, key: str) -> float | None:
        part, path = key.split(".", 1)
        pattern = self.config.get(f"{part}.alpha_pattern") or {}
        candidates = (path, path.removeprefix("text_model."))
        for pattern_key, alpha in pattern.items():  # peft: the first pattern that ends the module path wins
            if any(c == pattern_key or c.endswith("." + pattern_key) for c in candidates):
                return float(alpha)
        alpha = self.config.get(f"{part}.lora_alpha")
        return float(alpha) if alpha is not None else None


def describe(groups: dict[str, dict[str, str]]) -> str:
    """What kind of file this was, in the words its users know."""
    roles = set().union(*(set(r) for r in groups.values()))
    stems = list(groups)
    if any(r.startswith("hada_") for r in roles):
        return "LyCORIS LoHa"
    if any(r.startswith("lokr_") for r in roles):
        return "LyCORIS LoKr"
    if all(s.startswith(("lora_unet_", "lora_te")) for s in stems):
        ldm = any(s.startswith(tuple(f"lora_unet_{root}" for root in LDM_ROOTS)) for s in stems)
        return "kohya LoRA (original SD block names)" if ldm else "kohya LoRA"
    if any(s.startswith(("diffusion_model.", "model.diffusion_model.")) for s in stems):
        return "ComfyUI LoRA (diffusion_model. names)"
    if any(s.startswith("base_model.model.") for s in stems):
        return "PEFT LoRA (base_model.model. keys)"
    if any(".lora_A" in k or ".lora_B" in k for r in groups.values() for k in r.values()):
        return "diffusers LoRA (PEFT keys)"
    return "diffusers LoRA (lora.down keys)"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
