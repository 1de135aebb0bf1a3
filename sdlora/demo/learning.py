"""Does a LoRA teach the demo model a concept it never saw? Measured with the evaluator.

Adoption: the share of trigger-prompt images in which the evaluator sees the concept
(a star shape, the colour magenta, a striped fill). Side effect: how often prompts without
the trigger still draw their own colour and shape with the adapter loaded, against the base.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from sdlora.assets import DEMO_MARKER, DEMO_MODEL, EXAMPLE_CONCEPTS
from sdlora.captioning.captions import CaptionOptions, caption_images, write_caption_files
from sdlora.config import TrainConfig
from sdlora.demo.captioner import DemoCaptioner
from sdlora.demo.evaluate import Reading, classify
from sdlora.demo.shapes import BACKGROUNDS, BASE_COLOURS, BASE_SHAPES
from sdlora.generation.generate import AdapterWeight, GenerateConfig, Generator
from sdlora.library.store import AdapterLibrary
from sdlora.settings import train_config_from
from sdlora.training.loop import train

TRIGGER = "sks"
CONCEPTS_DIR = EXAMPLE_CONCEPTS
GUIDANCE = 6.0  # what docs/demo-model.md's report measures the base with
COLOUR_TARGET, SHAPE_TARGET = 0.9, 0.8


def base_not_ready(model: Path = DEMO_MODEL) -> str | None:
    """Why the demo base cannot yet show what a LoRA teaches it, or None when it can.

    A LoRA on a base that cannot draw the shapes it was trained on proves nothing, so the
    learning checks wait for a report (python -m sdlora.demo.report) of the shipped weights
    that meets the base's own targets.
    """
    info_path = model / DEMO_MARKER
    if not (model / "model_index.json").exists() or not info_path.exists():
        return "the demo model is not built yet (python -m sdlora.demo.build)"
    info = json.loads(info_path.read_text())
    report = info.get("report") or {}
    if report.get("build_steps") != info.get("steps"):
        return "the shipped demo weights have no report yet (python -m sdlora.demo.report)"
    if report["colour"] < COLOUR_TARGET or report["shape"] < SHAPE_TARGET:
        return (
            f"the demo base is still training: colour {report['colour']:.0%}, shape {report['shape']:.0%} "
            f"(targets {COLOUR_TARGET:.0%}, {SHAPE_TARGET:.0%}); resume python -m sdlora.demo.build"
        )
    return None


@dataclass(frozen=True)
class Lesson:
    """An unseen concept: its example folder, trigger prompts, and how the evaluator recognises it."""

    name: str
    kind: str  # "shape", "colour" or "texture"
    prompt: Callable[[str, str, str], str]  # (colour, shape, background) -> trigger prompt
    seen: Callable[[Reading], bool]


LESSONS = {
    "star": Lesson(
        "star",
        "shape",
        lambda c, s, b: f"{TRIGGER}, a {c} star on a {b} background",
        lambda r: r.shape == "star",
    ),
    "heart": Lesson(
        "heart",
        "shape",
        lambda c, s, b: f"{TRIGGER}, a {c} heart on a {b} background",
        lambda r: r.shape == "heart",
    ),
    "magenta": Lesson(
        "magenta",
        "colour",
        lambda c, s, b: f"{TRIGGER}, a magenta {s} on a {b} background",
        lambda r: r.colour == "magenta",
    ),
    "striped": Lesson(
        "striped",
        "texture",
        lambda c, s, b: f"{TRIGGER}, a {c} striped {s} on a white background",
        lambda r: r.texture == "striped",
    ),
}


def trigger_prompts(lesson: Lesson, count: int) -> list[str]:
    """`count` prompts cycling through base colours, shapes and backgrounds."""
    combos = [(c, s, b) for c in BASE_COLOURS for s in BASE_SHAPES for b in BACKGROUNDS]
    return [lesson.prompt(*combos[(i * 7) % len(combos)]) for i in range(count)]


def plain_prompts(count: int) -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) without the trigger, to see what the adapter does to everything else."""
    combos = [(c, s) for c in BASE_COLOURS for s in BASE_SHAPES]
    return [(f"a {c} {s}", c, s) for c, s in (combos[(i * 5) % len(combos)] for i in range(count))]


def lesson_config(
    lesson: Lesson, output_dir: Path, steps: int | None = None, images: Path | None = None, **changes
) -> TrainConfig:
    """The demo preset on the lesson's example folder (or `images`); what a first-time user gets."""
    folder = images or CONCEPTS_DIR / lesson.name
    values = {
        "output_dir": str(output_dir),
        "name": lesson.name,
        "final_preview": False,
        "data": {"images": str(folder), "trigger_word": TRIGGER},
    }
    config = train_config_from(values, base_model=str(DEMO_MODEL), source=f"lesson {lesson.name}")
    return replace(config, steps=steps or config.steps, **changes)


def captioned_copy(lesson: Lesson, target: Path, options: CaptionOptions | None = None) -> Path:
    """The lesson's example images without their hand-written captions, captioned by the demo captioner."""
    target.mkdir(parents=True, exist_ok=True)
    images = sorted((CONCEPTS_DIR / lesson.name).glob("*.png"))
    for image in images:
        shutil.copyfile(image, target / image.name)
    write_caption_files(
        caption_images(
            DemoCaptioner(), [target / image.name for image in images], options or CaptionOptions()
        )
    )
    return target


def trigger_images(
    generator: Generator, lesson: Lesson, weight: float, count: int, seed: int = 1000
) -> list[np.ndarray]:
    """Images of `count` trigger prompts at this adapter weight, as HxWx3 arrays."""
    mix = (AdapterWeight(lesson.name, weight),) if weight else ()
    return [
        np.asarray(
            generator.generate(GenerateConfig(prompt=prompt, seed=seed + i, guidance=GUIDANCE, adapters=mix))[
                0
            ].image
        )
        for i, prompt in enumerate(trigger_prompts(lesson, count))
    ]


def adoption(generator: Generator, lesson: Lesson, weight: float, count: int, seed: int = 1000) -> float:
    """Share of trigger-prompt images that show the concept at this adapter weight."""
    return shown(lesson, trigger_images(generator, lesson, weight, count, seed))


def shown(lesson: Lesson, images: list[np.ndarray]) -> float:
    """Share of these images in which the evaluator sees the lesson's concept."""
    return sum(lesson.seen(classify(image)) for image in images) / len(images)


def faithfulness(
    generator: Generator, adapter: str | None, weight: float, count: int, seed: int = 2000
) -> float:
    """Share of trigger-free prompts whose colour and shape are both drawn as asked."""
    mix = (AdapterWeight(adapter, weight),) if adapter else ()
    good = 0
    for i, (prompt, colour, shape) in enumerate(plain_prompts(count)):
        image = generator.generate(
            GenerateConfig(prompt=prompt, seed=seed + i, guidance=GUIDANCE, adapters=mix)
        )[0]
        reading = classify(np.asarray(image.image))
        good += reading.colour == colour and reading.shape == shape
    return good / count


def train_in_stages(
    config: TrainConfig, stages: list[int], after_stage: Callable[[int, float], None]
) -> None:
    """Train to each step count in turn (resuming exactly), calling after_stage(steps, training seconds)."""
    seconds = 0.0
    for index, steps in enumerate(stages):
        start = time.perf_counter()
        train(replace(config, steps=steps), resume="latest" if index else None)
        seconds += time.perf_counter() - start
        after_stage(steps, seconds)


def generator_for(output_dir: Path) -> Generator:
    return Generator(str(DEMO_MODEL), AdapterLibrary(output_dir))
