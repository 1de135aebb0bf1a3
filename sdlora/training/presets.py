"""Starting points for common concepts: the settings a first run of each kind takes.

Presets only fill in numbers the user can still change. The demo model gets its own
preset: it is tiny, trains at 64 px, and needs more than the attention projections to
learn a new shape: the ResNet convolutions are what draw a star's points (see
docs/demo-model.md and docs/benchmarks.md, learning section).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdlora.config import DataConfig, LoraSpec, TrainConfig

DEMO_MODEL = Path(__file__).resolve().parents[2] / "assets" / "demo-model"
DEMO_REGULARIZATION = DEMO_MODEL.parent / "regularization"


@dataclass(frozen=True)
class Preset:
    rank: int
    alpha: float
    steps: int
    learning_rate: float
    resolution: int  # 0: the base model's native resolution
    batch_size: int = 1
    extra_target_modules: tuple[str, ...] = ()
    regularization_images: str = ""
    prior_loss_weight: float = 1.0  # the regularisation images' loss against the concept's
    note: str = ""


PRESETS: dict[str, Preset] = {
    "Style": Preset(
        rank=16,
        alpha=16,
        steps=1500,
        learning_rate=1e-4,
        resolution=0,
        note="a look across many subjects: more steps, higher rank",
    ),
    "Character": Preset(
        rank=16,
        alpha=8,
        steps=1200,
        learning_rate=1e-4,
        resolution=0,
        note="a person or character: 10-30 varied images with captions work best",
    ),
    "Object": Preset(
        rank=8,
        alpha=8,
        steps=800,
        learning_rate=1e-4,
        resolution=0,
        note="one thing from several angles: low rank is enough",
    ),
    "Demo": Preset(
        rank=16,
        alpha=16,
        steps=600,
        learning_rate=2e-3,
        resolution=64,
        batch_size=4,
        extra_target_modules=("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"),
        regularization_images=str(DEMO_REGULARIZATION),
        prior_loss_weight=2.0,
        note="the embedded 64-px demo model: learns a new shape, colour or texture in minutes on a CPU; "
        "adapts the ResNet convolutions and feed-forward layers as well as attention (a new shape "
        "needs them); "
        "trains beside 24 of the base's own scenes (assets/regularization), their loss weighted 2x, "
        "so prompts without the trigger keep drawing what they asked for",
    ),
}


DEMO_MARKER = "sdlora_demo.json"  # the demo builder's record, kept beside the weights


def is_demo_model(base_model: str) -> bool:
    """True for the embedded demo model wherever it lives: its folder carries the builder's record."""
    try:
        folder = Path(base_model).expanduser()
        return (folder / DEMO_MARKER).is_file() and (folder / "model_index.json").is_file()
    except OSError:
        return False


def model_defaults(base_model: str) -> tuple[str, dict[str, Any]]:
    """Settings a run takes from what the base model is, and a line saying so.

    The demo model (by its marker) gets the demo preset; a diffusers folder or single-file
    checkpoint gets its own native resolution (1024 px for SDXL, 768 for SD 2.x-v); anything
    unreadable keeps the generic defaults.
    """
    if is_demo_model(base_model):
        return f"defaults: the demo preset (demo model, {DEMO_MARKER} in {base_model})", preset_settings(
            PRESETS["Demo"]
        )
    family, resolution = _read_family_and_resolution(base_model)
    if resolution is None:
        return "defaults: generic (the base model's config could not be read before loading)", {}
    return (
        f"defaults: {FAMILY_NAMES.get(family, family)} at its native {resolution} px (from the model's config)",
        {"data": {"resolution": resolution}},
    )


def fill_model_defaults(values: dict[str, Any]) -> str:
    """Fill the settings `values` (nested, as in a config file) does not give from what its base model is."""
    label, settings = model_defaults(str(values.get("base_model", "")))
    for key, value in settings.items():
        if isinstance(value, dict):
            section = values.setdefault(key, {})
            for name, setting in value.items():
                section.setdefault(name, setting)
        else:
            values.setdefault(key, value)
    return label


FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def _read_family_and_resolution(base_model: str) -> tuple[str, int | None]:
    import json

    path = Path(base_model).expanduser()
    if path.suffix.lower() == ".safetensors" and path.is_file():
        from sdlora.models.single_file import CONFIG_ROOT, inspect_checkpoint  # reads the header only

        try:
            path = CONFIG_ROOT / inspect_checkpoint(path).architecture
        except Exception:  # noqa: BLE001 - loading reports a damaged file properly; here only defaults are at stake
            return "", None
    from sdlora.models.loading import family_and_resolution

    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
        family, resolution, _ = family_and_resolution(unet, vae)
    except (OSError, ValueError, KeyError, TypeError):
        return "", None
    return family, resolution


def preset_for(base_model: str, kind: str) -> Preset:
    """The preset for a kind of concept; on the demo model every kind uses the demo preset."""
    if is_demo_model(base_model):
        return PRESETS["Demo"]
    if kind not in PRESETS:
        raise KeyError(f"unknown preset {kind!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[kind]


def preset_settings(preset: Preset, native_resolution: int = 512) -> dict[str, Any]:
    """The preset as nested TrainConfig settings: the one mapping from presets to configs."""
    data: dict[str, Any] = {"resolution": preset.resolution or native_resolution}
    settings: dict[str, Any] = {
        "steps": preset.steps,
        "learning_rate": preset.learning_rate,
        "batch_size": preset.batch_size,
        "data": data,
        "lora": {
            "rank": preset.rank,
            "alpha": preset.alpha,
            "extra_target_modules": preset.extra_target_modules,
        },
    }
    if preset.regularization_images:  # the weight only means something beside its images
        data["regularization_images"] = preset.regularization_images
        settings["prior_loss_weight"] = preset.prior_loss_weight
    return settings


def apply_preset(config: TrainConfig, preset: Preset, native_resolution: int = 512) -> TrainConfig:
    """A copy of `config` with the preset's settings filled in."""
    settings = preset_settings(preset, native_resolution)
    data, lora = replace(config.data, **settings.pop("data")), replace(config.lora, **settings.pop("lora"))
    return replace(config, data=data, lora=lora, **settings)


def default_config(
    base_model: str, images: str, output_dir: str, name: str, trigger_word: str = "", kind: str = "Object"
) -> TrainConfig:
    """What a first run with no tuning flags uses: the preset of the base model and concept kind."""
    base = TrainConfig(
        base_model=base_model,
        output_dir=output_dir,
        name=name,
        data=DataConfig(images=images, trigger_word=trigger_word),
        lora=LoraSpec(),
    )
    return apply_preset(base, preset_for(base_model, kind))


# A run below this share of the steps its preset was measured to need rarely shows the concept.
SHORT_RUN_SHARE = 0.5


def short_run_warning(preset: Preset, preset_name: str, steps: int) -> str:
    """A line warning that `steps` is well below what the preset was measured to need, or ''."""
    if steps >= preset.steps * SHORT_RUN_SHARE:
        return ""
    return (
        f"{steps} steps is well below the {preset.steps} the {preset_name} preset needs: "
        "the adapter may change nothing you can see."
    )
