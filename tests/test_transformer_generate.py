"""Drawing on SD3.5 and Flux.1 bases through sdlora's Generator: the model cards' defaults, their own
sampler, and everything the UNet families have (mixes, fuse and unfuse, the LRU, tags, grids, PNG
parameters, batches). Tiny models at 32 px with 2 steps; one Generator per family for the module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli
from PIL import Image
from tiny_transformers import IMAGE_SIZE, tiny_flux_model, tiny_sd3_model  # noqa: F401 - fixtures

from sdlora.config import SCHEDULERS
from sdlora.errors import ConfigError
from sdlora.generation.defaults import CONFIG_DEFAULTS, sampling_defaults, sampling_defaults_of
from sdlora.generation.generate import AdapterWeight, GenerateConfig, Generator
from sdlora.library.formats import write_adapter
from sdlora.library.formats.adapter import Adapter, LoraLayer, ModelLayout
from sdlora.library.store import AdapterLibrary
from sdlora.models.families import FLUX, SD1, SD3, family_named

ADAPTERS = ("ink", "moss", "rust")


def test_the_defaults_follow_the_model_cards():
    dev, schnell = FLUX.sampling_defaults({"guidance_embeds": True}), FLUX.sampling_defaults({})
    assert (dev.steps, dev.guidance, dev.guidance_used) == (28, 3.5, True)
    assert (schnell.steps, schnell.guidance, schnell.guidance_used) == (4, 0.0, False)
    large, medium = SD3.sampling_defaults({}), SD3.sampling_defaults({"dual_attention_layers": [0, 1]})
    assert (large.steps, large.guidance, medium.steps, medium.guidance) == (28, 3.5, 40, 4.5)
    for defaults in (dev, schnell, large, medium):
        assert defaults.samplers == ("Euler",)  # their own flow-matching sampler only
    assert not (dev.negative_prompt_used or schnell.negative_prompt_used) and large.negative_prompt_used
    # what the estimate counts per sampling step of a preview: guidance's second pass where there is one
    assert (dev.passes_per_step, schnell.passes_per_step, large.passes_per_step) == (1, 1, 2)
    assert CONFIG_DEFAULTS.passes_per_step == 2
    # The UNet families keep GenerateConfig's defaults and every sampler
    assert sampling_defaults(SD1, {}) == CONFIG_DEFAULTS and CONFIG_DEFAULTS.samplers == SCHEDULERS
    assert (CONFIG_DEFAULTS.steps, CONFIG_DEFAULTS.guidance) == (20, 7.5)


def test_the_defaults_are_read_from_a_folder_before_loading(tiny_flux_model, tiny_model):  # noqa: F811
    family, defaults = sampling_defaults_of(str(tiny_flux_model))
    assert family is FLUX and (defaults.steps, defaults.guidance) == (28, 3.5)
    assert sampling_defaults_of(str(tiny_model)) == (SD1, CONFIG_DEFAULTS)
    assert sampling_defaults_of("someone/some-hub-model") == (None, CONFIG_DEFAULTS)


def test_the_generate_tab_offers_only_what_the_model_uses():
    from sdlora.ui.generate_tab import model_setting_updates

    steps, guidance, sampler, negative = model_setting_updates(FLUX.sampling_defaults({}), "Flux.1")
    assert steps["value"] == 4 and guidance["value"] == 0.0  # schnell
    assert guidance["visible"] is False and negative["visible"] is False
    assert sampler["choices"] == ["Euler"] and sampler["interactive"] is False
    steps, guidance, sampler, negative = model_setting_updates(CONFIG_DEFAULTS, "SD 1.x")
    assert (steps["value"], guidance["value"], sampler["value"]) == (20, 7.5, "Euler a")
    assert sampler["choices"] == list(SCHEDULERS) and guidance["visible"] and negative["visible"]


def random_adapter(layout: ModelLayout, family: str, seed: int) -> Adapter:
    """A rank-4 adapter with random down and up on every default target of the transformer."""
    names = {target.split(".")[0] for target in family_named(family).lora_targets}
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for key, shape in layout.shapes.items():
        module = key.split(".")[-1] if not key.endswith("to_out.0") else "to_out"
        if key.startswith("transformer.") and module in names:
            down, up = torch.randn(4, shape[1], generator=g), torch.randn(shape[0], 4, generator=g)
            layers[key] = LoraLayer(down * 0.3, up * 0.3, 4.0)
    return Adapter(layers)


@pytest.fixture(scope="module", params=["flux", "sd3"])
def drawing(request, tmp_path_factory):
    """(family name, model folder, Generator with three random library adapters, at most two resident)."""
    family = request.param
    model = request.getfixturevalue(f"tiny_{family}_model")
    root = tmp_path_factory.mktemp(f"{family}-lib")
    generator = Generator(str(model), AdapterLibrary(root), max_resident=2)
    layout = ModelLayout.of(generator.pipeline, family)
    for seed, name in enumerate(ADAPTERS):
        write_adapter(root / f"{name}.safetensors", random_adapter(layout, family, seed), family=family)
    return family, model, generator


def request_for(prompt: str = "a red circle", **settings) -> GenerateConfig:
    """A cheap request: 32 px, 2 steps, the model's own sampler."""
    values = dict(seed=3, steps=2, width=IMAGE_SIZE, height=IMAGE_SIZE, scheduler="Euler")
    return GenerateConfig(prompt=prompt, **{**values, **settings})


