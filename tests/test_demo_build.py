"""The demo build runs end to end on tiny settings, exports a loadable model and resumes."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdlora.demo import build
from sdlora.demo.components import BUILD_INFO, folder_size_mb

TINY = ["--vae-steps", "1", "1", "--decoder-steps", "2", "--cache-images", "40", "--eval-per-pair", "0"]
TINY += ["--vae-batch", "4", "--unet-batch", "4", "--measure-images", "8"]  # the stages, not the model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    args = TINY + ["--out", str(root / "model"), "--work", str(root / "work"), "--doc", str(root / "doc.md")]
    build.main(args + ["--unet-steps", "2"])
    return root, args


def _unet_step(model_dir) -> int:
    return json.loads((model_dir / BUILD_INFO).read_text())["steps"]["unet"]


def test_build_exports_a_loadable_small_pipeline(built):
    root, _ = built
    pipe = StableDiffusionPipeline.from_pretrained(root / "model", safety_checker=None)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert folder_size_mb(root / "model") <= 20
    assert (root / "model" / "tokenizer" / "vocab.json").exists()


def test_build_records_each_stage(built):
    root, _ = built
    doc = (root / "doc.md").read_text()
    assert all(f"| {stage} |" in doc for stage in ("vae1", "vae2", "decoder", "unet"))


def test_build_resumes_from_checkpoint(built):
    root, args = built
    build.main(args + ["--unet-steps", "3"])
    assert _unet_step(root / "model") == 3
    checkpoint = torch.load(root / "work" / "checkpoint.pt", weights_only=False)
    assert checkpoint["unet_opt"] is not None and checkpoint["steps"]["unet"] == 3


def test_build_resumes_from_exported_model_without_checkpoint(built):
    root, args = built
    (root / "work" / "checkpoint.pt").unlink()
    build.main(args + ["--unet-steps", "4"])
    assert _unet_step(root / "model") == 4


def test_an_older_build_catches_up_the_decoder_stage_without_moving_the_latents(built):
    root, args = built
    path = root / "work" / "checkpoint.pt"
    old = torch.load(path, weights_only=False)
    del old["steps"]["decoder"]  # as saved before the decoder stage existed
    torch.save(old, path)
    build.main(args + ["--unet-steps", "5"])
    new = torch.load(path, weights_only=False)
    assert new["steps"]["decoder"] == 2 and new["steps"]["unet"] == 5 and new["stage"] == "done"
    encoder = [k for k in old["vae"] if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in old["vae"] if k.startswith("decoder.")]
    assert encoder and all(torch.equal(old["vae"][k], new["vae"][k]) for k in encoder)
    assert any(not torch.equal(old["vae"][k], new["vae"][k]) for k in decoder)
