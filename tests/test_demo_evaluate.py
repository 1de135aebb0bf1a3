"""The demo evaluator reads the generator's own clean images correctly."""

from __future__ import annotations

import numpy as np
import pytest

from sdlora.demo.evaluate import classify
from sdlora.demo.shapes import (
    BACKGROUNDS,
    BASE_COLOURS,
    BASE_SHAPES,
    NEW_COLOURS,
    NEW_SHAPES,
    TEXTURES,
    make_scene,
    render,
)

ALL_COLOURS = {**BASE_COLOURS, **NEW_COLOURS}


def _accuracy(read: list, attribute: str) -> float:
    """Share of (scene, reading) pairs whose reading of `attribute` is the scene's."""
    return np.mean([getattr(reading, attribute) == getattr(scene, attribute) for scene, reading in read])


def _read(scenes: list) -> list:
    """Each scene with the evaluator's reading of its rendering (read once, checked by several tests)."""
    return [(scene, classify(np.asarray(render(scene)))) for scene in scenes]


@pytest.fixture(scope="module")
def plain_scenes() -> list:
    rng = np.random.default_rng(1234)
    return _read([make_scene(rng, BASE_SHAPES + NEW_SHAPES, ALL_COLOURS) for _ in range(300)])


@pytest.fixture(scope="module")
def textured_scenes() -> list:
    rng = np.random.default_rng(4321)
    white = {"white": BACKGROUNDS["white"]}
    return _read([make_scene(rng, BASE_SHAPES, BASE_COLOURS, white, TEXTURES) for _ in range(150)])


def test_colour_of_clean_images_is_read_correctly(plain_scenes):
    assert _accuracy(plain_scenes, "colour") >= 0.98


def test_shape_of_clean_images_is_read_correctly(plain_scenes):
    assert _accuracy(plain_scenes, "shape") >= 0.98


def test_texture_of_clean_images_is_read_correctly(textured_scenes):
    assert _accuracy(textured_scenes, "texture") >= 0.98


def test_textures_do_not_confuse_colour_or_shape(textured_scenes):
    assert _accuracy(textured_scenes, "colour") >= 0.98
    assert _accuracy(textured_scenes, "shape") >= 0.98


def test_every_base_pair_is_recognised_at_its_smallest_size():
    rng = np.random.default_rng(0)
    for shape in BASE_SHAPES + NEW_SHAPES:
        for colour in ALL_COLOURS:
            scene = make_scene(rng, (shape,), {colour: ALL_COLOURS[colour]})
            small = type(scene)(**{**scene.__dict__, "size": 20, "cx": 32.0, "cy": 32.0})
            reading = classify(np.asarray(render(small)))
            assert (reading.colour, reading.shape) == (colour, shape)


def test_blank_image_reads_as_nothing():
    blank = np.full((64, 64, 3), 245, dtype=np.uint8)
    assert classify(blank).shape == "none"


def test_noise_does_not_break_the_reading():
    rng = np.random.default_rng(5)
    scene = make_scene(rng, ("square",), {"blue": BASE_COLOURS["blue"]})
    noisy = np.asarray(render(scene)).astype(float) + rng.normal(0, 12, (64, 64, 3))
    reading = classify(np.clip(noisy, 0, 255))
    assert (reading.colour, reading.shape) == ("blue", "square")
