"""Mixing adapters over one resident base model: the math, fusing, switching, prompts, PNG info."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import draw_concept

from sdlora.config import DataConfig, LoraSpec, TrainConfig
from sdlora.errors import ConfigError
from sdlora.generation.generate import AdapterWeight, GenerateConfig, Generator, parse_prompt
from sdlora.library.formats import read_adapter
from sdlora.library.store import AdapterLibrary
from sdlora.models.loading import load_pipeline
from sdlora.training.loop import train


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, tiny_model):
    """Two adapters trained on different tiny concepts into one library folder."""
    root = tmp_path_factory.mktemp("gen")
    for name, colour, alpha in (("reds", (220, 30, 30), 8.0), ("blues", (30, 30, 220), 2.0)):
        images = root / f"img-{name}"
        images.mkdir()
        for i in range(3):
            draw_concept(images / f"{i}.png", i, colour)
        train(
            TrainConfig(
                base_model=str(tiny_model),
                output_dir=str(root / "lib"),
                name=name,
                steps=5,
                learning_rate=2e-2,
                final_preview=False,
                data=DataConfig(images=str(images), trigger_word="sks", resolution=32),
                lora=LoraSpec(rank=4, alpha=alpha),
            )
        )
    return AdapterLibrary(root / "lib")


def pixels(generator: Generator, **kwargs) -> np.ndarray:
    config = GenerateConfig(prompt=kwargs.pop("prompt", "sks"), seed=5, steps=3, **kwargs)
    return np.asarray(generator.generate(config)[0].image, dtype=np.float32)


def hand_fused_pipeline(tiny_model, library, mix):
    """The base with w1·ΔW1 + w2·ΔW2 added to each weight by hand, no LoRA machinery."""
    pipe = load_pipeline(str(tiny_model))
    modules = dict(pipe.unet.named_modules())
    with torch.no_grad():
        for name, weight in mix:
            for path, layer in read_adapter(library.get(name).path).in_part("unet").items():
                modules[path].weight += weight * layer.delta().reshape(modules[path].weight.shape)
    return pipe


def test_mix_equals_hand_fused_weights(tiny_model, two_adapters):
    mix = (("reds", 0.7), ("blues", -0.4))
    generator = Generator(str(tiny_model), two_adapters)
    generator.generate(GenerateConfig(prompt="x", steps=1))  # load the base
    latents_input = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    generator.apply_mix(tuple(AdapterWeight(n, w) for n, w in mix))
    with torch.no_grad():
        mixed = generator.pipeline.unet(latents_input, 10, encoder_hidden_states=context).sample
        reference = (
            hand_fused_pipeline(tiny_model, two_adapters, mix)
            .unet(latents_input, 10, encoder_hidden_states=context)
            .sample
        )
    assert torch.allclose(mixed, reference, atol=1e-5)


def test_weight_zero_equals_base_and_fused_equals_unfused(tiny_model, two_adapters):
    generator = Generator(str(tiny_model), two_adapters)
    base = pixels(generator)
    assert np.array_equal(pixels(generator, adapters=(AdapterWeight("reds", 0.0),)), base)
    fused = pixels(generator, adapters=(AdapterWeight("reds", 1.0),))
    assert generator._fused is not None and not np.array_equal(fused, base)
    assert not any(
        hasattr(m, "lora_A") for m in generator.pipeline.unet.modules()
    )  # plain layers: no overhead
    unfused = pixels(
        Generator(str(tiny_model), two_adapters, fuse_mixes=False), adapters=(AdapterWeight("reds", 1.0),)
    )
    assert np.abs(fused - unfused).max() <= 2.0  # within rounding of 8-bit pixels
    assert np.array_equal(pixels(generator), base)  # unfused before the change: base restored exactly
    assert any(hasattr(m, "lora_A") for m in generator.pipeline.unet.modules())  # adapters still resident


def unet_output(generator: Generator, mix: tuple[AdapterWeight, ...]) -> torch.Tensor:
    """The UNet's output for fixed inputs under `mix`: equal outputs mean equal images, on any machine."""
    generator.apply_mix(mix)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return generator.pipeline.unet(latents, 10, encoder_hidden_states=context).sample


@pytest.mark.parametrize("mix", [(("reds", 0.6),), (("reds", 0.7), ("blues", -0.4))], ids=["one", "mix"])
def test_same_request_gives_the_same_image_whatever_came_before(tiny_model, two_adapters, mix):
    generator = Generator(str(tiny_model), two_adapters)
    wanted = tuple(AdapterWeight(n, w) for n, w in mix)
    first = unet_output(generator, wanted), pixels(generator, adapters=wanted)
    second = unet_output(generator, wanted), pixels(generator, adapters=wanted)
    pixels(generator, adapters=(AdapterWeight("blues", 1.0),))  # another mix in between
    after = unet_output(generator, wanted), pixels(generator, adapters=wanted)
    reordered = unet_output(generator, wanted[::-1]), pixels(generator, adapters=wanted[::-1])
    for output, image in (second, after, reordered):
        assert torch.equal(output, first[0])  # bit for bit: no 8-bit rounding can hide a difference
        assert np.array_equal(image, first[1])


