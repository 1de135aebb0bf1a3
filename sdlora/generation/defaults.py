"""What a drawing uses where the user sets nothing: the base model's own settings, else GenerateConfig's.

SD3.5 and Flux.1 are drawn as their model cards say (their family files hold the numbers) and only
with their own flow-matching sampler; the UNet families keep GenerateConfig's defaults and every
sampler. The CLI fills the flags a user left out from here, the Generate tab its initial values,
and the Generator refuses, in one line, a setting the model cannot use.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

from sdlora.config import MODEL_SAMPLER, SCHEDULERS, GenerateConfig
from sdlora.errors import ConfigError, SdloraError
from sdlora.models.families import FAMILIES, Family, family_of
from sdlora.models.families.base import SamplingDefaults

# The settings a base model may choose when the user leaves them out.
MODEL_CHOSEN = ("steps", "guidance", "scheduler")


def _config_default(name: str):
    return next(f.default for f in dataclasses.fields(GenerateConfig) if f.name == name)


CONFIG_DEFAULTS = SamplingDefaults(_config_default("steps"), _config_default("guidance"), SCHEDULERS)


def sampling_defaults(family: Family, denoiser_config: dict) -> SamplingDefaults:
    """The family's own settings for a model with this denoiser config, else GenerateConfig's."""
    return family.sampling_defaults(denoiser_config) or CONFIG_DEFAULTS


def sampling_defaults_of(base_model: str) -> tuple[Family | None, SamplingDefaults]:
    """The family and sampling defaults a local diffusers folder's configs say, without loading it.

    (None, GenerateConfig's) where nothing can be read before loading (a hub id, a single file)."""
    path = Path(base_model).expanduser()
    for folder in dict.fromkeys(f.denoiser for f in FAMILIES):
        config_file = path / folder / "config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
                family = family_of(config)
            except (OSError, ValueError, TypeError, AttributeError, SdloraError):
                return None, CONFIG_DEFAULTS  # loading reports a damaged folder properly
            return family, sampling_defaults(family, config)
    return None, CONFIG_DEFAULTS


def with_model_defaults(
    config: GenerateConfig, defaults: SamplingDefaults, unset: Iterable[str]
) -> GenerateConfig:
    """`config` with the settings the user left out (`unset`, of MODEL_CHOSEN) as the model's."""
    chosen = {"steps": defaults.steps, "guidance": defaults.guidance, "scheduler": defaults.samplers[0]}
    return dataclasses.replace(config, **{name: chosen[name] for name in unset})


def with_model_sampler(config: GenerateConfig, defaults: SamplingDefaults) -> GenerateConfig:
    """`config` with scheduler 'auto' (left out) as the model's own sampler: Euler a on the UNet families."""
    if config.scheduler != MODEL_SAMPLER:
        return config
    return dataclasses.replace(config, scheduler=defaults.samplers[0])


def check_fits_model(config: GenerateConfig, defaults: SamplingDefaults, model_words: str) -> None:
    """Refuse, in one line, a sampler or negative prompt the model would not use."""
    if config.scheduler not in defaults.samplers:
        raise ConfigError(
            f"scheduler {config.scheduler!r} does not suit {model_words}, which draws with its own "
            f"sampler: choose {' or '.join(repr(s) for s in defaults.samplers)}"
        )
    if config.negative_prompt and not defaults.negative_prompt_used:
        raise ConfigError(
            f"negative_prompt: {model_words} draws without one (no classifier-free guidance); leave it empty"
        )
