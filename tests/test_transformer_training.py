"""Training SD3.5 and Flux.1 adapters on tiny models through the same loop as the UNet families."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_SIZE
from safetensors.torch import load_file
from tiny_transformers import tiny_flux_model, tiny_sd3_model  # noqa: F401 - fixtures

from sdlora.config import DataConfig, LoraSpec, TrainConfig
from sdlora.events import Started, Step, StopFlag
from sdlora.models.families import family_of_pipeline
from sdlora.models.loading import inspect_pipeline, load_pipeline
from sdlora.training.encode import Batch
from sdlora.training.loop import train
from sdlora.training.lora import add_lora, trainable_parameters
from sdlora.training.step import diffusion_loss

FAMILIES = ("sd3", "flux")


@pytest.fixture(params=FAMILIES)
def transformer_model(request) -> Path:
    """The tiny SD3 or Flux.1 diffusers folder."""
    return request.getfixturevalue(f"tiny_{request.param}_model")


@pytest.fixture()
def transformer_config(transformer_model, concept_dir, tmp_path) -> TrainConfig:
    """A quick run on the tiny transformer model."""
    return TrainConfig(
        base_model=str(transformer_model),
        output_dir=str(tmp_path / "out"),
        name="tiny",
        steps=6,
        learning_rate=1e-3,
        seed=7,
        mixed_precision="no",
        final_preview=False,
        data=DataConfig(images=str(concept_dir), trigger_word="sks", resolution=IMAGE_SIZE),
        lora=LoraSpec(rank=4, alpha=16.0),
    )


def fixed_batch(pipeline, seed: int = 0) -> Batch:
    """Random 16-channel latents of the tiny image size with one caption's conditioning."""
    family = family_of_pipeline(pipeline)
    embeddings, extras = family.encode_captions(
        pipeline, ["sks a red circle"] * 2, [()] * 2, torch.device("cpu")
    )
    side = IMAGE_SIZE // pipeline.vae_scale_factor
    latents = torch.randn(2, 16, side, side, generator=torch.Generator().manual_seed(seed))
    return Batch(latents, embeddings, extras)


def transformer_output(pipeline, batch: Batch) -> torch.Tensor:
    """The transformer's velocity for a fixed noised batch, called the family's way."""
    family = family_of_pipeline(pipeline)
    objective = family.objective(pipeline.scheduler.config, "flow")
    noised = objective.noised(batch.latents, torch.Generator().manual_seed(11))
    with torch.no_grad():
        return objective.predict(pipeline.transformer, noised, batch)


def test_the_families_are_read_from_the_pipelines(transformer_model):
    pipeline = load_pipeline(str(transformer_model))
    info = inspect_pipeline(pipeline)
    assert info.family == transformer_model.name.removeprefix("tiny-")
    assert info.prediction_type == "flow"
    family = info.model_family
    assert family.denoiser == "transformer" and family.bucket_latent_step == 2


def test_step0_output_equals_the_base_exactly(transformer_model):
    pipeline = load_pipeline(str(transformer_model))
    batch = fixed_batch(pipeline)
    base = transformer_output(pipeline, batch)
    add_lora(pipeline.transformer, LoraSpec(rank=4, alpha=16.0), family_of_pipeline(pipeline).lora_targets)
    assert torch.equal(transformer_output(pipeline, batch), base)


def test_training_changes_only_lora_tensors_on_the_default_targets(transformer_config):
    pipeline = load_pipeline(transformer_config.base_model)
    base = {k: v.clone() for k, v in pipeline.transformer.state_dict().items()}
    train(transformer_config, pipeline=pipeline)
    after = pipeline.transformer.state_dict()
    lora_keys = [k for k in after if ".lora_" in k]
    assert any(after[k].abs().max() > 0 for k in lora_keys if "lora_B" in k)
    assert any(".add_q_proj.lora_A" in k for k in lora_keys)  # the text stream's projections too
    if family_of_pipeline(pipeline).name == "flux":
        assert any(k.startswith("single_transformer_blocks.") and ".to_q.lora_A" in k for k in lora_keys)
    for key, value in base.items():
        peft_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[key] if key in after else after[peft_key], value), key


def test_loss_falls_on_a_fixed_batch(transformer_model):
    pipeline = load_pipeline(str(transformer_model))
    family = family_of_pipeline(pipeline)
    # attention alone moves a transformer this small little; its feed-forward and output layers too
    spec = LoraSpec(rank=16, alpha=16, extra_target_modules=("ff.net.0.proj", "ff.net.2", "proj_out"))
    add_lora(pipeline.transformer, spec, family.lora_targets)
    optimizer = torch.optim.AdamW(trainable_parameters(pipeline.transformer), lr=1e-2)
    objective = family.objective(pipeline.scheduler.config, "flow")
    batch = fixed_batch(pipeline)
    losses = []
    for _ in range(60):
        loss = diffusion_loss(pipeline.transformer, objective, batch, torch.Generator().manual_seed(3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(transformer_config, tmp_path):
    config = transformer_config.replace(steps=6, lr_schedule="cosine", warmup_steps=2)
    straight = train(config.replace(output_dir=str(tmp_path / "straight")))
    interrupted = config.replace(output_dir=str(tmp_path / "interrupted"))
    stop = StopFlag()
    first = train(
        interrupted,
        stop=stop,
        on_event=lambda e: stop.request() if isinstance(e, Step) and e.step == 3 else None,
    )
    assert first.stopped_early and first.steps == 3
    starts = []
    resumed = train(
        interrupted, resume="latest", on_event=lambda e: starts.append(e) if isinstance(e, Started) else 0
    )
    assert starts[0].start_step == 3 and resumed.steps == 6
    a, b = load_file(str(straight.adapter_path)), load_file(str(resumed.adapter_path))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_the_cli_trains_a_transformer_model(transformer_model, concept_dir, tmp_path):
    command = [sys.executable, "-m", "sdlora", "train", "--base-model", str(transformer_model)]
    command += ["--images", str(concept_dir), "--trigger", "sks", "--resolution", str(IMAGE_SIZE)]
    command += ["--steps", "2", "--output", str(tmp_path / "out"), "--name", "cli", "--no-final-preview"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]
    header = load_file(str(tmp_path / "out" / "cli.safetensors"))
    assert header and all(k.startswith("lora_unet_") for k in header)  # kohya's names for the transformer
