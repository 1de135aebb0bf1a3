"""The demo model's captioner: the evaluator's reading written in the words the demo model was trained on.

It needs no weights and no GPU, so it captions offline on any CPU; it describes what the
demo generator draws (one shape, its colour and fill, a plain background), and nothing else.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdlora.demo.concepts import CONCEPTS, concept_scenes
from sdlora.demo.evaluate import background_colour, classify
from sdlora.demo.shapes import (
    BACKGROUNDS,
    BASE_COLOURS,
    BASE_SHAPES,
    NEW_COLOURS,
    NEW_SHAPES,
    SIZE,
    Scene,
    make_scene,
)


class DemoCaptioner:
    """'a red striped circle on a white background', the demo generator's own caption style."""

    name = "demo"

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in order."""
        return [describe(image) for image in images]


def describe(image: Image.Image) -> str:
    """The caption of one image, read at the demo model's 64 px."""
    if image.size != (SIZE, SIZE):
        image = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    background = background_name(pixels)
    reading = classify(pixels)
    if reading.shape == "none":
        return f"a plain {background} background"
    texture = "" if reading.texture == "plain" else f"{reading.texture} "
    return f"a {reading.colour} {texture}{reading.shape} on a {background} background"


def background_name(pixels: np.ndarray) -> str:
    """The named background nearest to the median colour of the image's border."""
    border = background_colour(pixels)
    return min(BACKGROUNDS, key=lambda name: float(np.linalg.norm(border - np.array(BACKGROUNDS[name]))))


def every_kind_of_scene(seed: int, per_kind: int = 2, per_texture: int = 20) -> list[Scene]:
    """Scenes of every colour x shape x background, plus the example concepts' textures: what the
    captioner is checked on (with seeds the example folders were not drawn with)."""
    palette = {**BASE_COLOURS, **NEW_COLOURS}
    rng = np.random.default_rng([seed, 31])
    scenes = [
        make_scene(rng, (shape,), {colour: palette[colour]}, {background: BACKGROUNDS[background]})
        for colour in palette
        for shape in BASE_SHAPES + NEW_SHAPES
        for background in BACKGROUNDS
        for _ in range(per_kind)
    ]
    for concept in CONCEPTS:
        if concept.texture != "plain":
            scenes += concept_scenes(concept, seed=seed, count=per_texture)
    return scenes
