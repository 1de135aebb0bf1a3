"""The optimizer a run asks for; the optional ones say which package to install when it is missing."""

from __future__ import annotations

import importlib

import torch

from sdlora.config import TrainConfig
from sdlora.errors import ConfigError

PACKAGES = {
    "adamw8bit": ("bitsandbytes", "pip install bitsandbytes (it needs a CUDA GPU)"),
    "prodigy": ("prodigyopt", "pip install prodigyopt"),
}


def check_available(config: TrainConfig) -> None:
    """Say which package a chosen optimizer needs before minutes go into loading and encoding."""
    if config.optimizer in PACKAGES:
        _module(config.optimizer)


def _module(name: str):
    module_name, how = PACKAGES[name]
    try:
        return importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(
            f"--optimizer {name} needs the {module_name} package, which is not installed: {how}; "
            "or use --optimizer adamw or adafactor"
        ) from None


def make_optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, 8-bit AdamW, Adafactor or Prodigy over the LoRA parameters."""
    name, lr, decay = config.optimizer, config.learning_rate, config.weight_decay
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed rate under our own schedule, like kohya's recommended Adafactor settings for LoRA.
        return Adafactor(
            parameters,
            lr=lr,
            weight_decay=decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    module = _module(name)
    if name == "adamw8bit":
        return module.optim.AdamW8bit(parameters, lr=lr, weight_decay=decay)
    return module.Prodigy(parameters, lr=lr, weight_decay=decay)
