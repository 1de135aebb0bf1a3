"""Extract (a LoRA from two full models) and Bake (a mix fused into a full model), engine and CLI.

The single-file layout is checked against what AUTOMATIC1111's and ComfyUI's checkpoint loaders
look for (their rules in our words, in `test_single_file_keys_follow_the_original_layout`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from tiny_models import build_tiny_pipeline

from sdlora.errors import ConfigError, ModelLoadError, SdloraError
from sdlora.generation.generate import AdapterWeight, GenerateConfig, Generator
from sdlora.library.store import AdapterLibrary
from sdlora.library.tools.extract import extract, extract_into_library, factor, target_modules

KNOWN_RANK = 2
FUSE_TOLERANCE = (
    2.0  # 8-bit pixel levels, as tests/test_generate.py allows a fused mix against an unfused one
)


def low_rank_deltas(pipeline, seed: int) -> dict[str, torch.Tensor]:
    """A random rank-2 ΔW added to every other target layer of the UNet and the text encoder."""
    generator, deltas = torch.Generator().manual_seed(seed), {}
    with torch.no_grad():
        for part in ("unet", "text_encoder"):
            for i, (path, module) in enumerate(target_modules(getattr(pipeline, part), part).items()):
                if i % 2:
                    continue
                rows, columns = module.weight.shape[0], module.weight[0].numel()
                delta = torch.randn(rows, KNOWN_RANK, generator=generator) @ torch.randn(
                    KNOWN_RANK, columns, generator=generator
                )
                delta = (0.02 * delta).reshape(module.weight.shape)
                module.weight += delta
                deltas[f"{part}.{path}"] = delta
    return deltas


@pytest.fixture(scope="module")
def low_rank_pair(tmp_path_factory, tiny_model):
    """The tiny base plus a known rank-2 ΔW on half its target layers, saved as a diffusers folder."""
    pipeline = build_tiny_pipeline()  # the same seed as tiny_model: the same weights
    deltas = low_rank_deltas(pipeline, seed=3)
    folder = tmp_path_factory.mktemp("extract") / "tuned-low-rank"
    pipeline.save_pretrained(folder)
    return folder, deltas


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory, tiny_model):
    """The tiny base after a few real Adam steps of full fine-tuning of every UNet layer a LoRA can adapt."""
    pipeline = build_tiny_pipeline()
    unet = pipeline.unet
    weights = [module.weight for module in target_modules(unet, "unet").values()]
    unet.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        sample = torch.randn(2, 4, 16, 16, generator=generator)
        context = torch.randn(2, 8, 32, generator=generator)
        loss = torch.nn.functional.mse_loss(
            unet(sample, torch.tensor([100, 700]), encoder_hidden_states=context).sample,
            torch.zeros_like(sample),
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("extract") / "tuned-trained"
    pipeline.save_pretrained(folder)
    return folder


def pixels(generator: Generator, *adapters: tuple[str, float]) -> np.ndarray:
    mix = tuple(AdapterWeight(n, w) for n, w in adapters)
    config = GenerateConfig(prompt="sks, a red circle", seed=5, steps=3, adapters=mix)
    return np.asarray(generator.generate(config)[0].image, dtype=np.float32)


def drawn(pipeline) -> np.ndarray:
    """What generate draws, for a pipeline that is not a Generator's (a loaded single file)."""
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "sks, a red circle",
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).images[0]
    return image * 255


def test_extract_reproduces_a_known_low_rank_difference(tiny_model, low_rank_pair):
    tuned, deltas = low_rank_pair
    adapter, report = extract(str(tiny_model), str(tuned), rank=KNOWN_RANK + 2)
    assert set(adapter.layers) == set(deltas)  # unchanged layers are left out...
    assert len(report.unchanged) > 0 and len(report.unchanged) + len(report.layers) == 2 * len(deltas) - 1
    for key, delta in deltas.items():  # ...and the changed ones reproduced
        error = (adapter.layers[key].delta() - delta).norm() / delta.norm()
        assert error < 1e-4, key
    assert report.retained == pytest.approx(1.0, abs=1e-6)
    assert "left out as unchanged" in report.lines()[-1]


