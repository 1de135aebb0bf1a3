"""Aspect-ratio buckets: every image in the bucket nearest its shape, used once per epoch, never mixed."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image, ImageDraw

from sdlora.config import DataConfig
from sdlora.events import Started
from sdlora.training.buckets import Bucket, make_buckets, nearest_bucket
from sdlora.training.data import load_concept_images
from sdlora.training.encode import EncodedConcepts
from sdlora.training.loop import train

SHAPES = {"portrait": (40, 70), "tall": (30, 80), "landscape": (90, 50), "square": (60, 60)}


@pytest.mark.parametrize("resolution, step", [(1024, 64), (512, 64), (768, 64), (64, 16)])
def test_buckets_hold_about_the_area_in_steps_of_eight_latent_pixels(resolution, step):
    buckets = make_buckets(resolution, step)
    assert Bucket(resolution, resolution) in buckets
    for b in buckets:
        assert b.width % step == 0 and b.height % step == 0
        assert b.width * b.height <= resolution**2 and max(b.width / b.height, b.height / b.width) <= 2.5
        assert b.width * b.height >= 0.75 * resolution**2  # no bucket wastes much of the area
    assert {Bucket(b.height, b.width) for b in buckets} == set(buckets)  # portrait for every landscape
    if resolution == 1024:
        assert {Bucket(832, 1216), Bucket(1216, 832), Bucket(896, 1152)} <= set(buckets)  # SDXL's usual ones


def concept_folder(folder, counts):
    folder.mkdir()
    for kind, count in counts.items():
        for i in range(count):
            image = Image.new("RGB", SHAPES[kind], "white")
            ImageDraw.Draw(image).ellipse([2, 2, 20 + i, 20], fill=(200, 30, 30))
            image.save(folder / f"{kind}{i}.png")
    return folder


def test_every_image_goes_to_the_bucket_nearest_its_aspect_ratio_uncropped_to_a_square(tmp_path):
    folder = concept_folder(tmp_path / "c", {k: 1 for k in SHAPES})
    buckets = make_buckets(64, 16)
    images = load_concept_images(DataConfig(images=str(folder), resolution=64), bucket_step=16).images
    for image in images:
        width, height = SHAPES[image.path.stem[:-1]]
        bucket = image.placement.bucket
        aspect = math.log(width / height)
        assert all(
            abs(math.log(bucket.width / bucket.height) - aspect) <= abs(math.log(b.width / b.height) - aspect)
            for b in buckets
        )
        assert image.image.size == (bucket.width, bucket.height)
        assert image.placement.original_size == (height, width)
        if width != height:
            assert bucket.width != bucket.height  # not cropped to a square
    squares = load_concept_images(
        DataConfig(images=str(folder), resolution=64, buckets=False), bucket_step=16
    ).images
    assert {im.image.size for im in squares} == {(64, 64)}  # square-only training, when asked


def test_nearest_bucket_compares_ratios_both_ways():
    buckets = [Bucket(32, 64), Bucket(64, 64), Bucket(64, 32)]
    assert nearest_bucket(100, 210, buckets) == Bucket(32, 64)
    assert nearest_bucket(210, 100, buckets) == Bucket(64, 32)
    assert nearest_bucket(100, 110, buckets) == Bucket(64, 64)


def test_batches_use_every_image_once_per_epoch_and_never_mix_buckets():
    buckets = ["48x80"] * 5 + ["64x64"] * 3 + ["80x48"] * 1  # the last holds fewer images than a batch
    encoded = EncodedConcepts([torch.zeros(4, 1, 1)] * 9, torch.zeros(9, 2, 2), buckets)
    per_epoch = 3 + 2 + 1  # ceil(5/2) + ceil(3/2) + ceil(1/2)
    for epoch in range(3):
        seen = []
        for micro in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            batch = encoded.batch_indices(seed=7, micro_batch=micro, batch_size=2, rank=0, world=1).tolist()
            assert len({buckets[i] for i in batch}) == 1
            assert 1 <= len(batch) <= 2
            seen += batch
        assert sorted(seen) == list(range(9))
    two_processes = [encoded.batch_indices(7, 0, 2, rank, 2).tolist() for rank in (0, 1)]
    assert two_processes[0] != two_processes[1]


def test_training_in_mixed_buckets_lists_them_first(tiny_model, tmp_path):
    from sdlora.config import LoraSpec, TrainConfig

    folder = concept_folder(tmp_path / "mixed", {"portrait": 2, "landscape": 2, "square": 1})
    events = []
    config = TrainConfig(
        base_model=str(tiny_model),
        output_dir=str(tmp_path / "out"),
        name="mixed",
        steps=4,
        batch_size=2,
        final_preview=False,
        data=DataConfig(images=str(folder), trigger_word="sks", resolution=64),
        lora=LoraSpec(rank=2, alpha=2),
    )
    train(config, on_event=events.append)
    (started,) = [e for e in events if isinstance(e, Started)]
    assert started.buckets == ("48x80: 2", "80x48: 2", "64x64: 1")


def test_bucket_labels_say_where_each_upload_trains_or_why_it_is_skipped(tmp_path):
    from sdlora.training.data import bucket_labels

    folder = concept_folder(tmp_path / "c", {"portrait": 1, "landscape": 1})
    (folder / "broken.png").write_bytes(b"not an image")
    paths = sorted(folder.iterdir())
    labels = dict(
        zip([p.name for p in paths], bucket_labels(paths, DataConfig(resolution=64), 16), strict=True)
    )
    assert labels["portrait0.png"] == "48x80" and labels["landscape0.png"] == "80x48"
    assert labels["broken.png"].startswith("skipped: not a readable image")
