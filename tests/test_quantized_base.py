"""A quantized frozen base (quantize_base int8 / nf4, bitsandbytes through diffusers), and gradient
checkpointing on the transformer families.

This machine has no GPU, so diffusers' loader stops at its refusal: the tests cover everything up
to that line (the setting, the one-line message at each door) and, with the same bitsandbytes layers
placed by diffusers' replace_with_bnb_linear, that peft's LoRA over them trains.
"""

from __future__ import annotations

import pytest
import torch
from tiny_transformers import tiny_flux_model, tiny_sd3_model  # noqa: F401 - fixtures

from sdlora.config import DataConfig, LoraSpec, TrainConfig
from sdlora.errors import ConfigError
from sdlora.models.families import family_named
from sdlora.models.loading import load_pipeline, quantized_denoiser
from sdlora.settings import train_config_from
from sdlora.training.encode import Batch
from sdlora.training.lora import add_lora, trainable_parameters
from sdlora.training.step import diffusion_loss

NO_GPU = (
    "quantize_base=nf4 needs a CUDA GPU (bitsandbytes via diffusers); use quantize_base=none on this machine"
)
needs_cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the refusal is for machines without CUDA"
)


def transformer_and_objective(folder, family_name: str):
    """The tiny model's transformer (float32) and its family's flow-matching objective."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = family_named(family_name)
    model_class = "FluxTransformer2DModel" if family_name == "flux" else "SD3Transformer2DModel"
    import diffusers

    transformer = getattr(diffusers, model_class).from_pretrained(folder / "transformer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    return transformer, family, family.objective(scheduler.config, "flow")


def random_batch(transformer, seed: int = 0) -> Batch:
    """Random 16x16 latents and text conditioning shaped as the tiny models' cache holds them."""
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    latents = torch.randn(2, 16, 16, 16, generator=g)
    embeddings = torch.randn(2, 12, config.joint_attention_dim, generator=g)
    return Batch(latents, embeddings, {"pooled": torch.randn(2, config.pooled_projection_dim, generator=g)})


# -- the setting and where it is refused ------------------------------------------------------


def test_quantize_base_is_a_setting_checked_by_name():
    assert TrainConfig().quantize_base == "none"
    config = TrainConfig.from_dict({"quantize_base": "nf4", "data": {"images": "x"}})
    config.validate()
    with pytest.raises(ConfigError, match=r"^quantize_base must be one of none, int8, nf4, got 'int4'$"):
        config.replace(quantize_base="int4").validate()
    with pytest.raises(
        ConfigError, match=r"^quantize_base=int8 computes in bf16: use mixed_precision auto or bf16"
    ):
        config.replace(quantize_base="int8", mixed_precision="fp16").validate()


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_the_denoiser_alone_is_loaded_through_bitsandbytes_config(kind):
    extra = quantized_denoiser(kind, "transformer", torch.float32)
    quantization = extra["quantization_config"].quant_mapping
    assert list(quantization) == ["transformer"]  # only the trained model: text encoders leave after caching
    config = quantization["transformer"]
    assert (config.load_in_8bit, config.load_in_4bit) == ((True, False) if kind == "int8" else (False, True))
    if kind == "nf4":
        assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert extra["dtype"] == {"transformer": torch.bfloat16, "vae": torch.float32, "default": torch.bfloat16}


@needs_cpu_only
def test_loading_a_quantized_base_without_a_gpu_stops_at_diffusers_refusal_in_one_line(request):
    flux = request.getfixturevalue("tiny_flux_model")
    with pytest.raises(ConfigError) as refused:
        load_pipeline(str(flux), quantize_base="nf4")
    assert str(refused.value) == NO_GPU
    assert isinstance(refused.value.__context__, RuntimeError)  # diffusers' own "No GPU found", caught
    with pytest.raises(ConfigError, match="not single files like model.safetensors"):
        load_pipeline(str(flux / "model.safetensors"), quantize_base="int8")
    # Up to that line the arguments are diffusers' own: the dtypes alone load as meant
    from diffusers import FluxPipeline

    dtypes = quantized_denoiser("nf4", "transformer", torch.float32)["dtype"]
    pipeline = FluxPipeline.from_pretrained(flux, dtype=dtypes)
    loaded = [pipeline.transformer, pipeline.text_encoder, pipeline.text_encoder_2, pipeline.vae]
    assert [m.dtype for m in loaded] == [torch.bfloat16] * 3 + [torch.float32]