def test_switching_a_b_a_reproduces_the_first_image(tiny_model, two_adapters):
    generator = Generator(str(tiny_model), two_adapters)
    a = (AdapterWeight("reds", 1.0),)
    b = (AdapterWeight("blues", 0.8),)
    first = pixels(generator, adapters=a)
    pixels(generator, adapters=b)
    assert np.array_equal(pixels(generator, adapters=a), first)


def test_lru_keeps_at_most_max_resident(tiny_model, two_adapters):
    generator = Generator(str(tiny_model), two_adapters, max_resident=1)
    base = pixels(generator)
    pixels(generator, adapters=(AdapterWeight("reds", 1.0),))
    pixels(generator, adapters=(AdapterWeight("blues", 1.0),))
    assert generator.resident == ["blues"]
    assert np.array_equal(pixels(generator), base)


def test_prompt_lora_tags_resolve_against_library(tiny_model, two_adapters):
    assert parse_prompt("a <lora:reds:0.5> cat <lora:blues>") == (
        "a cat",
        (AdapterWeight("reds", 0.5), AdapterWeight("blues", 1.0)),
    )
    generator = Generator(str(tiny_model), two_adapters)
    tagged = pixels(generator, prompt="sks <lora:reds:0.6>")
    listed = pixels(generator, prompt="sks", adapters=(AdapterWeight("reds", 0.6),))
    assert np.array_equal(tagged, listed)
    with pytest.raises(Exception, match="no adapter named 'nope'"):
        pixels(generator, prompt="sks <lora:nope:1>")


def test_png_carries_automatic1111_parameters(tiny_model, two_adapters, tmp_path):
    generator = Generator(str(tiny_model), two_adapters)
    image = generator.generate(
        GenerateConfig(
            prompt="sks",
            negative_prompt="blurry",
            seed=42,
            steps=2,
            guidance=5,
            scheduler="DPM++ 2M",
            adapters=(AdapterWeight("reds", 0.5),),
        )
    )[0]
    path = image.save(tmp_path / "out.png")
    from PIL import Image

    text = Image.open(path).info["parameters"]
    assert text.splitlines()[0] == "sks <lora:reds:0.5>"
    assert "Negative prompt: blurry" in text
    assert "Steps: 2, Sampler: DPM++ 2M, CFG scale: 5, Seed: 42, Size: 32x32" in text


def test_schedulers_and_bad_settings(tiny_model, two_adapters):
    generator = Generator(str(tiny_model), two_adapters)
    for name in ("Euler a", "DPM++ 2M", "DDIM", "Euler"):
        assert pixels(generator, scheduler=name).shape == (32, 32, 3)
    with pytest.raises(ConfigError, match="unknown scheduler"):
        pixels(generator, scheduler="PLMS-ish")
    with pytest.raises(ConfigError, match="multiples of 8"):
        pixels(generator, width=30)


def test_comparison_grid_has_a_column_per_weight(tiny_model, two_adapters):
    generator = Generator(str(tiny_model), two_adapters)
    grid = generator.comparison_grid(
        GenerateConfig(prompt="sks", seed=1, steps=2, count=2, adapters=(AdapterWeight("reds", 1.0),)),
        weights=(0, 0.5, 1),
    )
    cell = 128  # 32-px images are scaled up to at least 128 px so labels stay readable
    assert grid.size[0] >= 3 * cell and grid.size[1] >= 2 * cell
    by_adapter = generator.comparison_grid(
        GenerateConfig(prompt="sks", seed=1, steps=2), adapters=("reds", "blues")
    )
    assert by_adapter.size[0] >= 3 * cell


def base_weights(generator: Generator) -> dict[str, torch.Tensor]:
    """Every non-LoRA parameter of the pipeline's LoRA-loadable parts, copied (named as in the bare base)."""
    pipe = generator.pipeline
    return {
        f"{part}.{name}".replace(".base_layer", ""): p.detach().clone()
        for part in pipe._lora_loadable_modules
        if isinstance(getattr(pipe, part, None), torch.nn.Module)
        for name, p in getattr(pipe, part).named_parameters()
        if "lora_" not in name
    }


@pytest.mark.parametrize(
    "mix",
    [(("reds", 1.0),), (("reds", 0.7), ("blues", -0.4)), (("reds", 10.0), ("blues", -10.0))],
    ids=["one", "two-on-shared-layers", "large-weights"],
)
def test_unfusing_restores_the_base_weights_bit_for_bit(tiny_model, two_adapters, mix):
    generator = Generator(str(tiny_model), two_adapters)
    wanted = tuple(AdapterWeight(n, w) for n, w in mix)
    before = base_weights(generator)
    generator.apply_mix(wanted)  # loaded and fused
    assert generator._fused is not None
    fused = base_weights(generator)
    assert any(not torch.equal(fused[k], before[k]) for k in before)  # fusing did change the weights
    generator.apply_mix(())
    after = base_weights(generator)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
