"""Aspect-ratio buckets: each image trains at the shape nearest its own, cropped as little as possible.

Buckets hold about the training resolution's area (resolution² pixels) in steps of 8 latent
pixels, as kohya, OneTrainer and SimpleTuner make them. An image goes to the bucket nearest
its aspect ratio, is resized to cover it and centre-cropped; what that did (original size,
crop offset, bucket size) is kept, because SDXL is conditioned on exactly those numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

MAX_ASPECT = 2.5  # 640x1600 at SDXL's 1024: kohya's buckets reach about as far


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class Placement:
    """What bucketing did to one image, in pixels: SDXL's size and crop conditioning."""

    bucket: Bucket
    original_size: tuple[int, int]  # (height, width) of the image as read
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    resized_width: int

    def time_ids(self, mirrored: bool = False) -> tuple[int, ...]:
        """SDXL's add_time_ids: original size, crop top-left, target size; a mirrored image's crop mirrors."""
        top, left = self.crop_top_left
        if mirrored:
            left = self.resized_width - self.bucket.width - left
        return (*self.original_size, top, left, self.bucket.height, self.bucket.width)


def bucket_step(vae_scale_factor: int, latent_step: int = 8) -> int:
    """`latent_step` latent pixels: 8 (64 px) for every published UNet model, a transformer's patch size
    (2: 16 px) for SD3.5 and Flux.1, less for the tiny test models."""
    return latent_step * vae_scale_factor


def make_buckets(resolution: int, step: int, max_aspect: float = MAX_ASPECT) -> list[Bucket]:
    """(width, height) pairs in multiples of `step`, each with the most area up to resolution², aspect at
    most max_aspect; every portrait bucket has its landscape twin."""
    step = min(step, resolution)
    area = resolution * resolution
    buckets = set()
    for width in range(step, resolution + 1, step):
        height = (area // width) // step * step
        if max(width / height, height / width) <= max_aspect:
            buckets.update({Bucket(width, height), Bucket(height, width)})
    side = resolution // step * step
    buckets.add(Bucket(side, side))
    return sorted(buckets)


def square_bucket(resolution: int) -> list[Bucket]:
    return [Bucket(resolution, resolution)]


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (compared as logarithms: 2:1 and 1:2 are as far)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.width / b.height) - aspect), -b.width * b.height))


def fit_to_bucket(image: Image.Image, buckets: list[Bucket]) -> tuple[Image.Image, Placement]:
    """Resize to cover the nearest bucket and centre-crop to it."""
    width, height = image.size
    bucket = nearest_bucket(width, height, buckets)
    scale = max(bucket.width / width, bucket.height / height)
    resized = (max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale)))
    left, top = (resized[0] - bucket.width) // 2, (resized[1] - bucket.height) // 2
    fitted = image.resize(resized, Image.Resampling.LANCZOS).crop(
        (left, top, left + bucket.width, top + bucket.height)
    )
    return fitted, Placement(bucket, (height, width), (top, left), resized[0])
