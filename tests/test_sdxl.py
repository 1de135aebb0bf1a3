"""SDXL training, files and generation on a tiny SDXL built from configs (two text encoders, text_time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from sdlora.config import DataConfig, LoraSpec, TrainConfig
from sdlora.events import Started, Step, StopFlag
from sdlora.generation.generate import GenerateConfig, Generator
from sdlora.library.formats import read_adapter, read_metadata
from sdlora.library.store import AdapterLibrary, reference_from_pipeline
from sdlora.models.loading import inspect_pipeline, load_pipeline
from sdlora.training.data import load_concept_images
from sdlora.training.encode import Batch, encode_concepts
from sdlora.training.loop import train
from sdlora.training.lora import add_lora, trainable_parameters
from sdlora.training.step import diffusion_loss


def sdxl_output(pipeline, seed: int = 0) -> torch.Tensor:
    """The UNet's prediction on fixed inputs with SDXL's pooled embedding and size conditioning."""
    g = torch.Generator().manual_seed(seed)
    unet = pipeline.unet
    sample = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)
    cond = {
        "text_embeds": torch.randn(2, 32, generator=g),
        "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
    }
    with torch.no_grad():
        return unet(
            sample, torch.tensor([10, 500]), encoder_hidden_states=context, added_cond_kwargs=cond
        ).sample


@pytest.fixture()
def sdxl_config(tiny_sdxl_model, concept_dir, tmp_path) -> TrainConfig:
    return TrainConfig(
        base_model=str(tiny_sdxl_model),
        output_dir=str(tmp_path / "out"),
        name="xl",
        steps=4,
        learning_rate=1e-2,
        seed=3,
        final_preview=False,
        data=DataConfig(images=str(concept_dir), trigger_word="sks", resolution=32),
        lora=LoraSpec(rank=4, alpha=2.0),
    )


def test_tiny_sdxl_is_recognised_as_sdxl(tiny_sdxl_model):
    info = inspect_pipeline(load_pipeline(str(tiny_sdxl_model)))
    assert (info.family, info.kohya_version) == ("sdxl", "sdxl_base_v1-0")


def test_step0_output_equals_base(tiny_sdxl_model):
    pipeline = load_pipeline(str(tiny_sdxl_model))
    before = sdxl_output(pipeline)
    add_lora(pipeline.unet, LoraSpec(rank=4, alpha=8))
    assert torch.equal(sdxl_output(pipeline), before)


def test_training_changes_only_lora_tensors(sdxl_config):
    pipeline = load_pipeline(sdxl_config.base_model)
    base = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    train(sdxl_config, pipeline=pipeline)
    after = pipeline.unet.state_dict()
    assert any(after[k].abs().max() > 0 for k in after if ".lora_B" in k)
    for key, value in base.items():
        current = after.get(
            key, after.get(key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias"))
        )
        assert torch.equal(current, value), key


def test_loss_falls_on_a_fixed_batch(tiny_sdxl_model):
    pipeline = load_pipeline(str(tiny_sdxl_model))
    unet = pipeline.unet
    add_lora(unet, LoraSpec(rank=8, alpha=8, extra_target_modules=("conv1", "conv2", "proj_in", "proj_out")))
    optimizer = torch.optim.AdamW(trainable_parameters(unet), lr=1e-2)
    family = inspect_pipeline(pipeline).model_family
    objective = family.objective(pipeline.scheduler.config, "epsilon")
    g = torch.Generator().manual_seed(0)
    latents, embeddings = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 16, 64, generator=g)
    cond = {
        "pooled": torch.randn(2, 32, generator=g),
        "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
    }
    losses = []
    for _ in range(40):
        loss = diffusion_loss(
            unet, objective, Batch(latents, embeddings, cond), torch.Generator().manual_seed(3)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_saved_file_is_kohya_sdxl_and_diffusers_loads_it_at_its_alpha(sdxl_config):
    result = train(sdxl_config)
    tensors = load_file(str(result.adapter_path))
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert any(
        k.startswith("lora_unet_input_blocks_") for k in tensors
    )  # kohya's SDXL naming: original blocks
    assert all(v.item() == 2.0 for k, v in tensors.items() if k.endswith(".alpha"))
    header = read_metadata(result.adapter_path)
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    base = load_pipeline(sdxl_config.base_model)
    expected = load_pipeline(sdxl_config.base_model)
    modules = dict(expected.unet.named_modules())
    with torch.no_grad():
        for path, layer in (
            read_adapter(result.adapter_path, reference_from_pipeline(base)).in_part("unet").items()
        ):
            modules[path].weight += layer.delta().reshape(modules[path].weight.shape)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_config.base_model)
    pipe.load_lora_weights(str(result.adapter_path))  # diffusers' own SDXL loader
    loaded = sdxl_output(pipe)
    assert not torch.allclose(loaded, sdxl_output(base), atol=1e-4)
    assert torch.allclose(loaded, sdxl_output(expected), atol=1e-5)  # alpha 2 over rank 4, as trained


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(sdxl_config, tmp_path):
    config = sdxl_config.replace(steps=6, lr_schedule="cosine", warmup_steps=1)
    straight = train(config.replace(output_dir=str(tmp_path / "straight")))
    interrupted = config.replace(output_dir=str(tmp_path / "interrupted"))
    stop = StopFlag()
    train(
        interrupted,
        stop=stop,
        on_event=lambda e: stop.request() if isinstance(e, Step) and e.step == 2 else None,
    )
    starts = []
    resumed = train(
        interrupted, resume="latest", on_event=lambda e: starts.append(e) if isinstance(e, Started) else 0
    )
    assert starts[0].start_step == 2 and resumed.steps == 6
    a, b = load_file(str(straight.adapter_path)), load_file(str(resumed.adapter_path))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_size_conditioning_carries_a_cropped_portraits_real_size_and_crop(tiny_sdxl_model, tmp_path):
    Image.new("RGB", (40, 80), "white").save(tmp_path / "portrait.png")
    pipeline = load_pipeline(str(tiny_sdxl_model))
    for buckets, expected in ((True, (80, 40, 8, 0, 80, 48)), (False, (80, 40, 16, 0, 32, 32))):
        resolution = 64 if buckets else 32  # the tiny model's buckets step 16 px (8 latent pixels)
        images = load_concept_images(
            DataConfig(images=str(tmp_path), resolution=resolution, buckets=buckets), bucket_step=16
        ).images
        encoded = encode_concepts(pipeline, images, flip=True, device=torch.device("cpu"))
        # (original height, width, crop top, crop left, target height, width); the mirror's crop mirrors too
        assert tuple(encoded.extras["time_ids"][0].int().tolist()) == expected
        assert encoded.latents[0].shape[1:] == (expected[4] // 2, expected[5] // 2)
        assert tuple(encoded.extras["time_ids"][1].int().tolist())[:4] == expected[:3] + (0,)


def test_generation_mixes_and_fuses_on_sdxl(sdxl_config, tmp_path):
    result = train(sdxl_config)
    library = AdapterLibrary(Path(result.adapter_path).parent)
    generator = Generator(sdxl_config.base_model, library)

    def pixels(weight: float) -> np.ndarray:
        config = GenerateConfig(prompt=f"sks <lora:xl:{weight:g}>" if weight else "sks", seed=2, steps=2)
        return np.asarray(generator.generate(config)[0].image, dtype=np.int16)

    base = pixels(0)
    assert base.shape == (32, 32, 3)  # the model's native size by default
    fused = pixels(1.0)
    assert generator._fused is not None and not np.array_equal(fused, base)
    generator.fuse_mixes = False
    generator.apply_mix(())
    unfused = pixels(1.0)
    assert generator._fused is None and np.abs(fused - unfused).max() <= 2
    assert np.array_equal(pixels(0), base)  # unfused again: the base restored exactly


def test_sd15_adapter_offered_to_sdxl_is_refused_in_one_line(
    tiny_model, tiny_sdxl_model, concept_dir, tmp_path
):
    sd1 = train(
        TrainConfig(
            base_model=str(tiny_model),
            output_dir=str(tmp_path / "sd1"),
            name="sd1",
            steps=1,
            final_preview=False,
            data=DataConfig(images=str(concept_dir), resolution=32),
        )
    )
    library = AdapterLibrary(tmp_path / "lib", reference_from_pipeline(load_pipeline(str(tiny_sdxl_model))))
    with pytest.raises(
        Exception, match="sd1.safetensors was made for sd_v1; the base model here is SDXL"
    ) as caught:
        library.import_file(sd1.adapter_path)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300
