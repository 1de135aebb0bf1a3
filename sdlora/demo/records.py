"""Figures of the demo build: VAE fidelity, latent scale, quick generation accuracy, docs rows."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from sdlora.demo.run import images_tensor
from sdlora.demo.shapes import BASE_COLOURS, BASE_SHAPES, base_scene, wide_scene

HEADER = """# The embedded demo model

A tiny Stable Diffusion (CLIP text encoder, UNet, VAE) trained from scratch on procedural
64x64 shapes by `python -m sdlora.demo.build`. Each row below is appended by the build
or by `python -m sdlora.demo.report`; times are wall-clock on the machine named.

## Build log

| UTC | stage | steps done | wall min (this run) | mean loss (last 100) | figures |
| --- | --- | --- | --- | --- | --- |
"""


def append_row(doc: Path, stage: str, steps: int, seconds: float, losses: list[float], figures: dict) -> None:
    """Add one line to the build log in `doc` (docs/demo-model.md), creating it if needed."""
    if not doc.exists():
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(HEADER)
    loss = f"{np.mean(losses[-100:]):.4f}" if losses else "-"
    shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
    row = f"| {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} | {stage} | {steps} | {seconds / 60:.1f} | {loss} | {shown} |\n"
    with doc.open("a") as f:
        f.write(row)


def _images(seed: int, count: int, wide: bool) -> torch.Tensor:
    make = wide_scene if wide else base_scene
    return images_tensor([make(seed, i) for i in range(count)])


@torch.no_grad()
def vae_psnr(vae, seed: int, count: int = 64) -> float:
    """Reconstruction PSNR (dB) on unseen base and anything-goes images."""
    vae.eval()
    x = torch.cat([_images(seed, count // 2, False), _images(seed, count // 2, True)])
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    vae.train()
    mse = ((recon - x) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-10))


@torch.no_grad()
def set_scaling_factor(vae, seed: int, count: int = 512) -> None:
    """Scale latents to unit variance, as Stable Diffusion's 0.18215 does for its VAE."""
    vae.eval()
    batch = min(count, 64)
    latents = torch.cat(
        [
            vae.encode(_images(seed + k, batch, False)).latent_dist.mode()
            for k in range(max(1, count // batch))
        ]
    )
    vae.register_to_config(scaling_factor=float(1 / latents.std()))


def quick_eval(folder: Path, per_pair: int = 2, steps: int = 20, guidance: float = 6.0) -> dict:
    """Generate every colour x shape pair `per_pair` times and score it with the evaluator."""
    from diffusers import StableDiffusionPipeline

    from sdlora.demo.evaluate import classify

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    colour_ok = shape_ok = total = 0
    tic = time.monotonic()
    for k in range(per_pair):
        for colour in BASE_COLOURS:
            for shape in BASE_SHAPES:
                gen = torch.Generator().manual_seed(50_000 + total)
                prompt = f"a {colour} {shape}" if k % 2 == 0 else f"a {colour} {shape} on a white background"
                image = pipe(
                    prompt, num_inference_steps=steps, guidance_scale=guidance, generator=gen
                ).images[0]
                found = classify(np.asarray(image))
                colour_ok += found.colour == colour
                shape_ok += found.shape == shape
                total += 1
    return {
        "colour acc": colour_ok / total,
        "shape acc": shape_ok / total,
        "images": total,
        "s/image": (time.monotonic() - tic) / total,
    }
