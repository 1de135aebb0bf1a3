"""The one road from settings to a TrainConfig: defaults, then the base model's, then a preset, then yours.

The CLI (a --config file and flags), the Train tab's widgets, /train's settings object and
`queue add` all call `train_config_from`, so the same values give the same TrainConfig at every
door, and it is checked once, here. Imports nothing heavy (no torch): a bad setting is refused
before a model loads.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from sdlora.assets import DEMO_MODEL
from sdlora.config import TrainConfig, merge_settings, read_settings
from sdlora.errors import ConfigError
from sdlora.models.families import family_named, is_family_name
from sdlora.training.presets import model_defaults, preset_for, preset_settings, read_family_and_resolution

NativeResolution = int | Callable[[], int] | None


def train_config_from(
    values: dict[str, Any],
    *,
    base_model: str | None = None,
    preset: str | None = None,
    native_resolution: NativeResolution = None,
    source: str = "settings",
    validate: bool = True,
) -> TrainConfig:
    """Settings (nested tables or field paths, read strictly) -> a checked TrainConfig.

    Layers, each over the one before: the dataclass defaults, the base model's defaults (the demo
    preset on the demo model, else its native resolution), the preset named (if any), `values`.
    `base_model` given (a server's model) replaces the one in `values`; without either, the demo
    model. data.resolution 0 means the model's native resolution: read from its configs, else
    `native_resolution` (a number, or a function that loads the model to find it).
    """
    given = read_settings(values, source)
    model = base_model if base_model is not None else given.get("base_model") or str(DEMO_MODEL)
    layers = [model_defaults(model)[1]]
    if preset:
        layers.append(preset_settings(preset_for(model, preset)))
    layers.append({**given, "base_model": model})
    config = TrainConfig.from_dict(merge_settings(*layers), source)
    if config.data.resolution == 0:
        config = _at_native_resolution(config, native_resolution)
    if validate:
        config.validate()
        _check_quantize_base(config)
        _check_for_family(config)
    return config


def _check_quantize_base(config: TrainConfig) -> None:
    """A quantized base on a machine that cannot run it is refused here where torch is already loaded (the
    app): then it costs nothing to know; elsewhere the run refuses it before the model loads."""
    if config.quantize_base != "none" and "torch" in sys.modules:
        from sdlora.models.loading import check_quantize_base

        check_quantize_base(config.quantize_base)


def _check_for_family(config: TrainConfig) -> None:
    """Refuse, before anything loads, a setting that means nothing for the base model's family (where its
    configs say which family it is); training asks the family again once the model is loaded."""
    family = read_family_and_resolution(config.base_model)[0]
    if is_family_name(family):
        family_named(family).trained_with(config)


def defaults_line(base_model: str) -> str:
    """One line saying which of the base model's defaults filled what the settings left out."""
    return model_defaults(base_model)[0]


def _at_native_resolution(config: TrainConfig, native: NativeResolution) -> TrainConfig:
    resolution = model_defaults(config.base_model)[1].get("data", {}).get("resolution")
    if resolution is None and native is not None:
        resolution = native() if callable(native) else native
    if not resolution:
        raise ConfigError(
            f"resolution 0 means the base model's native size, which {config.base_model} does not say "
            "before it loads; give a resolution (512 for SD 1.x, 1024 for SDXL)"
        )
    return config.replace(data=dataclasses.replace(config.data, resolution=resolution))
