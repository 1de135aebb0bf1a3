"""Real-size training steps: `python bench/real_size.py [--device cuda] [--resolution-scale 0.25]`.

SD 1.5's and SDXL's UNets are built from the configs in sdlora/models/configs with random weights
(nothing is downloaded). Latents and text conditioning are random stand-ins for the cache, so the
measured step is what a cached run does each step. For each setting, side by side in one run:
- loop: sdlora's own optimizer step (`sdlora.training.step.optimizer_step` over a `Run`: batch from
  the cache, accelerate, clipping, schedule) over the LoRA of rank 32 on the attention projections;
- floor: a bare UNet forward + backward + optimizer step on the same batch;
plus peak memory (GPU: torch's peak allocation; CPU: the process's peak resident size).
On a CPU it runs a few steps at a reduced resolution; on a GPU SD 1.5 at 512 px and SDXL at
1024 px, batch 1, bf16 frozen weights, with and without gradient checkpointing, AdamW and Adafactor
(and 8-bit AdamW where bitsandbytes is installed). Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, write_section  # noqa: E402
from sdlora.config import DataConfig, LoraSpec, TrainConfig  # noqa: E402
from sdlora.models.families import family_of  # noqa: E402
from sdlora.training.encode import EncodedConcepts  # noqa: E402
from sdlora.training.lora import add_lora, trainable_parameters  # noqa: E402
from sdlora.training.optimizers import make_optimizer  # noqa: E402
from sdlora.training.step import Run, diffusion_loss, optimizer_step  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "sdlora" / "models" / "configs"
MODELS = {"SD 1.5": ("stable-diffusion-v1", 512), "SDXL": ("stable-diffusion-xl-v1-base", 1024)}


def build_unet(folder: str, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(str(CONFIGS / folder / "unet"))
    unet = UNet2DConditionModel.from_config(config).to(device=device, dtype=dtype)
    unet.requires_grad_(False)
    return unet


def cache(unet, pixels: int, batch: int) -> EncodedConcepts:
    """Random stand-ins for cached latents and text conditioning, shaped as the real ones."""
    g = torch.Generator().manual_seed(0)
    side = pixels // 8
    latents = [torch.randn(4, side, side, generator=g) for _ in range(batch)]
    embeddings = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    if unet.config.addition_embed_type != "text_time":
        return EncodedConcepts(latents, embeddings, [f"{pixels}x{pixels}"] * batch)
    extras = {
        "pooled": torch.randn(batch, 1280, generator=g),
        "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * batch, dtype=torch.float32),
    }
    return EncodedConcepts(latents, embeddings, [f"{pixels}x{pixels}"] * batch, extras)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(
    name: str, folder: str, pixels: int, device: torch.device, checkpointing: bool, optimizer: str, steps: int
) -> dict:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    unet = build_unet(folder, device, dtype)
    config = TrainConfig(
        base_model=name,
        steps=10_000,
        optimizer=optimizer,
        gradient_checkpointing=checkpointing,
        data=DataConfig(images="-", resolution=pixels),
        lora=LoraSpec(rank=32, alpha=32),
    )
    add_lora(unet, config.lora)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    accelerator = Accelerator(
        cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no"
    )
    optimizer_ = make_optimizer(config, trainable_parameters(unet))
    schedule = get_scheduler("constant", optimizer=optimizer_)
    unet, optimizer_, schedule = accelerator.prepare(unet, optimizer_, schedule)
    family = family_of(dict(accelerator.unwrap_model(unet).config))
    objective = family.objective(DDPMScheduler(num_train_timesteps=1000).config, "epsilon")
    encoded = cache(accelerator.unwrap_model(unet), pixels, 1)
    run = Run(config, accelerator, unet, optimizer_, schedule, objective, encoded, None)
    unet.train()

    def loop_step(i: int) -> None:
        optimizer_step(run, i)

    def bare_step(i: int) -> None:
        batch = encoded.batch(torch.tensor([0]), accelerator.device)
        with accelerator.autocast():
            loss = diffusion_loss(unet, objective, batch, torch.Generator().manual_seed(i))
        loss.backward()
        optimizer_.step()
        optimizer_.zero_grad(set_to_none=True)

    def timed(fn, i: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    warm = 2 if device.type == "cpu" else 5
    for i in range(warm):
        loop_step(i)
        bare_step(i)
    loop, floor = [], []
    for i in range(steps):  # interleaved, so both see the same machine
        loop.append(timed(loop_step, i))
        floor.append(timed(bare_step, i))
    row = {
        "model": name,
        "px": pixels,
        "checkpointing": checkpointing,
        "optimizer": optimizer,
        "loop_s": statistics.median(loop),
        "floor_s": statistics.median(floor),
        "peak_gb": peak_memory_gb(device),
    }
    return row


def settings(device: torch.device, scale: float):
    optimizers = ["adamw", "adafactor"] + (["adamw8bit"] if importlib.util.find_spec("bitsandbytes") else [])
    for name, (folder, native) in MODELS.items():
        pixels = native if device.type == "cuda" else max(64, int(native * scale) // 64 * 64)
        if device.type == "cuda":
            for checkpointing in (False, True):
                for optimizer in optimizers:
                    yield name, folder, pixels, checkpointing, optimizer
        else:
            yield name, folder, pixels, False, "adamw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--resolution-scale", type=float, default=0.25, help="CPU only: fraction of native size"
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = args.steps or (20 if device.type == "cuda" else 3)
    header = machine()
    rows = []
    for name, folder, pixels, checkpointing, optimizer in settings(device, args.resolution_scale):
        row = measure(name, folder, pixels, device, checkpointing, optimizer, steps)
        gc.collect()  # the last model's weights go before the next is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": header, "rows": rows}, indent=2))
    memory = "peak GPU memory (torch), GiB" if device.type == "cuda" else "peak process memory (RSS), GiB"
    lines = [
        f"## Real-size training steps, {device.type.upper()} (`python bench/real_size.py"
        f"{' --device cpu' if device.type == 'cpu' else ''}`)",
        "",
        f"{header}; UNets built from sdlora/models/configs with random weights, LoRA rank 32 on the attention "
        f"projections, batch 1, cached latents and text conditioning, {steps} steps each after warm-up, "
        f"medians; frozen weights {'bf16' if device.type == 'cuda' else 'float32'}.",
        "",
        f"| model | px | gradient checkpointing | optimizer | loop, s/step | floor, s/step | loop / floor "
        f"| {memory} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['px']} | {'yes' if r['checkpointing'] else 'no'} | {r['optimizer']} | "
            f"{r['loop_s']:.3f} | {r['floor_s']:.3f} | {r['loop_s'] / r['floor_s']:.2f}x | "
            f"{r['peak_gb']:.1f} |"
        )
    if device.type == "cpu":
        lines += [
            "",
            f"On a CPU the sizes are reduced ({args.resolution_scale:g} of the native side) so that a step "
            "takes seconds; the peak is the process's, so the SDXL row includes the float32 weights of its "
            "whole UNet. Native-size figures need a session that is lent a GPU (the CUDA section, when "
            "present).",
        ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        print(f"written to {write_section(f'real_size_{device.type}', text)}")


if __name__ == "__main__":
    main()
