"""Encode concept images and captions once, so training steps touch only the UNet.

The VAE always runs in float32: SD and SDXL VAEs overflow in half precision, the usual
cause of NaN losses and black images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sdlora.data import ConceptImage, image_to_tensor_array

ENCODE_BATCH = 4


@dataclass
class EncodedConcepts:
    """Cached VAE latents (already scaled) and text embeddings, one row per example."""

    latents: torch.Tensor
    embeddings: torch.Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch_indices(self, seed: int, micro_batch: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
        """Indices of this process's share of a global micro-batch, from a seeded shuffle per epoch."""
        size, total = len(self), batch_size * world
        start = micro_batch * total + rank * batch_size
        positions = range(start, start + batch_size)
        picked = []
        for position in positions:
            epoch, offset = divmod(position, size)
            order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
            picked.append(int(order[offset]))
        return torch.tensor(picked)

    def batch(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents[index].to(device), self.embeddings[index].to(device)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Text embeddings as Stable Diffusion's pipeline makes them (last hidden state, padded to max length)."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    return text_encoder(tokens.input_ids.to(device))[0].float()


@torch.no_grad()
def encode_images(vae, images: list, device: torch.device) -> torch.Tensor:
    """Scaled latent means of PIL images, encoded in float32 in small batches."""
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for i in range(0, len(images), ENCODE_BATCH):
        pixels = np.stack([image_to_tensor_array(im) for im in images[i:i + ENCODE_BATCH]])
        latent = vae.encode(torch.from_numpy(pixels).to(device)).latent_dist.mean
        out.append(((latent - shift) * scaling).float().cpu())
    return torch.cat(out)


def encode_concepts(pipeline, concepts: list[ConceptImage], flip: bool, device: torch.device) -> EncodedConcepts:
    """Latents and embeddings for every concept image (and its mirror image when `flip`)."""
    if pipeline.vae.dtype != torch.float32:
        pipeline.vae.to(dtype=torch.float32)
    pipeline.vae.to(device)
    pipeline.text_encoder.to(device)
    images = [c.image for c in concepts]
    captions = [c.caption for c in concepts]
    if flip:
        images += [im.transpose(0) for im in images]  # 0 = FLIP_LEFT_RIGHT
        captions += captions
    latents = encode_images(pipeline.vae, images, device)
    embeddings = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, captions, device).cpu()
    return EncodedConcepts(latents, embeddings)
