"""The demo evaluator's figures under each checkpoint of the grid: on the demo model, for its lessons only.

A short, hard run on the star lesson (a high rate, no regularisation images, so that a few steps
change what the model draws) and a copy of its checkpoint with every B matrix at zero, which
must score as the base model does: no star, every trigger-free prompt right.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from sdlora.assets import DEMO_MODEL
from sdlora.demo.learning import LESSONS, base_not_ready, lesson_config
from sdlora.library.formats.files import read_metadata
from sdlora.training.checkpoint_adapters import (
    VALIDATION_KEY,
    checkpoint_adapter_path,
    list_checkpoint_adapters,
)

needs_ready_base = pytest.mark.skipif(base_not_ready() is not None, reason=str(base_not_ready()))
PROMPTS = 2  # of each kind: enough to tell a zeroed adapter from a trained one, cheap to draw


@pytest.fixture(scope="module")
def star_run(tmp_path_factory):
    """The checkpoint at step 8 of the star lesson, and step 0: its file with every B at zero."""
    from sdlora.training.loop import train

    out = tmp_path_factory.mktemp("demo-checkpoints")
    config = lesson_config(LESSONS["star"], out, steps=8, learning_rate=0.02, cpu_threads=1)
    config = replace(
        config,
        data=replace(config.data, regularization_images=""),
        validation=replace(config.validation, validation_images=4, validation_every=8),
    )
    train(config)
    trained = checkpoint_adapter_path(out, config.name, 8)
    tensors = {k: v.zero_() if "lora_up" in k else v for k, v in load_file(str(trained)).items()}
    metadata = {k: v for k, v in read_metadata(trained).items() if k != VALIDATION_KEY}
    save_file(tensors, str(checkpoint_adapter_path(out, config.name, 0)), metadata=metadata)
    return config


@needs_ready_base
def test_the_grid_shows_adoption_and_trigger_free_figures_under_each_checkpoint(star_run, tmp_path, capsys):
    from conftest import cli
    from PIL import Image

    from sdlora.generation.checkpoint_grid import FIGURE_LINE, FOOTER

    out = tmp_path / "grid.png"
    args = [
        "adapters",
        "compare",
        "star",
        "--adapters-dir",
        star_run.output_dir,
        "--base-model",
        str(DEMO_MODEL),
    ]
    args += [
        "--weights",
        "1",
        "--inference-steps",
        "2",
        "--evaluator-prompts",
        str(PROMPTS),
        "--out",
        str(out),
    ]
    code, printed, _ = cli(capsys, *args)
    assert code == 0
    path, *lines = printed.strip().splitlines()
    assert path == str(out)
    assert [c.step for c in list_checkpoint_adapters(star_run.output_dir, "star")] == [0, 8]
    zeroed, last = lines
    assert zeroed == (
        "step 0: val -; 0/2 trigger prompts drawn as star, 2/2 trigger-free prompts drawn right"
    )
    assert last.startswith("step 8: val ") and last.split("; ")[1] != zeroed.split("; ")[1]
    cell = 128  # the demo model's 64-px images, scaled up
    assert Image.open(out).height == 24 + cell + FOOTER + 2 * FIGURE_LINE


def _header(path: Path, folders: dict, base_model: str = str(DEMO_MODEL)) -> Path:
    import torch

    metadata = {"ss_tag_frequency": json.dumps(folders), "sdlora.base_model": base_model}
    save_file({"x": torch.zeros(1)}, str(path), metadata=metadata)
    return path


@needs_ready_base
def test_figures_only_for_the_demo_lessons_on_the_demo_model(tiny_model, tmp_path):
    from sdlora.demo.checkpoint_scores import demo_lesson

    folder = _header(tmp_path / "a.safetensors", {"star": {"sks": 4, "a red star on a white background": 4}})
    captions = _header(tmp_path / "b.safetensors", {"images": {"sks": 3, "a blue striped square": 3}})
    other = _header(tmp_path / "c.safetensors", {"cyan": {"sks": 4, "a cyan circle": 4}})
    assert demo_lesson(DEMO_MODEL, folder).name == "star"
    assert demo_lesson(DEMO_MODEL, captions).name == "striped"
    assert demo_lesson(DEMO_MODEL, other) is None  # an example concept without an evaluator lesson
    assert demo_lesson(tiny_model, folder) is None  # not the demo model: no evaluator, no figures
