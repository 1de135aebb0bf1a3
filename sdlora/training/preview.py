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
    pairs = [(prompt, seed) for prompt in prompts for seed in config.preview_seeds]
    images = []
    with accelerator.autocast():
        # In batches of the training batch size: one call per batch costs far less than one per image where
        # the per-call overhead dominates (small models, CPUs), and a batch drawn without gradients needs
        # less memory than the training batch of that size that has just run. Each image keeps its own
        # seed's generator, so it starts from the noise it would alone.
        batch = max(1, config.batch_size)
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            images += preview(
                [prompt for prompt, _ in chunk],
                num_inference_steps=config.preview_inference_steps,
                height=config.data.resolution,
                width=config.data.resolution,
                generator=[torch.Generator(device="cpu").manual_seed(seed) for _, seed in chunk],
            ).images
    if accelerator.device.type == "cuda":
        frozen_parts_to(pipeline, torch.device("cpu"))
    path = run_folder(config) / "previews" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, columns=len(config.preview_seeds)).save(path)
    return Preview(
        step=step, prompts=prompts, seeds=config.preview_seeds, images=tuple(images), path=str(path)
    )
