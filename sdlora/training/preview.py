"""Preview images during training: fixed prompts and seeds, so successive grids compare."""

from __future__ import annotations

import torch

from sdlora.config import TrainConfig
from sdlora.events import Preview
from sdlora.generation.grid import image_grid
from sdlora.models.families import family_of_pipeline
from sdlora.training.checkpoints import run_folder
from sdlora.training.encode import frozen_parts_to


@torch.no_grad()
def render_previews(
    pipeline, accelerator, denoiser, config: TrainConfig, prompts: tuple[str, ...], step: int
) -> Preview:
    """One image per (prompt, seed) with the adapter as trained so far; the grid is saved in the run folder."""
    model = accelerator.unwrap_model(denoiser)
    model.eval()
    frozen_parts_to(pipeline, accelerator.device)
    # The same pipeline class around the training denoiser: every family's own sampler and conditioning.
    preview = type(pipeline).from_pipe(pipeline, **{family_of_pipeline(pipeline).denoiser: model})
    preview.set_progress_bar_config(disable=True)
    images = []
    with accelerator.autocast():
        for prompt in prompts:
            for seed in config.preview_seeds:
                generator = torch.Generator(device="cpu").manual_seed(seed)
                images.append(
                    preview(
                        prompt,
                        num_inference_steps=config.preview_inference_steps,
                        height=config.data.resolution,
                        width=config.data.resolution,
                        generator=generator,
                    ).images[0]
                )
    if accelerator.device.type == "cuda":
        frozen_parts_to(pipeline, torch.device("cpu"))
    path = run_folder(config) / "previews" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, columns=len(config.preview_seeds)).save(path)
    return Preview(
        step=step, prompts=prompts, seeds=config.preview_seeds, images=tuple(images), path=str(path)
    )
