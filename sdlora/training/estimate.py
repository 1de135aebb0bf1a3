"""How long a run will take (and how much GPU memory it needs), shown before it starts.

The time comes from this machine whenever it can: every run writes its seconds per step to a
small JSON file in its output folder (the library), keyed by the settings that decide a step's
cost; the next estimate for the same model and settings uses it. Without such a record, a
formula from the model's size gives a rough figure, and the text says which one it used.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdlora.config import TrainConfig
from sdlora.models.families import DEFAULT, Family

if TYPE_CHECKING:  # models imports torch; the app reads this module before torch is loaded
    from sdlora.models.loading import ModelInfo

SPEED_FILE = ".speeds.json"  # in the output folder (the app's library), beside the adapters


@dataclass(frozen=True)
class Estimate:
    seconds: float
    gpu_memory_gb: float | None
    text: str
    seconds_per_step: float = 0.0
    measured: bool = False  # True: from a run on this machine; False: the formula's rough figure


# Measured on this project's 2-core CPU: a full SD 1.5 UNet step at 512 px took 19 s; work
# scales with parameters x latent pixels. A GPU is taken as ~80x faster: rough by design, and
# replaced by a measurement after the first run.
CPU_SECONDS_PER_PARAM_PIXEL = 19.0 / (860e6 * 64 * 64)
GPU_SPEEDUP = 80.0
# Small models are dominated by what each layer call costs beyond its arithmetic (a forward and a backward
# through every module, each LoRA layer adding its own few calls): seconds per call, and per call and
# image, fitted on two demo-model runs on this project's 2-core CPU (bench/estimate.py); on a GPU a kernel
# launch. Without the model's layer counts, a fixed cost per step stands in (SD 1.5's ~1000 calls).
SECONDS_PER_CALL = {"cpu": (1.0e-4, 2.2e-5), "cuda": (1e-5, 0.0)}
CALLS_PER_LORA_LAYER = 4  # its down and up projections, the scale, the sum
STEP_OVERHEAD_SECONDS = {"cpu": 0.15, "cuda": 0.03}


# Activation memory per latent pixel and LoRA parameters per rank are each family's own
# (Family.activation_gb_per_latent_pixel, lora_parameters_per_rank). Checkpointing keeps about a fifth.
CHECKPOINTED_FRACTION = 0.2
OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "adamw8bit": 2, "adafactor": 1, "prodigy": 16}


def speed_key(config: TrainConfig, device: str) -> str:
    """The settings that decide what one step costs: the same key, the same seconds per step."""
    data, lora = config.data, config.lora
    parts = [
        Path(config.base_model).name or config.base_model,
        device.split(":")[0],  # the app's "cuda" and the trainer's "cuda:0" are one machine's GPU
        f"{data.resolution}px",
        f"batch {config.batch_size}x{config.gradient_accumulation_steps}",
        f"rank {lora.rank}",
        "+".join(sorted(lora.extra_target_modules)) or "attention",
        "with regularisation" if data.regularization_images else "no regularisation",
        "checkpointed" if config.gradient_checkpointing else "",
        config.mixed_precision,
        config.optimizer,
    ]
    return ", ".join(p for p in parts if p)


def _speed_records(folder: Path) -> dict:
    try:
        records = json.loads((folder / SPEED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or a damaged file: the formula answers until the next run rewrites it
    return records if isinstance(records, dict) else {}


def remember_speed(config: TrainConfig, device: str, seconds_per_step: float, steps: int) -> None:
    """Record this run's seconds per step in its output folder, for the next estimate on these settings."""
    from sdlora.library.formats.files import atomic_write_text

    if seconds_per_step <= 0 or steps < 2:
        return
    folder = Path(config.output_dir)
    records = _speed_records(folder)
    records[speed_key(config, device)] = {
        "seconds_per_step": round(seconds_per_step, 4),
        "steps": steps,
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    try:
        atomic_write_text(folder / SPEED_FILE, json.dumps(records, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only library only costs the next estimate its measurement


def measured_speed(config: TrainConfig, device: str) -> float | None:
    """Seconds per step of the last run on this machine with these settings, or None."""
    record = _speed_records(Path(config.output_dir)).get(speed_key(config, device))
    try:
        return float(record["seconds_per_step"]) if record else None
    except (KeyError, TypeError, ValueError):
        return None


def _kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def _forward_seconds_per_image(config: TrainConfig, unet_parameters: int, device: str) -> float:
    """The arithmetic of one image's forward pass through the denoiser."""
    latent_pixels = (config.data.resolution / 8) ** 2
    seconds = CPU_SECONDS_PER_PARAM_PIXEL * unet_parameters * latent_pixels
    return seconds / GPU_SPEEDUP if device.startswith("cuda") else seconds


def _seconds_per_pass(device: str, layers: tuple[int, int] | None, images: int) -> float | None:
    """The calls' cost of one forward pass over `images`, from (modules, LoRA layers); None without them."""
    if layers is None:
        return None
    modules, adapted = layers
    per_call, per_call_and_image = SECONDS_PER_CALL[_kind(device)]
    return (modules + CALLS_PER_LORA_LAYER * adapted) * (per_call + per_call_and_image * images)


def formula_seconds_per_step(
    config: TrainConfig, unet_parameters: int, device: str, layers: tuple[int, int] | None = None
) -> float:
    """A step's seconds from the model's size, its layer calls and the latent pixels it sees: rough, for
    before any run. `layers`: (leaf modules, layers the adapter adapts), sdlora.training.lora.layer_counts."""
    images_per_pass = config.batch_size * (2 if config.data.regularization_images else 1)  # as many
    images_per_step = images_per_pass * config.gradient_accumulation_steps  # regularisation images as concept
    per_step = _forward_seconds_per_image(config, unet_parameters, device) * images_per_step * 3  # fwd+bwd
    per_pass = _seconds_per_pass(device, layers, images_per_pass)
    overhead = STEP_OVERHEAD_SECONDS[_kind(device)] if per_pass is None else 3 * per_pass
    return per_step + overhead * config.gradient_accumulation_steps


def preview_seconds(
    config: TrainConfig,
    unet_parameters: int,
    device: str,
    layers: tuple[int, int] | None = None,
    passes: int = 2,
) -> tuple[int, float]:
    """(previews drawn, their seconds) in a run: every `preview_every` steps and the final one (which
    reuses a preview drawn at the last step), each prompt x seed in batches of the batch size, every
    sampling step `passes` over the batch (SamplingDefaults.passes_per_step: 2 with guidance's second pass)."""
    renders = config.steps // config.preview_every if config.preview_every else 0
    if config.final_preview and not (config.preview_every and config.steps % config.preview_every == 0):
        renders += 1
    images = max(1, len(config.preview_prompts)) * len(config.preview_seeds)
    batch = min(images, max(1, config.batch_size))
    batches = math.ceil(images / batch)
    per_pass = _seconds_per_pass(device, layers, passes * batch)  # the passes go through as one batch
    per_pass = STEP_OVERHEAD_SECONDS[_kind(device)] / 3 if per_pass is None else per_pass
    forward = _forward_seconds_per_image(config, unet_parameters, device)
    per_render = config.preview_inference_steps * (batches * per_pass + images * passes * forward)
    return renders, renders * per_render


def gpu_memory_gb(config: TrainConfig, unet_parameters: int, info: ModelInfo | None) -> float:
    """Peak GPU memory of a cached run: bf16 UNet, fp32 LoRA with its gradients and optimizer state,
    and activations; the VAE and text encoders wait on the CPU once their outputs are cached."""
    family = info.model_family if info is not None else DEFAULT
    if family.estimate_variants:
        return max(transformer_memory(config, transformer_size(family, unet_parameters)).values())
    latent_pixels = (config.data.resolution / 8) ** 2
    activations = family.activation_gb_per_latent_pixel * latent_pixels * config.batch_size
    if config.gradient_checkpointing:
        activations *= CHECKPOINTED_FRACTION
    lora = family.lora_parameters_per_rank * config.lora.rank
    lora_gb = lora * (4 + 4 + OPTIMIZER_BYTES_PER_PARAM[config.optimizer]) / 1e9
    return unet_parameters * 2 / 1e9 + lora_gb + activations + 0.5  # 0.5: CUDA context and allocator slack


CONFIGS = Path(__file__).resolve().parents[1] / "models" / "configs"
# GPU bytes of a frozen base weight: bf16, or bitsandbytes' int8 (plus one float scale per row, about
# nothing at these widths) and NF4 (4 bits, plus one float32 scale per 64 values).
BASE_BYTES_PER_PARAMETER = {"none": 2.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}
CUDA_CONTEXT_GB = 0.5  # the CUDA context and the allocator's slack


@dataclass(frozen=True)
class TransformerSize:
    """What a diffusion transformer's training step holds depends on: its size, width and blocks."""

    family: Family
    parameters: int
    width: int  # heads x head dim
    blocks: int  # joint (double) blocks + single blocks
    lora_parameters_per_rank: int
    buffers: int = 0  # elements of buffers beside the weights (SD3's position-embedding grid)


def transformer_size(family: Family, parameters: int) -> TransformerSize:
    """The family's published variant nearest in parameter count (SD3.5 Medium or Large, Flux.1), read
    from its config.json; `parameters` is the model's own count."""
    folder, _, lora = min(family.estimate_variants, key=lambda v: abs(math.log(v[1] / max(parameters, 1))))
    config = json.loads((CONFIGS / folder / "transformer" / "config.json").read_text(encoding="utf-8"))
    width = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_layers"] + config.get("num_single_layers", 0)
    return TransformerSize(family, parameters, width, blocks, lora, position_grid(config))


def position_grid(config: dict) -> int:
    """Elements of SD3's fixed position-embedding grid (a buffer of max size squared x width); 0 for Flux."""
    return (
        config.get("pos_embed_max_size", 0) ** 2
        * config["num_attention_heads"]
        * config["attention_head_dim"]
    )


def transformer_memory(config: TrainConfig, size: TransformerSize, float32: bool = False) -> dict[str, float]:
    """GB at the two peaks of a transformer run: caching the captions (the text encoders alone: the denoiser
    goes on the GPU only after they leave it, training/loop.py) and training (weights, adapter with
    gradients and optimizer state, activations). `float32`: every frozen weight and activation in float32 (a CPU run, for comparison)."""
    family, resolution = size.family, config.data.resolution
    tokens = (resolution // 16) ** 2 + family.estimate_text_tokens  # 8x VAE, 2x2 patches
    tokens *= config.batch_size
    element = 4 if float32 else 2
    per_block = family.activation_bytes_per_token_width_block * element / 2 * tokens * size.width
    if config.gradient_checkpointing:  # each block's input kept, one block's activations while recomputed
        activations = size.blocks * tokens * size.width * element + per_block
    else:
        activations = size.blocks * per_block
    weight_bytes = 4.0 if float32 else BASE_BYTES_PER_PARAMETER[config.quantize_base]
    weights = (size.parameters * weight_bytes + size.buffers * element) / 1e9
    lora = size.lora_parameters_per_rank * config.lora.rank
    adapter = lora * (4 + 4 + OPTIMIZER_BYTES_PER_PARAM[config.optimizer]) / 1e9
    context = 0.0 if float32 else CUDA_CONTEXT_GB
    caching = family.text_encoder_parameters * _text_encoder_bytes(config, float32) / 1e9 + context
    return {"caching": caching, "training": weights + adapter + activations / 1e9 + context}


def _text_encoder_bytes(config: TrainConfig, float32: bool) -> int:
    """Bytes of a text encoder weight while captions are cached: bf16 under bf16 mixed precision ('auto'
    is bf16 on the GPUs that have it) or with a quantized base (the loader's dtypes), else float32."""
    if float32:
        return 4
    return 2 if config.quantize_base != "none" or config.mixed_precision in ("auto", "bf16") else 4


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
    layers: tuple[int, int] | None = None,
    passes: int = 2,
) -> Estimate:
    """The duration (and GPU memory) of a run, shown before it starts; measured speed first, else the formula.

    `captioning` is (uncaptioned images, captioner name, its seconds for them): the time the
    "Caption images" step adds before training, counted in the total. `layers` is the denoiser's
    (leaf modules, layers this config adapts), sdlora.training.lora.layer_counts, and `passes` the
    denoiser passes per sampling step of a preview (SamplingDefaults.passes_per_step), for the formula.
    A measured speed already holds the previews drawn among its steps; the formula adds theirs.
    """
    measured = measured_speed(config, device)
    per_step = measured or formula_seconds_per_step(config, unet_parameters, device, layers)
    previews, previews_seconds = (
        (0, 0.0) if measured else preview_seconds(config, unet_parameters, device, layers, passes)
    )
    uncaptioned, captioner, caption_seconds = captioning
    seconds = config.steps * per_step + previews_seconds + caption_seconds
    memory = gpu_memory_gb(config, unet_parameters, info) if device.startswith("cuda") else None
    text = f"about {_duration(seconds)} for {config.steps} steps on {device} at {per_step:.2f} s/step"
    if previews:
        text += f", {previews} preview{'s' * (previews != 1)} included (about {_duration(previews_seconds)})"
    text += (
        " (measured in the last run here with these settings)"
        if measured
        else " (rough: from the model's size; the first run here measures it)"
    )
    if uncaptioned:
        text += (
            f", captioning {uncaptioned} image{'s' * (uncaptioned != 1)} with {captioner} included "
            f"(about {caption_seconds:.0f} s)"
        )
    if memory is not None:
        text += f", about {memory:.1f} GB of GPU memory"
        cuts = memory_cuts(config, info.model_family if info is not None else DEFAULT)
        if memory > 10 and cuts:
            text += f" ({' or '.join(cuts)} would cut it)"
    if info is not None and info.model_family.named_in_estimate:
        text += f", {info.model_family.words} at {config.data.resolution} px"
    return Estimate(seconds, memory, text, per_step, measured is not None)


def memory_cuts(config: TrainConfig, family: Family) -> list[str]:
    """The settings that cut a run's GPU memory most, biggest first: for the diffusion transformers a
    quantized base (their weights are most of it), then gradient checkpointing."""
    cuts = []
    if family.estimate_variants and config.quantize_base != "nf4":
        cuts.append("--quantize-base nf4")
    if not config.gradient_checkpointing:
        cuts.append("--gradient-checkpointing")
    return cuts


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