def pixels(generator: Generator, config: GenerateConfig) -> list[np.ndarray]:
    return [np.asarray(image.image, dtype=np.float32) for image in generator.generate(config)]


def mix(*pairs: tuple[str, float]) -> tuple[AdapterWeight, ...]:
    return tuple(AdapterWeight(name, weight) for name, weight in pairs)


def test_the_generator_refuses_a_unet_sampler_and_an_unused_negative_prompt(drawing):
    family, _, generator = drawing
    words = family_named(family).words
    with pytest.raises(ConfigError) as caught:
        generator.generate(request_for(scheduler="Euler a"))
    assert "\n" not in str(caught.value) and words in str(caught.value) and "'Euler'" in str(caught.value)
    assert generator.sampling_defaults.samplers == ("Euler",)
    if family == "flux":  # no classifier-free guidance: a negative prompt would be silently ignored
        with pytest.raises(ConfigError, match="negative_prompt: Flux.1 draws without one"):
            generator.generate(request_for(negative_prompt="blurry"))
    else:
        assert pixels(generator, request_for(negative_prompt="blurry"))


def test_mixes_are_weighted_and_tags_equal_listed_adapters(drawing):
    _, _, generator = drawing
    base = pixels(generator, request_for())[0]
    one = pixels(generator, request_for(adapters=mix(("ink", 1.0))))[0]
    both = pixels(generator, request_for(adapters=mix(("ink", 0.7), ("moss", 0.5))))[0]
    tagged = pixels(generator, request_for("a red circle <lora:ink:0.7> <lora:moss:0.5>"))[0]
    assert np.abs(one - base).max() > 4 and np.abs(both - one).max() > 4
    assert np.array_equal(tagged, both)
    unfused = Generator(generator.base_model, generator.library, fuse_mixes=False)
    through_lora = pixels(unfused, request_for(adapters=mix(("ink", 0.7), ("moss", 0.5))))[0]
    assert np.abs(through_lora - both).max() <= 2.0  # within rounding of 8-bit pixels
    assert np.array_equal(pixels(generator, request_for())[0], base)


def test_switching_beyond_the_resident_limit_draws_each_mix_the_same(drawing):
    _, _, generator = drawing
    first = {name: pixels(generator, request_for(adapters=mix((name, 1.0))))[0] for name in ADAPTERS}
    assert len(generator.resident) == 2 and "ink" not in generator.resident  # the least recent went
    again = pixels(generator, request_for(adapters=mix(("ink", 1.0))))[0]
    assert np.array_equal(again, first["ink"]) and "ink" in generator.resident