@needs_cpu_only
def test_a_quantized_base_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    config = TrainConfig(
        base_model=str(tmp_path / "absent"),
        output_dir=str(tmp_path / "out"),
        quantize_base="nf4",
        data=DataConfig(images=str(tmp_path)),
    )
    monkeypatch.setattr("sdlora.training.loop.load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    from sdlora.training.loop import train

    with pytest.raises(ConfigError, match=f"^{NO_GPU}$".replace("(", r"\(").replace(")", r"\)")):
        train(config)
    # The one road (CLI, Train tab, /train, queue add) knows it too where torch is already loaded, as in the app
    with pytest.raises(ConfigError) as refused:
        train_config_from({"quantize_base": "nf4", "data": {"images": str(tmp_path)}}, base_model="x")
    assert str(refused.value) == NO_GPU


# -- LoRA over a quantized base trains (bitsandbytes layers on this CPU) ------------------------


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_lora_over_bitsandbytes_layers_trains_one_step_changing_only_lora_tensors(request, kind):
    pytest.importorskip("bitsandbytes")
    flux = request.getfixturevalue("tiny_flux_model")
    from peft.tuners.lora import bnb as peft_bnb
    from quantized_layers import quantize_linear_layers

    transformer, family, objective = transformer_and_objective(flux, "flux")
    transformer = quantize_linear_layers(transformer, kind)
    add_lora(transformer, LoraSpec(rank=4, alpha=4), family.lora_targets, seed=0)
    wrapper = peft_bnb.Linear8bitLt if kind == "int8" else peft_bnb.Linear4bit
    assert isinstance(transformer.transformer_blocks[0].attn.to_q, wrapper)
    before = {name: t.detach().clone() for name, t in transformer.state_dict().items()}
    optimizer = torch.optim.AdamW(trainable_parameters(transformer), lr=1e-2)
    loss = diffusion_loss(transformer, objective, random_batch(transformer), torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in trainable_parameters(transformer)]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    optimizer.step()
    changed = {name for name, t in transformer.state_dict().items() if not torch.equal(t, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)  # B starts at zero: the step moved it
    assert all(p.dtype == torch.float32 for p in trainable_parameters(transformer))


# -- gradient checkpointing on the transformers ----------------------------------------------


@pytest.mark.parametrize("family_name", ["sd3", "flux"])
def test_gradient_checkpointing_gives_the_same_step_on_the_transformers(request, family_name):
    folder = request.getfixturevalue(f"tiny_{family_name}_model")
    transformer, family, objective = transformer_and_objective(folder, family_name)
    add_lora(transformer, LoraSpec(rank=4, alpha=4), family.lora_targets, seed=0)
    for p in trainable_parameters(transformer):  # B non-zero, so every LoRA tensor gets a gradient
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(p.numel()))
    transformer.train()
    block_calls = []
    transformer.transformer_blocks[0].register_forward_pre_hook(lambda *args: block_calls.append(1))

    def step() -> tuple[float, list[torch.Tensor]]:
        transformer.zero_grad(set_to_none=True)
        block_calls.clear()
        batch = random_batch(transformer)
        loss = diffusion_loss(transformer, objective, batch, torch.Generator().manual_seed(3))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in trainable_parameters(transformer)]

    loss, grads = step()
    assert block_calls == [1]
    transformer.enable_gradient_checkpointing()
    checkpointed_loss, checkpointed_grads = step()
    assert block_calls == [1, 1]  # the block ran again in the backward pass: checkpointing is on
    assert checkpointed_loss == pytest.approx(loss, abs=1e-5)
    for g, c in zip(grads, checkpointed_grads, strict=True):
        torch.testing.assert_close(c, g, atol=1e-5, rtol=0)
