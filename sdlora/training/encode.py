"""Encode concept images and captions once, so training steps touch only the denoiser.

The VAE always runs in float32: SD and SDXL VAEs overflow in half precision, the usual
cause of NaN losses and black images. Images keep their bucket's size; batches are drawn
from one bucket at a time. The family turns captions into conditioning: the embeddings,
and any further inputs by name in `extras` (SDXL: the pooled embedding and each image's
size conditioning).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sdlora.models.families import Family, family_of_pipeline
from sdlora.models.families.unet import encode_prompts  # noqa: F401 - bench/train_speed.py reads it here
from sdlora.training.data import CAPTION_EXTENSION, ConceptImage, FileProblem, image_to_tensor_array

ENCODE_BATCH = 4


@dataclass
class Batch:
    """What one denoiser call trains on."""

    latents: torch.Tensor
    embeddings: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the family's further inputs, by name

    def fits(self, other: Batch) -> bool:
        return self.latents.shape[1:] == other.latents.shape[1:]

    def cat(self, other: Batch) -> Batch:
        return Batch(
            torch.cat([self.latents, other.latents]),
            torch.cat([self.embeddings, other.embeddings]),
            {name: torch.cat([value, other.extras[name]]) for name, value in self.extras.items()},
        )


@dataclass
class EncodedConcepts:
    """Cached VAE latents (already scaled) and text conditioning, one row per example."""

    latents: list[torch.Tensor]  # (4, h, w) each; h, w from the example's bucket
    embeddings: torch.Tensor
    buckets: list[str]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # one row per example, by name
    notices: list[FileProblem] = field(default_factory=list)  # captions the text encoders cut

    def __len__(self) -> int:
        return len(self.latents)

    def groups(self) -> list[list[int]]:
        """Example indices by bucket, buckets in a fixed order."""
        by_bucket: dict[str, list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            by_bucket.setdefault(bucket, []).append(index)
        return [by_bucket[bucket] for bucket in sorted(by_bucket)]

    def batch_indices(
        self, seed: int, micro_batch: int, batch_size: int, rank: int, world: int
    ) -> torch.Tensor:
        """Indices of this process's share of a global micro-batch: a pure function of its arguments,
        so a resumed run draws what an uninterrupted one would."""
        groups = self.groups()
        if len(groups) == 1:
            return self._one_bucket(seed, micro_batch, batch_size, rank, world)
        per_epoch = sum(-(-len(g) // batch_size) for g in groups)
        epoch, position = divmod(micro_batch * world + rank, per_epoch)
        return torch.tensor(batch_plan(groups, batch_size, seed, epoch)[position])

    def _one_bucket(
        self, seed: int, micro_batch: int, batch_size: int, rank: int, world: int
    ) -> torch.Tensor:
        # One bucket (square training, or images of one shape): a seeded shuffle per epoch that a
        # batch may cross, as before buckets existed, so figures measured then still hold.
        size, total = len(self), batch_size * world
        start = micro_batch * total + rank * batch_size
        picked = []
        for position in range(start, start + batch_size):
            epoch, offset = divmod(position, size)
            order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
            picked.append(int(order[offset]))
        return torch.tensor(picked)

    def batch(self, index: torch.Tensor, device: torch.device) -> Batch:
        latents = torch.stack([self.latents[i] for i in index.tolist()]).to(device)
        extras = {name: value[index].to(device) for name, value in self.extras.items()}
        return Batch(latents, self.embeddings[index].to(device), extras)


def batch_plan(groups: list[list[int]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches: each bucket's images shuffled and cut into batches (the last may be smaller,
    so no image is dropped), then the batches shuffled. Every image once per epoch; no batch mixes buckets."""
    generator = torch.Generator().manual_seed(seed * 7_919 + epoch)
    batches = []
    for members in groups:
        order = [members[int(i)] for i in torch.randperm(len(members), generator=generator)]
        batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[int(i)] for i in torch.randperm(len(batches), generator=generator)]


