"""The time-and-memory estimate for SD3.5 (Medium, Large) and Flux.1 (dev, schnell): quantized base,
gradient checkpointing, optimizer, cached text; and the out-of-memory advice naming the quantized base first."""

from __future__ import annotations

import pytest
import torch
from tiny_transformers import tiny_flux_model  # noqa: F401 - fixture

from sdlora.config import DataConfig, LoraSpec, TrainConfig
from sdlora.errors import OutOfMemory
from sdlora.models.families import family_named
from sdlora.models.loading import ModelInfo
from sdlora.training import step as step_module
from sdlora.training.estimate import estimate_training, transformer_memory, transformer_size

FLUX_DEV, SD35_MEDIUM, SD35_LARGE = 11_901_408_320, 2_243_171_520, 8_056_627_520
FLUX = ModelInfo("flux", "flow", 1024, 4096)
SD3 = ModelInfo("sd3", "flow", 1024, 4096)


def at_1024(**changes) -> TrainConfig:
    """A Flux/SD3.5 run as their users start it: 1024 px, batch 1, rank 16."""
    config = TrainConfig(data=DataConfig(images="x", resolution=1024), lora=LoraSpec(rank=16, alpha=16))
    return config.replace(**changes)


def gb(config: TrainConfig, parameters: int = FLUX_DEV, info: ModelInfo = FLUX) -> float:
    return estimate_training(config, parameters, info, "cuda").gpu_memory_gb


def test_the_variant_is_read_from_its_published_config_by_size():
    sd3 = family_named("sd3")
    medium, large = transformer_size(sd3, SD35_MEDIUM), transformer_size(sd3, SD35_LARGE)
    assert (medium.width, medium.blocks) == (1536, 24) and (large.width, large.blocks) == (2432, 38)
    flux = transformer_size(family_named("flux"), FLUX_DEV)
    assert (flux.width, flux.blocks) == (3072, 19 + 38)
    assert gb(at_1024(), SD35_LARGE, SD3) > gb(at_1024(), SD35_MEDIUM, SD3)


def test_a_quantized_base_cuts_the_weights_to_a_half_and_to_about_a_quarter():
    size = transformer_size(family_named("flux"), FLUX_DEV)
    training = {
        kind: transformer_memory(at_1024(quantize_base=kind), size)["training"]
        for kind in ("none", "int8", "nf4")
    }
    weights_gb = FLUX_DEV * 2 / 1e9
    assert training["none"] - training["int8"] == pytest.approx(weights_gb / 2, rel=0.01)
    assert training["none"] - training["nf4"] == pytest.approx(weights_gb * (1 - 0.5625 / 2), rel=0.01)
    # The goal, Flux.1 dev at 1024 px in 16 GB with NF4 and checkpointing: the quantized base goes
    # on the GPU only after T5-XXL (bf16) has cached the captions and left, so neither peak holds both.
    phases = transformer_memory(at_1024(quantize_base="nf4", gradient_checkpointing=True), size)
    assert phases["caching"] <= 16 and phases["training"] <= 16
    assert gb(at_1024(quantize_base="nf4", gradient_checkpointing=True)) == max(phases.values())


def test_checkpointing_the_optimizer_and_the_resolution_move_the_estimate():
    plain = gb(at_1024())
    checkpointed = gb(at_1024(gradient_checkpointing=True))
    assert checkpointed < plain - 10  # Flux's activations at 1024 px are tens of GB
    assert gb(at_1024(gradient_checkpointing=True, optimizer="adamw8bit")) < checkpointed
    assert gb(at_1024(data=DataConfig(images="x", resolution=512))) < plain


def test_caching_the_captions_can_be_the_peak():
    # SD3.5 Medium checkpointed trains in a few GB, but its three text encoders sit on the GPU while
    # captions are cached: in bf16 under bf16 mixed precision (or a quantized base), T5-XXL 19 GB in float32.
    size = transformer_size(family_named("sd3"), SD35_MEDIUM)
    config = at_1024(gradient_checkpointing=True, mixed_precision="no")
    phases = transformer_memory(config, size)
    assert phases["caching"] > phases["training"] and gb(config, SD35_MEDIUM, SD3) == phases["caching"]
    for halved in (config.replace(mixed_precision="bf16"), config.replace(quantize_base="nf4")):
        assert transformer_memory(halved, size)["caching"] < phases["caching"] / 1.5


def test_the_estimate_text_names_the_quantized_base_first_for_the_transformers():
    flux = estimate_training(at_1024(), FLUX_DEV, FLUX, "cuda").text
    assert "(--quantize-base nf4 or --gradient-checkpointing would cut it)" in flux
    sdxl = estimate_training(at_1024(), 2_567_000_000, ModelInfo("sdxl", "epsilon", 1024, 2048), "cuda").text
    assert "quantize" not in sdxl and "(--gradient-checkpointing would cut it)" in sdxl


def test_out_of_memory_advice_names_the_quantized_base_first_for_flux(
    request, concept_dir, tmp_path, monkeypatch
):
    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(step_module, "diffusion_loss", no_memory)
    config = TrainConfig(
        base_model=str(request.getfixturevalue("tiny_flux_model")),
        output_dir=str(tmp_path / "out"),
        steps=1,
        mixed_precision="no",
        final_preview=False,
        data=DataConfig(images=str(concept_dir), resolution=32),
    )
    from sdlora.training.loop import train

    with pytest.raises(
        OutOfMemory, match=r"Try: --quantize-base nf4 \(the frozen base in 4 bits.*; --gradient-checkpointing"
    ):
        train(config)
