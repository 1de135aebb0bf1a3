"""The demo evaluator's figures for a run's checkpoint adapters: a quality figure beside the loss.

Only on the demo model, and only for an adapter that teaches one of the demo's lessons (star,
heart, magenta, striped): there the evaluator can read what an image shows, so for each
checkpoint it gives the share of trigger prompts drawn as the concept (adoption) and how many
trigger-free prompts are still drawn in their asked colour and shape. Anywhere else there is no
evaluator, and `demo_lesson` says so with None rather than a made-up figure.

The prompts and seeds are the ones `sdlora.demo.learning`'s adoption and faithfulness use, so the
figures agree with theirs; each checkpoint draws all its prompts in one batched call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdlora.assets import is_demo_model
from sdlora.config import AdapterWeight, GenerateConfig
from sdlora.demo.evaluate import classify
from sdlora.demo.learning import GUIDANCE, LESSONS, Lesson, plain_prompts, trigger_prompts
from sdlora.library.formats.files import read_metadata

TRIGGER_SEED, PLAIN_SEED = 1000, 2000  # learning.adoption's and learning.faithfulness's first seeds


@dataclass(frozen=True)
class DemoScore:
    """One adapter's figures: trigger prompts drawn as the concept, trigger-free prompts drawn right."""

    adopted: int
    trigger_prompts: int
    faithful: int
    plain_prompts: int

    @property
    def adoption(self) -> float:
        return self.adopted / self.trigger_prompts

    @property
    def faithfulness(self) -> float:
        return self.faithful / self.plain_prompts


def demo_lesson(base_model: str | Path, adapter: Path) -> Lesson | None:
    """The demo lesson this adapter teaches when `base_model` is the demo model, else None.

    An adapter teaches a lesson when it was trained from the lesson's example folder (the folder's
    name, as kohya's tag frequencies record it) or on captions that name the concept.
    """
    if not is_demo_model(base_model):
        return None
    metadata = read_metadata(adapter)
    try:
        folders = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        return None
    if not isinstance(folders, dict):
        return None
    words = {
        word for tags in folders.values() if isinstance(tags, dict) for tag in tags for word in _words(tag)
    }
    for lesson in LESSONS.values():
        if lesson.name in folders or lesson.name in words:
            return lesson
    return None


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def score_adapters(
    generator, lesson: Lesson, adapters: list[str | None], prompts: int, weight: float = 1.0
) -> list[DemoScore]:
    """The evaluator's figures for each adapter (None: the base model) at `weight`, on `prompts` of each kind."""
    return [score_adapter(generator, lesson, adapter, prompts, weight) for adapter in adapters]


def score_adapter(generator, lesson: Lesson, adapter: str | None, prompts: int, weight: float) -> DemoScore:
    """One adapter's figures, every prompt of both kinds drawn in one batched call."""
    plain = plain_prompts(prompts)
    mix = (AdapterWeight(adapter, weight),) if adapter else ()
    configs = [
        GenerateConfig(prompt=prompt, seed=seed, guidance=GUIDANCE, adapters=mix)
        for prompt, seed in [
            *((p, TRIGGER_SEED + i) for i, p in enumerate(trigger_prompts(lesson, prompts))),
            *((p, PLAIN_SEED + i) for i, (p, _, _) in enumerate(plain)),
        ]
    ]
    # one mix for the whole batch: fused, the fastest way to draw (rows with their own adapters run slower)
    readings = [classify(np.asarray(drawn[0].image)) for drawn in generator.generate_batch(configs)]
    adopted = sum(lesson.seen(reading) for reading in readings[:prompts])
    faithful = sum(
        reading.colour == colour and reading.shape == shape
        for reading, (_, colour, shape) in zip(readings[prompts:], plain, strict=True)
    )
    return DemoScore(adopted, prompts, faithful, prompts)
