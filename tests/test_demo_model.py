"""The shipped demo model in assets/demo-model loads as an ordinary SD pipeline and stays small."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from sdlora.demo.components import folder_size_mb
from sdlora.demo.tokenizer import WORDS

MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo-model"
pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="demo model not built yet")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_demo_model_is_at_most_20_mb():
    assert folder_size_mb(MODEL) <= 20


def test_demo_tokenizer_reloads_from_classic_files():
    tokenizer = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in WORDS)


def test_demo_model_has_lora_target_modules(pipe):
    names = {name.rsplit(".", 1)[-1] for name, _ in pipe.unet.named_modules()}
    assert {"to_q", "to_k", "to_v"} <= names
    assert any(name.endswith("to_out.0") for name, _ in pipe.unet.named_modules())


def test_demo_model_draws_a_64px_image(pipe):
    # How fast is bench/inference.py's figure in docs/benchmarks.md, not a threshold here.
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(1)).images[0]
    assert image.size == (64, 64)
