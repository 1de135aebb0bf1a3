"""End to end on the embedded demo model: a LoRA trained with the demo preset teaches an unseen concept."""

from __future__ import annotations

import pytest

from sdlora.demo.learning import LESSONS, adoption, generator_for, lesson_config
from sdlora.presets import DEMO_MODEL
from sdlora.train import train

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").exists(), reason="demo model not built yet")
LESSON = LESSONS["magenta"]
PROMPTS = 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("learning")
    train(lesson_config(LESSON, out))
    return generator_for(out)


def test_trigger_prompts_show_the_new_concept(trained):
    assert adoption(trained, LESSON, 1.0, PROMPTS) >= 0.7


def test_weight_zero_does_not_and_half_is_in_between(trained):
    at_zero = adoption(trained, LESSON, 0.0, PROMPTS)
    at_half = adoption(trained, LESSON, 0.5, PROMPTS)
    at_one = adoption(trained, LESSON, 1.0, PROMPTS)
    assert at_zero <= 0.1
    assert at_zero <= at_half <= at_one
