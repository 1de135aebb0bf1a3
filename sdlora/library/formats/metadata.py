"""The header of an adapter trained here: sdlora's own keys, kohya's ss_* and modelspec.*.

AUTOMATIC1111, Civitai and kohya's tools read the ss_* and modelspec.* keys; sdlora reads its
own `sdlora.*` keys back (the config that trained it, the family of its base model).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from sdlora.config import TrainConfig
from sdlora.models.loading import ModelInfo


def training_metadata(
    config: TrainConfig,
    info: ModelInfo,
    steps: int,
    captions: list[str],
    tag_frequency: dict[str, int],
    processes: int = 1,
    regularization_images: int = 0,
    denoiser_config: dict | None = None,
) -> dict[str, str]:
    """The header of a trained adapter: sdlora's own keys, kohya's ss_* and modelspec.*.

    `denoiser_config` (the base model's) tells a family's variants apart in modelspec's id (Flux.1
    schnell, SD3.5 Medium or Large); without it, the family's own id."""
    now = datetime.now(UTC)
    family = info.model_family
    architecture = (
        family.architecture_of(denoiser_config) if denoiser_config else family.modelspec_architecture
    )
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
        **_network_args(config),
        "ss_network_dim": str(config.lora.rank),
        "ss_network_alpha": repr(float(config.lora.alpha)),
        "ss_base_model_version": info.kohya_version,
        "ss_v2": str(family.kohya_v2),
        "ss_sd_model_name": Path(config.base_model).name or config.base_model,
        "ss_output_name": config.name,
        "ss_steps": str(steps),
        "ss_max_train_steps": str(config.steps),
        "ss_resolution": f"({res}, {res})",
        "ss_num_train_images": str(len(captions)),
        "ss_num_reg_images": str(regularization_images),
        "ss_prior_loss_weight": repr(config.prior_loss_weight),
        "ss_learning_rate": repr(config.learning_rate),
        "ss_optimizer": config.optimizer,
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
        "modelspec.architecture": architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": config.name,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": now.strftime("%Y-%m-%d"),
        "modelspec.trigger_phrase": config.data.trigger_word,
    }


def _network_args(config: TrainConfig) -> dict[str, str]:
    """kohya records convolution LoRA (LoCon) settings in ss_network_args."""
    convolutions = {"conv1", "conv2", "conv_shortcut", "conv"} & set(config.lora.extra_target_modules)
    if not convolutions:
        return {}
    return {
        "ss_network_args": json.dumps(
            {"conv_dim": str(config.lora.rank), "conv_alpha": repr(config.lora.alpha)}
        )
    }
