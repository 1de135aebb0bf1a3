"""The demo dataset: deterministic images, both caption forms, and the shipped concept folders."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from sdlora.demo.concepts import CONCEPTS, IMAGES_PER_CONCEPT, concept_scenes, regularization_scenes
from sdlora.demo.shapes import BASE_COLOURS, BASE_SHAPES, base_scene, render, wide_scene

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "concepts"


def test_same_seed_and_index_give_the_same_image():
    for make in (base_scene, wide_scene):
        first, second = render(make(3, 17)), render(make(3, 17))
        assert np.array_equal(np.asarray(first), np.asarray(second))
        assert first.size == (64, 64)


def test_captions_have_a_long_and_a_short_form():
    scene = base_scene(0, 0)
    assert scene.caption(long=True) == f"a {scene.colour} {scene.shape} on a {scene.background} background"
    assert scene.caption(long=False) == f"a {scene.colour} {scene.shape}"


def test_base_data_covers_every_colour_and_shape_in_many_places():
    scenes = [base_scene(0, i) for i in range(400)]
    assert {s.colour for s in scenes} == set(BASE_COLOURS)
    assert {s.shape for s in scenes} == set(BASE_SHAPES)
    assert len({(round(s.cx / 8), round(s.cy / 8)) for s in scenes}) > 20
    assert max(s.size for s in scenes) - min(s.size for s in scenes) > 15


def test_concept_scenes_are_outside_the_base_vocabulary():
    for concept in CONCEPTS:
        for scene in concept_scenes(concept):
            new = (
                scene.shape not in BASE_SHAPES or scene.colour not in BASE_COLOURS or scene.texture != "plain"
            )
            assert new, (concept.name, scene)


def test_shipped_concept_folders_have_captioned_images():
    for concept in CONCEPTS:
        folder = ASSETS / concept.name
        images = sorted(folder.glob("*.png"))
        assert len(images) == IMAGES_PER_CONCEPT, concept.name
        for image in images:
            caption = image.with_suffix(".txt").read_text().strip()
            assert concept.name in caption.split() or concept.name in caption


def test_example_concepts_cover_their_colours_shapes_and_backgrounds_evenly():
    for concept in CONCEPTS:
        scenes = concept_scenes(concept, balanced=True)
        for vocabulary, attr in (
            (concept.colours, "colour"),
            (concept.shapes, "shape"),
            (concept.backgrounds, "background"),
        ):
            counts = [sum(getattr(s, attr) == word for s in scenes) for word in vocabulary]
            assert max(counts) - min(counts) <= 1, (concept.name, attr, counts)
        # Big enough for the 16x16 latent to carry the detail, and inside the image.
        assert all(s.size >= concept.min_size and s.size / 2 <= s.cx <= 64 - s.size / 2 for s in scenes)


def test_shipped_regularisation_images_cover_every_colour_and_shape_pair_equally():
    scenes = regularization_scenes()
    pairs = Counter((scene.colour, scene.shape) for scene in scenes)
    assert set(pairs) == {(c, s) for c in BASE_COLOURS for s in BASE_SHAPES}
    assert len(set(pairs.values())) == 1, pairs
    backgrounds = Counter(scene.background for scene in scenes)
    assert max(backgrounds.values()) - min(backgrounds.values()) <= 1, backgrounds
    folder = ASSETS.parent / "regularization"
    shipped = sorted(folder.glob("*.txt"))
    assert [p.read_text().strip() for p in shipped] == [
        scene.caption(long=index % 2 == 0) for index, scene in enumerate(scenes)
    ]
    assert len(list(folder.glob("*.png"))) == len(shipped)
