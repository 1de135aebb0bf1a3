"""Preview images during training: fixed prompts and seeds, so successive grids compare."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline

from sdlora.checkpoints import run_folder
from sdlora.config import TrainConfig
from sdlora.events import Preview
from sdlora.grid import image_grid


@torch.no_grad()
def render_previews(pipeline, accelerator, unet, config: TrainConfig, prompts: tuple[str, ...], step: int) -> Preview:
    """One image per (prompt, seed) with the adapter as trained so far; the grid is saved in the run folder."""
    model = accelerator.unwrap_model(unet)
    model.eval()
    preview = StableDiffusionPipeline(
        vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer, unet=model,
        scheduler=pipeline.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    preview.set_progress_bar_config(disable=True)
    images = []
    with accelerator.autocast():
        for prompt in prompts:
            for seed in config.preview_seeds:
                generator = torch.Generator(device="cpu").manual_seed(seed)
                images.append(preview(prompt, num_inference_steps=config.preview_inference_steps,
                                      height=config.data.resolution, width=config.data.resolution,
                                      generator=generator).images[0])
    path = run_folder(config) / "previews" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, columns=len(config.preview_seeds)).save(path)
    return Preview(step=step, prompts=prompts, seeds=config.preview_seeds, images=tuple(images), path=str(path))
