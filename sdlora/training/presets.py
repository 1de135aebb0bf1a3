"""Starting points for common concepts: partial settings a user can still change.

Presets only fill in numbers the user can still change. The demo model gets its own
preset: it is tiny, trains at 64 px, and needs more than the attention projections to
learn a new shape: the ResNet convolutions are what draw a star's points (see
docs/demo-model.md and docs/benchmarks.md, learning section).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora.assets import DEMO_MARKER, REGULARIZATION, is_demo_model
from sdlora.config import read_settings
from sdlora.models.families import FLUX, SD3, family_named

if TYPE_CHECKING:  # models imports torch; the app reads presets before torch is loaded
    pass

# Each preset is partial settings, keyed by TrainConfig field paths and read by the same strict reader
# as a config file (read_settings), so a misspelt key fails loudly. data.resolution 0: the base
# model's native resolution. The settings a preset leaves out keep their defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "Style": {
        "lora.rank": 16,
        "lora.alpha": 16.0,
        "steps": 1500,
        "learning_rate": 1e-4,
        "data.resolution": 0,
    },
    "Character": {
        "lora.rank": 16,
        "lora.alpha": 8.0,
        "steps": 1200,
        "learning_rate": 1e-4,
        "data.resolution": 0,
    },
    "Object": {"lora.rank": 8, "lora.alpha": 8.0, "steps": 800, "learning_rate": 1e-4, "data.resolution": 0},
    "Demo": {
        "lora.rank": 16,
        "lora.alpha": 16.0,
        "steps": 600,
        "learning_rate": 2e-3,
        "data.resolution": 64,
        "batch_size": 4,
        "lora.extra_target_modules": ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"),
        "data.regularization_images": str(REGULARIZATION),
        "prior_loss_weight": 2.0,  # the regularisation images' loss against the concept's
    },
    # The transformer families: what their trainers' own examples start from (NOTES cites them).
    "Flux.1": {
        "lora.rank": 16,
        "lora.alpha": 16.0,
        "steps": 1000,
        "learning_rate": 1e-4,
        "data.resolution": 0,  # its native 1024 px
    },
    "SD3.5": {
        "lora.rank": 16,
        "lora.alpha": 16.0,
        "steps": 1000,
        "learning_rate": 1e-4,
        "data.resolution": 0,  # its native 1024 px
    },
}
# Families whose users start from one preset of their own, whatever the concept.
FAMILY_PRESETS = {FLUX.name: "Flux.1", SD3.name: "SD3.5"}
NOTES = {
    "Style": "a look across many subjects: more steps, higher rank",
    "Character": "a person or character: 10-30 varied images with captions work best",
    "Object": "one thing from several angles: low rank is enough",
    "Demo": "the embedded 64-px demo model: learns a new shape, colour or texture in minutes on a CPU; "
    "adapts the ResNet convolutions and feed-forward layers as well as attention (a new shape "
    "needs them); "
    "trains beside 24 of the base's own scenes (assets/regularization), their loss weighted 2x, "
    "so prompts without the trigger keep drawing what they asked for",
    "Flux.1": "Flux.1 dev or schnell at 1024 px: rank 16 at 1e-4 with AdamW, as "
    "kohya sd-scripts' Flux.1 example (docs/flux_train_network.md, dim 16, lr 1e-4; there alpha 1) and "
    "SimpleTuner's Flux quickstart (rank 16: over 30 GB with a bf16 base, about 18 GB with an int8 one); "
    "both also turn on gradient checkpointing to save memory",
    "SD3.5": "SD3.5 Medium or Large at 1024 px: rank 16 at 1e-4 with AdamW, as "
    "kohya sd-scripts' SD3 example (docs/sd3_train_network.md, dim 16, lr 1e-4; there alpha 1, with "
    "gradient checkpointing to save memory)",
}


def preset_settings(name: str) -> dict[str, Any]:
    """A preset as nested, checked TrainConfig settings (data.resolution 0: the model's native one)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return read_settings(PRESETS[name], f"preset {name}")


def preset_for(base_model: str, kind: str) -> str:
    """The name of the preset for a kind of concept; on the demo model every kind uses the demo preset, on
    SD3.5 and Flux.1 (by their configs) every kind uses the family's."""
    if is_demo_model(base_model):
        return "Demo"
    family = read_family_and_resolution(base_model)[0]
    if family in FAMILY_PRESETS:
        return FAMILY_PRESETS[family]
    if kind not in PRESETS:
        raise KeyError(f"unknown preset {kind!r}; choose one of {', '.join(PRESETS)}")
    return kind


def model_defaults(base_model: str) -> tuple[str, dict[str, Any]]:
    """Settings a run takes from what the base model is, and a line saying so.

    The demo model (by its marker) gets the demo preset; a diffusers folder or single-file
    checkpoint gets its own native resolution (1024 px for SDXL, 768 for SD 2.x-v); anything
    unreadable keeps the generic defaults.
    """
    if is_demo_model(base_model):
        label = f"defaults: the demo preset (demo model, {DEMO_MARKER} in {base_model})"
        return label, preset_settings("Demo")
    family, resolution = read_family_and_resolution(base_model)
    if resolution is None:
        return "defaults: generic (the base model's config could not be read before loading)", {}
    return (
        f"defaults: {family_named(family).words} at its native {resolution} px (from the model's config)",
        {"data": {"resolution": resolution}},
    )


def read_family_and_resolution(base_model: str) -> tuple[str, int | None]:
    """The family and native resolution a local model's configs say; ("", None) when they cannot be read."""
    import json

    path = Path(base_model).expanduser()
    if path.suffix.lower() == ".safetensors" and path.is_file():
        from sdlora.models.single_file import CONFIG_ROOT, inspect_checkpoint  # reads the header only

        try:
            path = CONFIG_ROOT / inspect_checkpoint(path).architecture
        except Exception:  # noqa: BLE001 - loading reports a damaged file properly; here only defaults are at stake
            return "", None
    from sdlora.models.families import FAMILIES

    # The denoiser's folder: "unet", or "transformer" for SD3.5 and Flux.1
    folders = [path / part for part in dict.fromkeys(f.denoiser for f in FAMILIES)]
    denoiser = next((folder for folder in folders if (folder / "config.json").is_file()), None)
    if denoiser is None:
        return "", None  # a hub id, or not a diffusers folder: nothing to read before loading
    from sdlora.models.loading import family_and_resolution

    try:
        config = json.loads((denoiser / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
        family, resolution, _ = family_and_resolution(config, vae)
    except (OSError, ValueError, KeyError, TypeError):
        return "", None
    return family, resolution


# A run below this share of its preset's steps is warned about before it starts: the preset's
# step count is what its concept was measured to need (the demo preset: docs/benchmarks.md).
SHORT_RUN_SHARE = 0.5


def short_run_warning(preset_name: str, steps: int) -> str:
    """A line warning that `steps` is well below what the preset was measured to need, or ''."""
    needed = PRESETS[preset_name]["steps"]
    if steps >= needed * SHORT_RUN_SHARE:
        return ""
    return (
        f"{steps} steps is well below the {needed} the {preset_name} preset needs: "
        "the adapter may change nothing you can see."
    )
