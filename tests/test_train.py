"""The training loop on a tiny model: what changes, what is saved, and how it resumes."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_SIZE, draw_concept, unet_output
from diffusers import DDPMScheduler, StableDiffusionPipeline
from resume_check import straight_and_resumed
from tiny_transformers import tiny_flux_model, tiny_sd3_model  # noqa: F401 - fixtures

from sdlora.config import DataConfig, LoraSpec, TrainConfig
from sdlora.errors import CheckpointError, ConceptImagesError, ConfigError, TrainingDiverged
from sdlora.events import Preview, Started, Step, StopFlag
from sdlora.library.formats import read_metadata
from sdlora.models.families import DEFAULT
from sdlora.models.loading import load_pipeline
from sdlora.training import loop as train_module
from sdlora.training import step as step_module
from sdlora.training.data import load_concept_images
from sdlora.training.encode import Batch, encode_concepts
from sdlora.training.loop import train
from sdlora.training.lora import add_lora, trainable_parameters
from sdlora.training.step import diffusion_loss


def test_training_changes_only_lora_tensors(tiny_config):
    pipeline = load_pipeline(tiny_config.base_model)
    base = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    train(tiny_config, pipeline=pipeline)
    after = pipeline.unet.state_dict()
    lora_keys = [k for k in after if ".lora_" in k]
    assert lora_keys and any(after[k].abs().max() > 0 for k in lora_keys if "lora_B" in k)
    for key, value in base.items():
        peft_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        current = after[key] if key in after else after[peft_key]
        assert torch.equal(current, value), key


def test_loss_falls_on_a_fixed_batch(tiny_model):
    pipeline = load_pipeline(str(tiny_model))
    unet = pipeline.unet
    add_lora(unet, LoraSpec(rank=8, alpha=8))
    optimizer = torch.optim.AdamW(trainable_parameters(unet), lr=5e-3)
    objective = DEFAULT.objective(pipeline.scheduler.config, "epsilon")
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeddings = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(40):
        loss = diffusion_loss(unet, objective, Batch(latents, embeddings), torch.Generator().manual_seed(3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_saved_adapter_loads_in_diffusers_with_its_alpha(tiny_config):
    trained = load_pipeline(tiny_config.base_model)
    result = train(tiny_config, pipeline=trained)  # rank 4, alpha 16: scale 4, so a lost alpha shows
    expected = unet_output(trained.unet)

    fresh = StableDiffusionPipeline.from_pretrained(tiny_config.base_model, safety_checker=None)
    base = unet_output(fresh.unet)
    fresh.load_lora_weights(str(result.adapter_path), adapter_name="mine")
    assert fresh.unet.peft_config["mine"].lora_alpha == 16
    reloaded = unet_output(fresh.unet)
    assert not torch.allclose(reloaded, base, atol=1e-4)
    assert torch.allclose(reloaded, expected, atol=1e-6)


def test_fused_output_equals_unfused(tiny_config):
    result = train(tiny_config)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_config.base_model, safety_checker=None)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(str(result.adapter_path))
    unfused = unet_output(pipe.unet)
    pipe.fuse_lora()
    assert torch.allclose(unet_output(pipe.unet), unfused, atol=1e-5)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert torch.allclose(unet_output(pipe.unet), base, atol=1e-5)


def test_adapter_metadata_in_header(tiny_config):
    result = train(tiny_config.replace(steps=3))
    meta = read_metadata(result.adapter_path)
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 16.0
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"] == "tiny"
    assert meta["ss_steps"] == "3" and meta["ss_resolution"] == "(32, 32)"
    assert meta["sdlora.trigger_word"] == "sks" and meta["sdlora.image_count"] == "4"
    assert meta["sdlora.base_model"] == tiny_config.base_model
    tags = json.loads(meta["ss_tag_frequency"])["concept"]
    assert tags == {"sks": 4, "a red circle": 1}  # the trigger word is put in front of the one caption
    assert TrainConfig.from_dict(json.loads(meta["sdlora.train_config"])) == tiny_config.replace(steps=3)
    saved_config = json.loads(result.config_path.read_text())
    assert saved_config["lora"]["alpha"] == 16.0


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tiny_config, tmp_path):
    config = tiny_config.replace(
        steps=8, lr_schedule="cosine", warmup_steps=2, lora=LoraSpec(rank=4, alpha=16.0, dropout=0.1)
    )
    a, b = straight_and_resumed(config, tmp_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_resume_without_checkpoint_refuses_instead_of_restarting(tiny_config):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny_config, resume="latest")
    with pytest.raises(CheckpointError, match="not a complete sdlora checkpoint"):
        train(tiny_config, resume="/nonexistent/checkpoint")


def test_resume_with_a_different_rank_is_refused(tiny_config):
    train(tiny_config.replace(steps=2))
    with pytest.raises(CheckpointError, match="shapes must match"):
        train(tiny_config.replace(lora=LoraSpec(rank=8, alpha=8)), resume="latest")


def test_vprediction_model_trains_against_v_target(tiny_vpred_model):
    """A model that predicts v exactly has zero loss under the v target and not under epsilon."""
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    latents = torch.randn(3, 4, 8, 8)
    alphas = scheduler.alphas_cumprod

    class PredictsV(torch.nn.Module):
        def forward(self, noisy, timesteps, encoder_hidden_states):
            a = alphas[timesteps].sqrt().view(-1, 1, 1, 1)
            s = (1 - alphas[timesteps]).sqrt().view(-1, 1, 1, 1)
            noise = (noisy - a * latents) / s
            return type("Out", (), {"sample": a * noise - s * latents})()

    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    v_objective = DEFAULT.objective(scheduler.config, "v_prediction")
    eps_objective = DEFAULT.objective(scheduler.config, "epsilon")
    v_loss = diffusion_loss(PredictsV(), v_objective, Batch(latents, None), generator())
    eps_loss = diffusion_loss(PredictsV(), eps_objective, Batch(latents, None), generator())
    assert v_loss.item() < 1e-8 < eps_loss.item()


def test_vprediction_model_end_to_end(tiny_config, tiny_vpred_model):
    result = train(tiny_config.replace(base_model=str(tiny_vpred_model), steps=3))
    assert read_metadata(result.adapter_path)["sdlora.prediction_type"] == "v_prediction"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, monkeypatch):
    real_loss = step_module.diffusion_loss
    calls = []

    def loss_that_explodes(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(step_module, "diffusion_loss", loss_that_explodes)
    config = tiny_config.replace(checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match="step 5.*step-000004"):
        train(config)
    assert not train_module.adapter_path(config).exists()
    assert (Path(config.output_dir) / ".runs/tiny/checkpoints/step-000004").is_dir()


def test_stop_request_ends_at_next_step_and_saves(tiny_config):
    stop = StopFlag()
    result = train(
        tiny_config,
        stop=stop,
        on_event=lambda e: stop.request() if isinstance(e, Step) and e.step == 2 else None,
    )
    assert result.stopped_early and result.steps == 2
    assert read_metadata(result.adapter_path)["ss_steps"] == "2"


def test_out_of_memory_says_what_to_change(tiny_config, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(step_module, "diffusion_loss", no_memory)
    from sdlora.errors import OutOfMemory

    with pytest.raises(
        OutOfMemory, match="--batch-size 1 --gradient-accumulation-steps 4.*--gradient-checkpointing"
    ):
        train(tiny_config.replace(batch_size=4))


@pytest.fixture()
def fixed_batch_loss(tiny_model):
    """The diffusion loss of the tiny UNet on one fixed batch of 4 and fixed noise, for given options."""
    pipeline = load_pipeline(str(tiny_model))
    batch = Batch(
        torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
        torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(1)),
    )

    def loss(min_snr_gamma=0.0, noise_offset=0.0, prior_samples=0, prior_loss_weight=1.0) -> float:
        objective = DEFAULT.objective(pipeline.scheduler.config, "epsilon", min_snr_gamma, noise_offset)
        with torch.no_grad():
            return diffusion_loss(
                pipeline.unet,
                objective,
                batch,
                torch.Generator().manual_seed(2),
                prior_samples,
                prior_loss_weight,
            ).item()

    return loss


def test_min_snr_weighting_and_noise_offset_change_the_loss_as_defined(fixed_batch_loss):
    loss = fixed_batch_loss
    plain = loss()
    assert loss(min_snr_gamma=1e9) == pytest.approx(plain, rel=1e-6)  # gamma above every SNR: weight 1
    assert loss(min_snr_gamma=0.5) < plain  # low-noise steps (high SNR) are down-weighted
    assert loss(noise_offset=0.1) != pytest.approx(plain, rel=1e-4)


def test_broken_files_are_reported_once_each_and_training_uses_the_rest(tiny_config, concept_dir):
    (concept_dir / "truncated.png").write_bytes((concept_dir / "img1.png").read_bytes()[:60])
    (concept_dir / "notes.jpg").write_text("not a jpeg")
    (concept_dir / "scan.psd").write_bytes(b"8BPS")
    events = []
    result = train(tiny_config.replace(steps=2), on_event=events.append)
    (started,) = [e for e in events if isinstance(e, Started)]
    assert sorted(p.split(":")[0] for p in started.skipped_files) == [
        "notes.jpg",
        "scan.psd",
        "truncated.png",
    ]
    assert started.image_count == 4
    assert read_metadata(result.adapter_path)["sdlora.image_count"] == "4"


def test_cpu_threads_follow_the_setting_or_the_caller_and_are_restored(tiny_config):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []

    def record(event) -> None:
        if isinstance(event, Step):
            seen.append(torch.get_num_threads())

    try:
        train(tiny_config.replace(steps=1, cpu_threads=1), on_event=record)
        assert seen == [1] and torch.get_num_threads() == 2  # the caller's count is back afterwards
        train(tiny_config.replace(steps=1, name="default"), on_event=record)
        assert seen == [1, 2]  # 0: the caller's count
    finally:
        torch.set_num_threads(before)


def test_a_fresh_run_never_mixes_with_an_earlier_one_of_the_same_name(tiny_config):
    train(tiny_config.replace(steps=4))
    with pytest.raises(CheckpointError, match="already has an adapter.*--resume latest.*--overwrite"):
        train(tiny_config.replace(steps=2))
    result = train(tiny_config.replace(steps=2), overwrite=True)
    steps = [p.name for p in (Path(tiny_config.output_dir) / ".runs/tiny/checkpoints").iterdir()]
    assert steps == ["step-000002"] and read_metadata(result.adapter_path)["ss_steps"] == "2"


def test_regularisation_rows_are_added_with_the_prior_loss_weight(fixed_batch_loss):
    loss = fixed_batch_loss
    concept_only, concept_and_prior = loss(prior_samples=2, prior_loss_weight=0.0), loss(prior_samples=2)
    prior = concept_and_prior - concept_only
    assert prior > 0
    assert loss() == pytest.approx(concept_and_prior / 2, rel=1e-5)  # two equal halves, plain mean
    assert loss(prior_samples=2, prior_loss_weight=3.0) == pytest.approx(concept_only + 3 * prior, rel=1e-5)


def test_regularisation_images_are_trained_beside_the_concept(tiny_config, tmp_path, monkeypatch):
    reg = tmp_path / "reg"
    reg.mkdir()
    for i in range(3):
        draw_concept(reg / f"square{i}.png", i, colour=(40, 70, 220))
        (reg / f"square{i}.txt").write_text("a blue square")
    (reg / "broken.png").write_bytes(b"\x89PNG not really")
    batches = []
    real_loss = step_module.diffusion_loss

    def recording_loss(denoiser, objective, batch, generator, *args):
        batches.append((batch.latents.clone(), batch.embeddings.clone(), args))
        return real_loss(denoiser, objective, batch, generator, *args)

    monkeypatch.setattr(step_module, "diffusion_loss", recording_loss)
    config = tiny_config.replace(
        steps=3,
        batch_size=2,
        prior_loss_weight=0.5,
        data=replace(tiny_config.data, regularization_images=str(reg)),
    )
    events = []
    result = train(config, on_event=events.append)

    (started,) = [e for e in events if isinstance(e, Started)]
    assert [p.split(":")[0] for p in started.skipped_files] == ["broken.png"]
    header = read_metadata(result.adapter_path)
    assert header["ss_num_reg_images"] == "3" and header["sdlora.image_count"] == "4"
    # Every step: 2 concept rows, then 2 regularisation rows with their own captions (no trigger added).
    pipe = load_pipeline(config.base_model)
    reg_set = encode_concepts(
        pipe,
        load_concept_images(DataConfig(images=str(reg), trigger_word="", resolution=IMAGE_SIZE)).images,
        False,
        torch.device("cpu"),
    )
    assert len(batches) == 3
    for latents, embeddings, (prior_samples, weight) in batches:
        assert latents.shape[0] == 4 and (prior_samples, weight) == (2, 0.5)
        for row in (2, 3):
            assert torch.allclose(embeddings[row], reg_set.embeddings[0], atol=1e-5)
            assert any(torch.allclose(latents[row], r, atol=1e-5) for r in reg_set.latents)
        assert not any(torch.allclose(embeddings[row], reg_set.embeddings[0], atol=1e-3) for row in (0, 1))


def test_a_missing_regularisation_folder_is_named(tiny_config, tmp_path):
    missing = tmp_path / "no-such-reg"
    config = tiny_config.replace(data=replace(tiny_config.data, regularization_images=str(missing)))
    with pytest.raises(ConceptImagesError, match=f"regularisation images folder {missing}"):
        train(config)
    assert not Path(tiny_config.output_dir, "tiny.safetensors").exists()


def test_previews_draw_a_trained_caption_at_fixed_seeds(tiny_config):
    events = []
    train(
        tiny_config.replace(steps=2, preview_every=2, preview_inference_steps=2, final_preview=False),
        on_event=events.append,
    )
    (preview,) = [e for e in events if isinstance(e, Preview)]
    # img0.txt says "a red circle": the first image's caption with the trigger put in front.
    assert preview.prompts == ("sks, a red circle",) and preview.seeds == (1, 2)
    assert len(preview.images) == 2 and Path(preview.path).exists()


@pytest.mark.parametrize("model", ["tiny_model", "tiny_sd3_model", "tiny_flux_model"])
def test_previews_drawn_in_batches_equal_those_drawn_one_at_a_time(tiny_config, model, request):
    """Batches of the training batch size: each image from its own seed's noise, as if drawn alone."""
    import numpy as np
    from accelerate import Accelerator

    from sdlora.models.families import family_of_pipeline
    from sdlora.models.loading import load_pipeline
    from sdlora.training.preview import render_previews

    pipeline = load_pipeline(str(request.getfixturevalue(model)))
    denoiser = getattr(pipeline, family_of_pipeline(pipeline).denoiser)
    config = tiny_config.replace(preview_seeds=(1, 2, 3), preview_inference_steps=3)
    drawn = {
        batch: render_previews(
            pipeline, Accelerator(cpu=True), denoiser, config.replace(batch_size=batch), ("sks", "a"), 0
        ).images
        for batch in (1, 4)
    }
    alone, batched = ([np.asarray(image, dtype=np.int16) for image in drawn[b]] for b in (1, 4))
    assert len(batched) == 6
    assert max(int(np.abs(a - b).max()) for a, b in zip(alone, batched, strict=True)) <= 2
    assert int(np.abs(alone[0] - alone[1]).max()) > 10  # different seeds: different images


