"""Example concept folders for trying LoRA training on the demo model: `python -m sdlora.demo.concepts`.

Each concept is something the base model never saw (a shape, a colour, a texture),
written as 8 small PNGs with same-name .txt captions under assets/concepts/<name>/;
assets/regularization/ holds base-model scenes to train beside them (prior preservation).
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from sdlora.assets import EXAMPLE_CONCEPTS, REGULARIZATION
from sdlora.demo.shapes import (
    BACKGROUNDS,
    BASE_COLOURS,
    BASE_SHAPES,
    NEW_COLOURS,
    Scene,
    make_scene,
    place,
    render,
)

IMAGES_PER_CONCEPT = 8


@dataclass(frozen=True)
class Concept:
    """A thing to teach: how its scenes vary and a one-line description."""

    name: str
    description: str
    shapes: tuple[str, ...] = BASE_SHAPES
    colours: tuple[str, ...] = tuple(BASE_COLOURS)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    texture: str = "plain"
    # What the demo VAE (64 px -> 16x16 latents) carries through a round trip, measured:
    # star points need ~40 px (28 px: 48% survive, 40 px: 83%, 46 px: 100%); stripes need
    # a period of 8 px or more (6 px: 38%); checks survive best on the latent grid (8 px).
    min_size: int = 28
    periods: tuple[int, ...] = (8, 10, 12)


CONCEPTS = (
    Concept("star", "a five-pointed star shape", shapes=("star",), min_size=40),
    Concept("heart", "a heart shape", shapes=("heart",)),
    Concept("magenta", "the colour magenta", colours=("magenta",)),
    Concept("cyan", "the colour cyan", colours=("cyan",)),
    # Textures use dark ink, so they sit on light backgrounds where the ink stays visible.
    Concept("striped", "a striped fill", backgrounds=("white", "gray"), texture="striped"),
    Concept(
        "checkered", "a checkered fill", backgrounds=("white", "gray"), texture="checkered", periods=(8,)
    ),
)


def concept_scenes(
    concept: Concept, seed: int = 0, count: int = IMAGES_PER_CONCEPT, balanced: bool = False
) -> list[Scene]:
    """Deterministic, varied scenes showing the concept.

    `balanced` cycles through the concept's colours, shapes and backgrounds instead of drawing
    them at random, so 8 example images cover each one as evenly as 8 can (as a user picking
    training images would); size, place and exact tint stay random.
    """
    rng = np.random.default_rng([seed, sum(map(ord, concept.name))])
    palette = {**BASE_COLOURS, **NEW_COLOURS}
    scenes = []
    for index in range(count):
        shapes, colours, backgrounds = concept.shapes, concept.colours, concept.backgrounds
        if balanced:
            shapes = (shapes[index % len(shapes)],)
            colours = (colours[index % len(colours)],)
            cycle = max(len(concept.shapes), len(concept.colours))  # shift backgrounds once per round
            backgrounds = (backgrounds[(index + index // cycle) % len(backgrounds)],)
        scene = make_scene(
            rng,
            shapes,
            {c: palette[c] for c in colours},
            {b: BACKGROUNDS[b] for b in backgrounds},
            (concept.texture,),
        )
        period = concept.periods[int(rng.integers(len(concept.periods)))]
        if scene.size < concept.min_size:  # large enough to show the detail, and still inside the image
            cx, cy = place(rng, concept.min_size)
            scene = replace(scene, size=concept.min_size, cx=cx, cy=cy)
        scenes.append(replace(scene, period=period))
    return scenes


def export_concepts(folder: Path, seed: int = 0) -> list[Path]:
    """Write every concept folder under `folder` (replacing old ones); returns the folders."""
    written = []
    for concept in CONCEPTS:
        target = folder / concept.name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for index, scene in enumerate(concept_scenes(concept, seed, balanced=True)):
            render(scene).save(target / f"{concept.name}_{index:02d}.png", optimize=True)
            (target / f"{concept.name}_{index:02d}.txt").write_text(scene.caption() + "\n")
        written.append(target)
    return written


REGULARIZATION_IMAGES = 24


def regularization_scenes(seed: int = 0, count: int = REGULARIZATION_IMAGES) -> list[Scene]:
    """Base-model scenes covering every colour x shape pair equally, backgrounds in turn.

    Balanced rather than random: a random draw of 24 left yellow with 4 scenes and, beside the
    magenta concept, prompts without the trigger lost their green (an adapter that learns
    magenta is tempted to turn green down everywhere); with every pair present twice, trigger-free
    prompts stayed right (docs/demo-model.md). Size, place and tint stay random.
    """
    rng = np.random.default_rng([seed, 500])
    colours, shapes, backgrounds = sorted(BASE_COLOURS), BASE_SHAPES, sorted(BACKGROUNDS)
    pairs = len(colours) * len(shapes)
    scenes = []
    for index in range(count):
        colour = colours[(index // len(shapes)) % len(colours)]
        background = backgrounds[(index + index // pairs) % len(backgrounds)]  # shift once per round
        scenes.append(
            make_scene(
                rng,
                (shapes[index % len(shapes)],),
                {colour: BASE_COLOURS[colour]},
                {background: BACKGROUNDS[background]},
            )
        )
    return scenes


def export_regularization(folder: Path, seed: int = 0, count: int = REGULARIZATION_IMAGES) -> Path:
    """Write base-model scenes (what prompts without a trigger should keep drawing) with captions.

    The demo's counterpart of kohya's class images: for a real model they are images the base
    generates for the class prompt; here the procedural generator draws exactly that.
    """
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for index, scene in enumerate(regularization_scenes(seed, count)):
        render(scene).save(folder / f"base_{index:02d}.png", optimize=True)
        (folder / f"base_{index:02d}.txt").write_text(scene.caption(long=index % 2 == 0) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EXAMPLE_CONCEPTS)
    parser.add_argument("--regularization-out", type=Path, default=REGULARIZATION)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for target in export_concepts(args.out, args.seed):
        print(target)
    print(export_regularization(args.regularization_out, args.seed))


if __name__ == "__main__":
    main()
