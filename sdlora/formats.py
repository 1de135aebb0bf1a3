"""Adapter files: safetensors in the diffusers (PEFT) format with metadata in the header.

The header carries both diffusers' own `lora_adapter_metadata` (so `load_lora_weights`
rebuilds the adapter with its true alpha) and the `ss_*` / `modelspec.*` keys that
kohya, AUTOMATIC1111 and Civitai read. Writes are atomic: temp file, then rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdlora.config import LoraSpec, TrainConfig
from sdlora.errors import AdapterFormatError
from sdlora.models import ModelInfo

UNET_PREFIX = "unet."
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # the key diffusers' loaders read
MODELSPEC_ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                          "sdxl": "stable-diffusion-xl-v1-base/lora"}


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same folder and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def diffusers_adapter_metadata(spec: LoraSpec) -> dict[str, Any]:
    """peft LoraConfig arguments, under the 'unet.' prefix as diffusers packs them."""
    config = {"r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
              "target_modules": sorted(spec.all_target_modules)}
    return {f"{UNET_PREFIX}{key}": value for key, value in config.items()}


def training_metadata(config: TrainConfig, info: ModelInfo, steps: int, captions: list[str],
                      tag_frequency: dict[str, int], processes: int = 1,
                      regularization_images: int = 0) -> dict[str, str]:
    """The header of a trained adapter: sdlora's own keys, kohya's ss_* and modelspec.*."""
    now = datetime.now(UTC)
    res = config.data.resolution
    folder = Path(config.data.images).name or "images"
    return {
        "sdlora.base_model": config.base_model,
        "sdlora.rank": str(config.lora.rank),
        "sdlora.alpha": repr(config.lora.alpha),
        "sdlora.steps": str(steps),
        "sdlora.resolution": str(res),
        "sdlora.trigger_word": config.data.trigger_word,
        "sdlora.image_count": str(len(captions)),
        "sdlora.family": info.family,
        "sdlora.prediction_type": info.prediction_type,
        "sdlora.processes": str(processes),
        "sdlora.train_config": config.to_json(),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.lora.rank),
        "ss_network_alpha": repr(float(config.lora.alpha)),
        "ss_base_model_version": info.kohya_version,
        "ss_v2": str(info.family == "sd2"),
        "ss_sd_model_name": Path(config.base_model).name or config.base_model,
        "ss_output_name": config.name,
        "ss_steps": str(steps),
        "ss_max_train_steps": str(config.steps),
        "ss_resolution": f"({res}, {res})",
        "ss_num_train_images": str(len(captions)),
        "ss_num_reg_images": str(regularization_images),
        "ss_prior_loss_weight": repr(config.prior_loss_weight),
        "ss_learning_rate": repr(config.learning_rate),
        "ss_unet_lr": repr(config.learning_rate),
        "ss_text_encoder_lr": "0.0",
        "ss_lr_scheduler": config.lr_schedule,
        "ss_lr_warmup_steps": str(config.warmup_steps),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_mixed_precision": config.mixed_precision,
        "ss_seed": str(config.seed),
        "ss_min_snr_gamma": repr(config.min_snr_gamma),
        "ss_noise_offset": repr(config.noise_offset),
        "ss_training_finished_at": str(int(now.timestamp())),
        "ss_tag_frequency": json.dumps({folder: tag_frequency}),
        "ss_training_comment": f"trained with sdlora; trigger word: {config.data.trigger_word}".strip(),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[info.family],
        "modelspec.implementation": "diffusers",
        "modelspec.title": config.name,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": now.strftime("%Y-%m-%d"),
        "modelspec.trigger_phrase": config.data.trigger_word,
    }


def save_adapter(path: Path, lora_state: dict[str, torch.Tensor], spec: LoraSpec,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write PEFT-format adapter tensors (keys without 'unet.') as a diffusers LoRA file."""
    tensors = {f"{UNET_PREFIX}{key}": value.contiguous() for key, value in lora_state.items()}
    header = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(diffusers_adapter_metadata(spec), sort_keys=True)}
    header.update({key: str(value) for key, value in (metadata or {}).items()})
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's string metadata; AdapterFormatError if it is not a safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise AdapterFormatError(f"{Path(path).name} is not a readable safetensors file: {exc}") from None