def test_the_final_preview_reuses_a_preview_drawn_at_the_last_step(tiny_config, monkeypatch):
    """The adapter's .preview.png: drawn once more only when no preview was drawn at the last step."""
    import numpy as np
    from PIL import Image

    from sdlora.training import loop

    drawn = []
    draw = loop.render_previews
    monkeypatch.setattr(loop, "render_previews", lambda *a: drawn.append(a[-1]) or draw(*a))
    # (steps, the steps drawn at, the Preview events' steps: the last is the final preview's)
    for steps, draws, shown in ((4, [2, 4], [2, 4, 4]), (3, [2, 3], [2, 3])):
        drawn.clear()
        events = []
        config = tiny_config.replace(
            name=f"p{steps}", steps=steps, preview_every=2, preview_inference_steps=2
        )
        result = train(config, on_event=events.append)
        assert drawn == draws, steps
        previews = [e for e in events if isinstance(e, Preview)]
        assert [p.step for p in previews] == shown, steps
        saved = result.adapter_path.with_name(f"p{steps}.preview.png")
        assert np.array_equal(
            np.asarray(Image.open(saved).convert("RGB")), np.asarray(previews[-1].images[0])
        )


def test_adafactor_trains_and_a_missing_optimizer_package_is_named_before_loading(tiny_config, monkeypatch):
    result = train(tiny_config.replace(steps=2, optimizer="adafactor", final_preview=False))
    assert read_metadata(result.adapter_path)["ss_optimizer"] == "adafactor" and math.isfinite(
        result.final_loss
    )
    import sys

    for package in ("bitsandbytes", "prodigyopt"):
        monkeypatch.setitem(sys.modules, package, None)  # as if not installed, wherever this runs
    monkeypatch.setattr(
        "sdlora.training.loop.load_pipeline", lambda *a, **k: pytest.fail("loaded the model first")
    )
    for name, package in (("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")):
        with pytest.raises(
            ConfigError, match=f"--optimizer {name} needs the {package} package.*pip install {package}"
        ):
            train(tiny_config.replace(optimizer=name, name=f"x-{name}"))