def test_extract_to_a_kept_fraction_takes_the_smallest_rank_that_keeps_it(tiny_model, trained_pair):
    adapter, report = extract(str(tiny_model), str(trained_pair), keep=0.9)
    tuned = StableDiffusionPipeline.from_pretrained(str(trained_pair)).unet
    base = StableDiffusionPipeline.from_pretrained(str(tiny_model)).unet
    figure = max(report.layers, key=lambda f: f.rank)
    path = figure.key.removeprefix("unet.")
    delta = tuned.get_submodule(path).weight - base.get_submodule(path).weight
    s = torch.linalg.svdvals(delta.detach().flatten(1)).double()
    kept = lambda k: float(s[:k].square().sum().sqrt() / s.square().sum().sqrt())  # noqa: E731
    assert kept(figure.rank) >= 0.9 > kept(figure.rank - 1)
    assert figure.retained == pytest.approx(kept(figure.rank), rel=1e-5)
    assert adapter.layers[figure.key].rank == figure.rank


@pytest.fixture(scope="module")
def extracted_library(tmp_path_factory, tiny_model, low_rank_pair, trained_pair):
    """A library holding the extracts of both pairs, at a rank >= each difference's."""
    library = AdapterLibrary(tmp_path_factory.mktemp("extract-lib"))
    extract_into_library(library, "low-rank", str(tiny_model), str(low_rank_pair[0]), rank=KNOWN_RANK)
    extract_into_library(library, "trained", str(tiny_model), str(trained_pair), rank=64)  # full rank
    return library


@pytest.fixture(scope="module")
def base_generator(tiny_model, extracted_library):
    """One resident base over the extracts' library, shared by the image tests."""
    return Generator(str(tiny_model), extracted_library)


@pytest.mark.parametrize("name", ["low-rank", "trained"])
def test_extracted_adapter_draws_the_fine_tuned_models_image(
    low_rank_pair, trained_pair, extracted_library, base_generator, name
):
    tuned = {"low-rank": low_rank_pair[0], "trained": trained_pair}[name]
    with_adapter = pixels(base_generator, (name, 1.0))
    fine_tuned = pixels(Generator(str(tuned), AdapterLibrary(extracted_library.root / "none")))
    assert np.abs(fine_tuned - pixels(base_generator)).max() > 10 * FUSE_TOLERANCE  # the tuning shows
    assert np.abs(with_adapter - fine_tuned).max() <= FUSE_TOLERANCE


def test_extracted_adapter_is_a_normal_library_adapter(extracted_library):
    info = extracted_library.get("trained")
    assert info.family == "sd1"
    with safe_open(str(info.path), framework="pt") as file:
        keys = list(file.keys())
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert any(".lora_down." in k for k in keys) and any(k.endswith(".alpha") for k in keys)


def test_extract_refuses_another_architecture_and_a_bad_rule(tiny_model, tiny_sdxl_model, tmp_path):
    with pytest.raises(ModelLoadError, match="extract needs a fine-tuned model and its own base") as caught:
        extract(str(tiny_model), str(tiny_sdxl_model), rank=4)
    assert "\n" not in str(caught.value)
    for rule in ({"rank": 0}, {"keep": 1.5}, {}, {"rank": 4, "keep": 0.9}):
        with pytest.raises(ConfigError):
            extract(str(tiny_model), str(tiny_model), **rule)
    with pytest.raises(SdloraError, match="does not differ"):
        extract_into_library(AdapterLibrary(tmp_path), "same", str(tiny_model), str(tiny_model), rank=4)


def test_factor_keeps_convolution_shapes():
    delta = torch.randn(8, 4, 3, 3)
    layer, kept, whole = factor(delta, rank=50, keep=None)  # above the full rank, 8: cut to it
    assert layer.down.shape == (8, 4, 3, 3) and layer.up.shape == (8, 8, 1, 1)
    assert torch.allclose(layer.delta(), delta, atol=1e-5) and kept == pytest.approx(whole)