def test_batches_count_and_rows_with_their_own_adapters_equal_single_draws(drawing):
    _, _, generator = drawing
    two = pixels(generator, request_for(seed=5, count=2))  # seeds 5 and 6 in one pipeline call
    alone = [pixels(generator, request_for(seed=seed))[0] for seed in (5, 6)]
    assert np.abs(two[0] - two[1]).max() > 4  # each row its own seed's noise
    for batched, single in zip(two, alone, strict=True):
        assert np.abs(batched - single).max() <= 2.0  # a batch rounds apart by an 8-bit level at most
    rows = [mix(("ink", 1.0)), (), mix(("moss", 1.0))]
    batched = generator.generate_batch([request_for(adapters=row) for row in rows])
    for row, images in zip(rows, batched, strict=True):
        alone = pixels(generator, request_for(adapters=row))[0]
        assert np.abs(np.asarray(images[0].image, dtype=np.float32) - alone).max() <= 2.0


def test_grids_and_png_parameters(drawing, tmp_path):
    family, model, generator = drawing
    grid = generator.comparison_grid(request_for(adapters=mix(("ink", 1.0))))
    cell = max(128, IMAGE_SIZE)  # small images are scaled up to readable cells
    assert grid.size[0] >= 3 * cell and grid.size[1] >= cell
    image = generator.generate(request_for("a red circle <lora:ink:0.5>", guidance=3.5))[0]
    saved = Image.open(image.save(tmp_path / "one.png"))
    assert saved.text["parameters"] == image.parameters
    assert image.parameters.splitlines() == [
        "a red circle <lora:ink:0.5>",
        f"Steps: 2, Sampler: Euler, CFG scale: 3.5, Seed: 3, Size: {IMAGE_SIZE}x{IMAGE_SIZE}, "
        f"Model: {Path(model).name}, Version: " + image.parameters.split("Version: ")[1],
    ]


def test_cli_generate_uses_the_models_defaults_and_refuses_unet_samplers(
    tiny_flux_model,  # noqa: F811
    tmp_path,
    capsys,
):
    common = ["generate", "--base-model", str(tiny_flux_model), "--adapters-dir", str(tmp_path / "lib")]
    size = ["--width", str(IMAGE_SIZE), "--height", str(IMAGE_SIZE), "--seed", "1"]
    code, out, err = cli(capsys, *common, *size, "--prompt", "a red circle", "--out", str(tmp_path / "a.png"))
    assert code == 0, err
    parameters = Image.open(tmp_path / "a.png").text["parameters"]
    assert "Steps: 28, Sampler: Euler, CFG scale: 3.5," in parameters  # FLUX.1-dev's card
    code, out, err = cli(
        capsys, *common, *size, "--prompt", "x", "--steps", "1", "--scheduler", "DDIM", "--out", "b.png"
    )
    assert code != 0 and "scheduler 'DDIM' does not suit Flux.1" in err and len(err.strip().splitlines()) == 1


def test_a_sampler_left_out_is_the_models_own(drawing, tiny_model, tmp_path, capsys):
    # Python API: a GenerateConfig without a scheduler draws with the model's own sampler, as the CLI
    # does; on the UNet families that stays Euler a.
    _, _, generator = drawing
    left_out = GenerateConfig(prompt="a red circle", seed=3, steps=2, width=IMAGE_SIZE, height=IMAGE_SIZE)
    images = generator.generate(left_out)
    assert "Sampler: Euler," in images[0].parameters
    assert np.array_equal(np.asarray(images[0].image), pixels(generator, request_for())[0])
    unet = Generator(str(tiny_model), AdapterLibrary(tmp_path / "lib"))
    drawn = unet.generate(GenerateConfig(prompt="a red circle", seed=3, steps=2))[0]
    assert "Sampler: Euler a," in drawn.parameters
    assert np.array_equal(
        np.asarray(drawn.image),
        np.asarray(
            unet.generate(GenerateConfig(prompt="a red circle", seed=3, steps=2, scheduler="Euler a"))[
                0
            ].image
        ),
    )
    # CLI: --scheduler auto says the same out loud.
    args = ["generate", "--base-model", str(generator.base_model), "--adapters-dir", str(tmp_path / "lib")]
    size = ["--width", str(IMAGE_SIZE), "--height", str(IMAGE_SIZE), "--steps", "1", "--scheduler", "auto"]
    code, _, err = cli(capsys, *args, *size, "--prompt", "x", "--out", str(tmp_path / "auto.png"))
    assert code == 0, err
    assert "Sampler: Euler," in Image.open(tmp_path / "auto.png").text["parameters"]
