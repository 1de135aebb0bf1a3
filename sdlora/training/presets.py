"""Starting points for common concepts, and a rough time and memory estimate before a run.

Presets only fill in numbers the user can still change. The demo model gets its own
preset: it is tiny, trains at 64 px, and needs more than the attention projections to
learn a new shape: the ResNet convolutions are what draw a star's points (see
docs/demo-model.md and docs/benchmarks.md, learning section).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora.assets import DEMO_MARKER, REGULARIZATION, is_demo_model
from sdlora.config import TrainConfig, read_settings
from sdlora.models.families import DEFAULT, family_named

if TYPE_CHECKING:  # models imports torch; the app reads presets before torch is loaded
    from sdlora.models.loading import ModelInfo

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
}
NOTES = {
    "Style": "a look across many subjects: more steps, higher rank",
    "Character": "a person or character: 10-30 varied images with captions work best",
    "Object": "one thing from several angles: low rank is enough",
    "Demo": "the embedded 64-px demo model: learns a new shape, colour or texture in minutes on a CPU; "
    "adapts the ResNet convolutions and feed-forward layers as well as attention (a new shape "
    "needs them); "
    "trains beside 24 of the base's own scenes (assets/regularization), their loss weighted 2x, "
    "so prompts without the trigger keep drawing what they asked for",
}


def preset_settings(name: str) -> dict[str, Any]:
    """A preset as nested, checked TrainConfig settings (data.resolution 0: the model's native one)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return read_settings(PRESETS[name], f"preset {name}")


def preset_for(base_model: str, kind: str) -> str:
    """The name of the preset for a kind of concept; on the demo model every kind uses the demo preset."""
    if is_demo_model(base_model):
        return "Demo"
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


@dataclass(frozen=True)
class Estimate:
    seconds: float
    gpu_memory_gb: float | None
    text: str


# Measured on this project's 2-core CPU: a full SD 1.5 UNet step at 512 px took 19 s; work
# scales with parameters x latent pixels. Small models are dominated by a fixed cost per
# step (the demo model: 120 steps at batch 4 in about 25 s). A GPU is taken as ~80x
# faster: rough by design.
CPU_SECONDS_PER_PARAM_PIXEL = 19.0 / (860e6 * 64 * 64)
GPU_SPEEDUP = 80.0
STEP_OVERHEAD_SECONDS = {"cpu": 0.15, "cuda": 0.03}


# Activation memory per latent pixel at batch 1 without checkpointing, from published LoRA runs at
# batch 1 in bf16 (SimpleTuner on an H100: SD 1.5 at 512 px in 2.9 GiB, SDXL at 1024 px in 13 GiB,
# 6.5 GiB with checkpointing) less their bf16 weights. Checkpointing keeps about a fifth.
# (The numbers per family: Family.activation_gb_per_latent_pixel, lora_parameters_per_rank.)
CHECKPOINTED_FRACTION = 0.2
OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "adamw8bit": 2, "adafactor": 1, "prodigy": 16}


def gpu_memory_gb(config: TrainConfig, unet_parameters: int, info: ModelInfo | None) -> float:
    """Peak GPU memory of a cached run: bf16 UNet, fp32 LoRA with its gradients and optimizer state,
    and activations; the VAE and text encoders wait on the CPU once their outputs are cached."""
    family = info.model_family if info is not None else DEFAULT
    latent_pixels = (config.data.resolution / 8) ** 2
    activations = family.activation_gb_per_latent_pixel * latent_pixels * config.batch_size
    if config.gradient_checkpointing:
        activations *= CHECKPOINTED_FRACTION
    lora = family.lora_parameters_per_rank * config.lora.rank
    lora_gb = lora * (4 + 4 + OPTIMIZER_BYTES_PER_PARAM[config.optimizer]) / 1e9
    return unet_parameters * 2 / 1e9 + lora_gb + activations + 0.5  # 0.5: CUDA context and allocator slack


def captioning_seconds(images: int, seconds_per_image: float, on_gpu: bool, needs_weights: bool) -> float:
    """Time to caption `images` with a captioner of this speed on this project's CPU; weighted
    captioners (BLIP, Florence-2) run on the GPU when there is one, the demo captioner never needs it."""
    return images * seconds_per_image / (GPU_SPEEDUP if on_gpu and needs_weights else 1.0)


def estimate_training(
    config: TrainConfig,
    unet_parameters: int,
    info: ModelInfo | None,
    device: str,
    captioning: tuple[int, str, float] = (0, "", 0.0),
) -> Estimate:
    """A rough duration (and GPU memory) for a run, shown before it starts.

    `captioning` is (uncaptioned images, captioner name, its seconds for them): the time the
    "Caption images" step adds before training, counted in the total.
    """
    latent_pixels = (config.data.resolution / 8) ** 2
    images_per_step = config.batch_size * config.gradient_accumulation_steps
    if config.data.regularization_images:
        images_per_step *= 2  # as many regularisation images as concept images in every step
    per_step = CPU_SECONDS_PER_PARAM_PIXEL * unet_parameters * latent_pixels * images_per_step * 3  # fwd+bwd
    if device.startswith("cuda"):
        per_step /= GPU_SPEEDUP
    overhead = STEP_OVERHEAD_SECONDS["cuda" if device.startswith("cuda") else "cpu"]
    uncaptioned, captioner, caption_seconds = captioning
    seconds = config.steps * (per_step + overhead * config.gradient_accumulation_steps) + caption_seconds
    memory = gpu_memory_gb(config, unet_parameters, info) if device.startswith("cuda") else None
    minutes = seconds / 60
    text = f"about {minutes:.0f} min" if minutes >= 1 else f"about {seconds:.0f} s"
    text += f" for {config.steps} steps on {device}"
    if uncaptioned:
        text += (
            f", captioning {uncaptioned} image{'s' * (uncaptioned != 1)} with {captioner} included "
            f"(about {caption_seconds:.0f} s)"
        )
    if memory is not None:
        text += f", about {memory:.1f} GB of GPU memory"
        if memory > 10 and not config.gradient_checkpointing:
            text += " (gradient checkpointing would cut it)"
    if info is not None and info.model_family.named_in_estimate:
        text += f", {info.model_family.words} at {config.data.resolution} px"
    return Estimate(seconds, memory, text + " (rough)")