@torch.no_grad()
def encode_images(vae, images: list, device: torch.device) -> list[torch.Tensor]:
    """Scaled latent means of PIL images, encoded in float32, images of one size batched together."""
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(image.size, []).append(index)
    for indices in by_size.values():
        for i in range(0, len(indices), ENCODE_BATCH):
            chunk = indices[i : i + ENCODE_BATCH]
            pixels = np.stack([image_to_tensor_array(images[j]) for j in chunk])
            latent = vae.encode(torch.from_numpy(pixels).to(device)).latent_dist.mean
            for j, row in zip(chunk, ((latent - shift) * scaling).float().cpu(), strict=True):
                out[j] = row
    return out


def encode_concepts(
    pipeline, concepts: list[ConceptImage], flip: bool, device: torch.device, family: Family | None = None
) -> EncodedConcepts:
    """Latents and the family's conditioning for every concept image (and its mirror image when `flip`)."""
    if pipeline.vae.dtype != torch.float32:
        pipeline.vae.to(dtype=torch.float32)
    pipeline.vae.to(device)
    images = [c.image for c in concepts]
    captions = [c.caption for c in concepts]
    time_ids = [c.placement.time_ids() for c in concepts]
    buckets = [str(c.placement.bucket) for c in concepts]
    if flip:  # a mirror image keeps its bucket; its crop mirrors
        images += [im.transpose(0) for im in images]  # 0 = FLIP_LEFT_RIGHT
        captions += captions
        time_ids += [c.placement.time_ids(mirrored=True) for c in concepts]
        buckets += buckets
    latents = encode_images(pipeline.vae, images, device)
    family = family or family_of_pipeline(pipeline)
    embeddings, extras = family.encode_captions(pipeline, captions, time_ids, device)
    return EncodedConcepts(
        latents, embeddings, buckets, extras, caption_cut_notices(pipeline, family, concepts)
    )


def token_limits(pipeline, family: Family) -> dict[str, tuple[object, int]]:
    """Each text encoder the run reads captions with ("CLIP", "T5"): its tokenizer and how many tokens it reads.

    CLIP reads its tokenizer's 77 (BOS and EOS included); T5 the run's max_sequence_length. An encoder
    left out (SD3 with drop_t5) reads nothing and cuts nothing."""
    limits = {}
    for part in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipeline, part, None)
        encoder = getattr(pipeline, part.replace("tokenizer", "text_encoder"), None)
        if tokenizer is None or encoder is None:
            continue
        if "T5" in type(tokenizer).__name__:
            limits["T5"] = (tokenizer, family.max_sequence_length)
        else:
            limits.setdefault("CLIP", (tokenizer, tokenizer.model_max_length))
    return limits


def caption_cut_notices(pipeline, family: Family, concepts: list[ConceptImage]) -> list[FileProblem]:
    """One notice per caption longer than a text encoder reads, naming its file and the tokens dropped:
    the encoders cut a long caption silently, and the words past the cut teach nothing."""
    limits = token_limits(pipeline, family)
    notices = []
    for concept in concepts:
        cuts = []
        for name, (tokenizer, limit) in limits.items():
            dropped = len(tokenizer(concept.caption).input_ids) - limit
            if dropped > 0:
                cuts.append(f"{name} reads {limit} tokens, the last {dropped} are dropped")
        if cuts:
            caption_file = concept.path.with_suffix(CAPTION_EXTENSION)
            where = caption_file if caption_file.is_file() else concept.path
            notices.append(FileProblem(where, "caption too long: " + "; ".join(cuts)))
    return notices


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # SD3.5: T5 is the third


def text_encoders_to_dtype(pipeline, mixed_precision: str) -> None:
    """The text encoders in bf16 under bf16 mixed precision before they go on the device to cache the
    captions (T5-XXL: 9.5 GB instead of 19); otherwise as loaded (T5 overflows in fp16)."""
    if mixed_precision != "bf16":
        return
    for part in TEXT_ENCODERS:
        module = getattr(pipeline, part, None)
        if module is not None and module.dtype != torch.bfloat16:
            module.to(dtype=torch.bfloat16)


def frozen_parts_to(pipeline, device: torch.device) -> None:
    """Move the VAE and text encoders: once their outputs are cached they wait on the CPU, so a GPU holds
    only the denoiser (SDXL's two text encoders alone are 1.6 GB in half precision, T5-XXL 9.5 GB);
    previews bring them back."""
    for part in ("vae", *TEXT_ENCODERS):
        module = getattr(pipeline, part, None)
        if module is not None:
            module.to(device)
    if device.type == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()
