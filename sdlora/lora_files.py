"""LoRA files from anywhere: checked before loading, read into one form, written in either format.

The one in-memory form is PEFT keys (`unet.<module>.lora_A.weight`) plus a true alpha per
module. Foreign files are checked header-first: pickles are refused unopened, and a header
that claims more bytes than the file holds is refused before any tensor is allocated.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdlora.errors import AdapterFormatError
from sdlora.formats import DIFFUSERS_METADATA_KEY, UNET_PREFIX, atomic_write

MAX_HEADER_BYTES = 64 * 1024 * 1024  # real LoRA headers are kilobytes; metadata-heavy ones a few MB
MAX_TENSOR_ELEMENTS = 1 << 31
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")


@dataclass
class LoraWeights:
    """An adapter in PEFT key form with the alpha of each adapted module."""

    tensors: dict[str, torch.Tensor]
    alphas: dict[str, float]  # module path with its 'unet.'/'text_encoder.' prefix -> alpha
    source_format: str  # "diffusers" or "kohya"
    metadata: dict[str, str] = field(default_factory=dict)

    def modules(self) -> list[str]:
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.tensors if ".lora_A." in k})

    def rank(self, module: str) -> int:
        return int(self.tensors[f"{module}.lora_A.weight"].shape[0])

    def delta(self, module: str) -> torch.Tensor:
        """(alpha/r)·B·A of one linear module: what the adapter adds to its weight at weight 1."""
        a = self.tensors[f"{module}.lora_A.weight"].float()
        b = self.tensors[f"{module}.lora_B.weight"].float()
        return (self.alphas[module] / a.shape[0]) * (b.flatten(1) @ a.flatten(1))


def check_header(path: Path) -> dict:
    """Parse and sanity-check a safetensors header without reading any tensor data."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if head.startswith(PICKLE_MAGIC):
                raise AdapterFormatError(f"{name} is a pickled PyTorch file; pickles can run code when opened "
                                         "and are refused. Use the .safetensors version of this adapter")
            if len(head) < 8:
                raise AdapterFormatError(f"{name} is empty or too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise AdapterFormatError(f"{name}: header claims {header_len:,} bytes but the file has {size:,}; "
                                         "damaged or not a safetensors file")
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise AdapterFormatError(f"{name} cannot be read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterFormatError(f"{name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{name} is not a safetensors file (bad header)")
    _check_tensor_sizes(name, header, size - 8 - header_len)
    return header


def _check_tensor_sizes(name: str, header: dict, data_bytes: int) -> None:
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            elements = math.prod(info["shape"])
            width = DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise AdapterFormatError(f"{name}: tensor {key!r} has a malformed header entry") from None
        if elements > MAX_TENSOR_ELEMENTS or not 0 <= start <= end <= data_bytes or end - start != elements * width:
            raise AdapterFormatError(f"{name}: tensor {key!r} claims a size the file does not hold "
                                     f"(shape {info['shape']}); damaged or hostile file refused")


def read_lora(path: str | Path) -> LoraWeights:
    """Read a diffusers/PEFT or kohya LoRA .safetensors file; AdapterFormatError names the file and problem."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise AdapterFormatError(f"{path.name}: only .safetensors adapters are accepted "
                                 f"({path.suffix or 'no suffix'} files may be pickles, which can run code)")
    header = check_header(path)
    metadata = {k: str(v) for k, v in (header.get("__metadata__") or {}).items()}
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        raise AdapterFormatError(f"{path.name} holds no tensors")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad data
        raise AdapterFormatError(f"{path.name} could not be read: {exc}") from None
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return _from_kohya(path.name, tensors, metadata)
    if any(".lora_A." in k or ".lora.down." in k or ".lora_down." in k for k in keys):
        return _from_diffusers(path.name, tensors, metadata)
    raise AdapterFormatError(f"{path.name} is not a LoRA adapter (no lora_A/lora_down tensors); "
                             "is it a full model checkpoint or another kind of network?")


def _from_diffusers(name: str, tensors: dict, metadata: dict) -> LoraWeights:
    from diffusers.utils import convert_state_dict_to_peft

    if not all(k.startswith((UNET_PREFIX, *TEXT_ENCODER_PREFIXES)) for k in tensors):
        tensors = {f"{UNET_PREFIX}{k}" if not k.startswith(TEXT_ENCODER_PREFIXES) else k: v
                   for k, v in tensors.items()}
    if not any(".lora_A." in k for k in tensors):
        tensors = convert_state_dict_to_peft(tensors)
    config = json.loads(metadata.get(DIFFUSERS_METADATA_KEY, "{}") or "{}")
    weights = LoraWeights(tensors, {}, "diffusers", metadata)
    for module in weights.modules():
        prefix = module.split(".", 1)[0] + "."
        short = module[len(prefix):]
        pattern = config.get(f"{prefix}alpha_pattern") or {}
        alpha = next((v for k, v in pattern.items() if short.endswith(k)), config.get(f"{prefix}lora_alpha"))
        weights.alphas[module] = float(alpha if alpha is not None else weights.rank(module))
    return weights


def _from_kohya(name: str, tensors: dict, metadata: dict) -> LoraWeights:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft

    try:
        converted, network_alphas = StableDiffusionPipeline.lora_state_dict(dict(tensors))
    except Exception as exc:  # noqa: BLE001 - diffusers' converters raise ValueError/KeyError alike
        raise AdapterFormatError(f"{name}: kohya keys could not be mapped to diffusers modules: {exc}") from None
    peft: dict[str, torch.Tensor] = {}
    for prefix in (UNET_PREFIX, *TEXT_ENCODER_PREFIXES):
        part = {k[len(prefix):]: v for k, v in converted.items() if k.startswith(prefix)}
        if part:
            part = convert_unet_state_dict_to_peft(part) if prefix == UNET_PREFIX else convert_state_dict_to_peft(part)
            peft.update({prefix + k: v for k, v in part.items()})
    weights = LoraWeights(peft, {}, "kohya", metadata)
    alphas = {_alpha_module(k): float(v) for k, v in (network_alphas or {}).items()}
    for module in weights.modules():
        weights.alphas[module] = alphas.get(module, float(weights.rank(module)))
    return weights


def _alpha_module(key: str) -> str:
    """diffusers' network-alpha key -> the PEFT module path it belongs to."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    stem = key.removesuffix(".alpha")
    prefix = next((p for p in (UNET_PREFIX, *TEXT_ENCODER_PREFIXES) if stem.startswith(p)), "")
    mapped = next(iter(convert_unet_state_dict_to_peft({stem[len(prefix):]: 0}).keys()))
    return prefix + mapped.rsplit(".lora_", 1)[0]


def check_fits(weights: LoraWeights, name: str, unet_shapes: dict[str, tuple[int, ...]], family: str) -> None:
    """Refuse an adapter whose modules or shapes do not exist in the base UNet."""
    claimed = weights.metadata.get("ss_base_model_version", "") or weights.metadata.get("modelspec.architecture", "")
    if claimed and (("xl" in claimed.lower()) != (family == "sdxl")):
        raise AdapterFormatError(f"{name} was made for {claimed}; the base model here is {family.upper()}")
    for module in weights.modules():
        if not module.startswith(UNET_PREFIX):
            continue
        path = module[len(UNET_PREFIX):]
        if path not in unet_shapes:
            raise AdapterFormatError(f"{name} adapts {path}, which this {family} base model does not have: "
                                     "made for a different architecture")
        out_features, in_features = unet_shapes[path][:2]
        a = weights.tensors[f"{module}.lora_A.weight"]
        b = weights.tensors[f"{module}.lora_B.weight"]
        if a.shape[1] != in_features or b.shape[0] != out_features or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(f"{name}: {path} has shapes A{tuple(a.shape)} B{tuple(b.shape)}, but the base "
                                     f"layer is {in_features}->{out_features}; made for a different base model")


def to_kohya(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """kohya/AUTOMATIC1111 keys (lora_unet_..., lora_down/lora_up) with each module's true alpha."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya(dict(weights.tensors))
    for module, alpha in weights.alphas.items():
        stem = kohya_stem(module)
        if f"{stem}.alpha" not in kohya:
            raise AdapterFormatError(f"no kohya name for module {module}")
        kohya[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return {k: v.contiguous() for k, v in kohya.items()}


def kohya_stem(module: str) -> str:
    """'unet.down_blocks.0.attentions.0...to_out.0' -> 'lora_unet_down_blocks_0_attentions_0_..._to_out_0'."""
    for prefix, kohya_prefix in ((UNET_PREFIX, "lora_unet_"), ("text_encoder_2.", "lora_te2_"),
                                 ("text_encoder.", "lora_te1_")):
        if module.startswith(prefix):
            return kohya_prefix + module[len(prefix):].replace(".", "_")
    raise AdapterFormatError(f"module {module} belongs to no known model part")


def diffusers_metadata(weights: LoraWeights) -> dict[str, str]:
    """lora_adapter_metadata for diffusers: one lora_alpha, plus an alpha_pattern where modules differ."""
    packed: dict[str, object] = {}
    for prefix in (UNET_PREFIX, *TEXT_ENCODER_PREFIXES):
        modules = [m for m in weights.modules() if m.startswith(prefix)]
        if not modules:
            continue
        rank = max(weights.rank(m) for m in modules)
        common = max((weights.alphas[m] for m in modules), key=list(weights.alphas.values()).count)
        targets = sorted({m[len(prefix):] for m in modules})
        packed.update({f"{prefix}r": rank, f"{prefix}lora_alpha": common, f"{prefix}target_modules": targets,
                       f"{prefix}rank_pattern": {m[len(prefix):]: weights.rank(m) for m in modules
                                                 if weights.rank(m) != rank},
                       f"{prefix}alpha_pattern": {m[len(prefix):]: weights.alphas[m] for m in modules
                                                  if weights.alphas[m] != common}})
    return {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, sort_keys=True)}


def write_lora(weights: LoraWeights, path: Path, fmt: str, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write in 'diffusers' or 'kohya' format, keeping the user-facing metadata."""
    keep = {k: v for k, v in weights.metadata.items() if k not in (DIFFUSERS_METADATA_KEY, "format")}
    keep.update(extra_metadata or {})
    if fmt == "kohya":
        tensors, header = to_kohya(weights), {"format": "pt", **keep}
    elif fmt == "diffusers":
        tensors = {k: v.contiguous() for k, v in weights.tensors.items()}
        header = {**keep, **diffusers_metadata(weights)}
    else:
        raise AdapterFormatError(f"unknown format {fmt!r}; use diffusers or kohya")
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return path


def unet_linear_shapes(unet: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """(out, in) of every Linear/Conv module of a UNet (real or on the meta device), by module path."""
    shapes = {}
    for name, module in unet.named_modules():
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear):
            shapes[name] = (base.out_features, base.in_features)
        elif isinstance(base, torch.nn.Conv2d):
            shapes[name] = (base.out_channels, base.in_channels, *base.kernel_size)
    return shapes
