"""Training SD3.5 and Flux.1 adapters on tiny models through the same loop as the UNet families, and
using the files it saves (diffusers' own loaders, sdlora's Generator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, cli
from safetensors.torch import load_file, save_file
from tiny_transformers import tiny_flux_model, tiny_sd3_model  # noqa: F401 - fixtures

from sdlora.config import DataConfig, LoraSpec, TrainConfig
from sdlora.errors import AdapterFormatError
from sdlora.events import Started, Step, StopFlag
from sdlora.generation.generate import AdapterWeight, GenerateConfig, Generator
from sdlora.library.formats import read_adapter, read_metadata, write_adapter
from sdlora.library.formats.adapter import Adapter, LoraLayer, ModelLayout
from sdlora.library.store import AdapterLibrary
from sdlora.models.families import family_claimed_by, family_of_pipeline
from sdlora.models.loading import inspect_pipeline, load_pipeline
from sdlora.training.encode import Batch
from sdlora.training.estimate import estimate_training
from sdlora.training.loop import train
from sdlora.training.lora import add_lora, trainable_parameters
from sdlora.training.presets import read_family_and_resolution
from sdlora.training.step import diffusion_loss

FAMILIES = ("sd3", "flux")


@pytest.fixture(params=FAMILIES)
def transformer_model(request) -> Path:
    """The tiny SD3 or Flux.1 diffusers folder."""
    return request.getfixturevalue(f"tiny_{request.param}_model")


@pytest.fixture()
def flux_model(request) -> Path:
    """The tiny Flux.1 dev diffusers folder."""
    return request.getfixturevalue("tiny_flux_model")


@pytest.fixture()
def sd3_model(request) -> Path:
    """The tiny SD3 diffusers folder."""
    return request.getfixturevalue("tiny_sd3_model")


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


def test_the_cli_trains_a_transformer_model(transformer_model, concept_dir, tmp_path, capsys):
    """`sdlora train` in this process (test_cli runs the real `python -m sdlora` process)."""
    command = ["train", "--base-model", str(transformer_model), "--quiet"]
    command += ["--images", str(concept_dir), "--trigger", "sks", "--resolution", str(IMAGE_SIZE)]
    command += ["--steps", "2", "--output", str(tmp_path / "out"), "--name", "cli", "--no-final-preview"]
    code, _, errors = cli(capsys, *command)
    assert code == 0, errors[-2000:]
    header = load_file(str(tmp_path / "out" / "cli.safetensors"))
    assert header and all(k.startswith("lora_unet_") for k in header)  # kohya's names for the transformer


def hand_fused_output(model: Path, adapter, batch: Batch, skip: str = "\0") -> torch.Tensor:
    """The base transformer with each layer's ΔW added by hand (but those under `skip`), no LoRA machinery."""
    pipeline = load_pipeline(str(model))
    modules = dict(pipeline.transformer.named_modules())
    with torch.no_grad():
        for path, layer in adapter.in_part("transformer").items():
            if not path.startswith(skip):
                modules[path].weight += layer.delta().reshape(modules[path].weight.shape)
    return transformer_output(pipeline, batch)


def diffusers_output(model: Path, path: Path, batch: Batch) -> torch.Tensor:
    """The transformer's output after diffusers' own `load_lora_weights` read the file."""
    pipeline = load_pipeline(str(model))
    pipeline.load_lora_weights(str(path), adapter_name="mine")
    return transformer_output(pipeline, batch)


def test_the_saved_adapter_loads_through_diffusers_and_equals_base_plus_delta(transformer_config, tmp_path):
    model = Path(transformer_config.base_model)
    trained = load_pipeline(str(model))
    result = train(transformer_config, pipeline=trained)  # rank 4, alpha 16: scale 4, so a lost alpha shows
    batch = fixed_batch(trained)
    expected = transformer_output(trained, batch)
    adapter = read_adapter(result.adapter_path)  # the library's kohya file, read back
    assert (
        read_metadata(result.adapter_path)["modelspec.architecture"]
        == {
            "flux": "flux-1-dev/lora",  # the tiny Flux has dev's guidance embedding
            "sd3": "stable-diffusion-3-medium/lora",  # no qk_norm: SD3 Medium's layout
        }[adapter.metadata["sdlora.family"]]
    )
    export = write_adapter(
        tmp_path / "export.safetensors", adapter, "diffusers", family=adapter.metadata["sdlora.family"]
    )
    reloaded = diffusers_output(model, export, batch)
    assert not torch.allclose(reloaded, transformer_output(load_pipeline(str(model)), batch), atol=1e-4)
    assert torch.allclose(reloaded, expected, atol=1e-5)
    assert torch.allclose(hand_fused_output(model, adapter, batch), expected, atol=1e-5)


def test_the_flux_kohya_file_loads_through_diffusers_as_base_plus_delta(flux_model, concept_dir, tmp_path):
    config = TrainConfig(
        base_model=str(flux_model),
        output_dir=str(tmp_path / "out"),
        name="kohya",
        steps=4,
        learning_rate=1e-2,
        final_preview=False,
        data=DataConfig(images=str(concept_dir), trigger_word="sks", resolution=IMAGE_SIZE),
        lora=LoraSpec(rank=4, alpha=16.0),
    )
    path = train(config).adapter_path
    # diffusers' kohya-Flux reader assumes Flux.1's real single-block widths (3072): the tiny model's
    # single blocks are left out of the file it reads, and of the sum it is compared with.
    tensors = {k: v for k, v in load_file(str(path)).items() if "single_blocks" not in k}
    double_only = tmp_path / "double.safetensors"
    save_file(tensors, str(double_only), metadata=read_metadata(path))
    batch = fixed_batch(load_pipeline(str(flux_model)))
    reloaded = diffusers_output(flux_model, double_only, batch)
    by_hand = hand_fused_output(flux_model, read_adapter(path), batch, skip="single_transformer_blocks.")
    assert torch.allclose(reloaded, by_hand, atol=1e-5)


def test_generation_with_the_adapter_fused_equals_unfused(transformer_model, concept_dir, tmp_path):
    config = TrainConfig(
        base_model=str(transformer_model),
        output_dir=str(tmp_path / "lib"),
        name="reds",
        steps=5,
        learning_rate=2e-2,
        final_preview=False,
        data=DataConfig(images=str(concept_dir), trigger_word="sks", resolution=IMAGE_SIZE),
        lora=LoraSpec(rank=4, alpha=8.0),
    )
    train(config)
    library = AdapterLibrary(tmp_path / "lib")

    def pixels(generator: Generator, weight: float | None) -> np.ndarray:
        adapters = () if weight is None else (AdapterWeight("reds", weight),)
        request = GenerateConfig(
            prompt="sks",
            seed=5,
            steps=3,
            width=IMAGE_SIZE,
            height=IMAGE_SIZE,
            scheduler="Euler",
            adapters=adapters,
        )
        return np.asarray(generator.generate(request)[0].image, dtype=np.float32)

    generator = Generator(str(transformer_model), library)
    base = pixels(generator, None)
    fused = pixels(generator, 1.0)
    assert generator._fused is not None and not np.array_equal(fused, base)
    unfused = pixels(Generator(str(transformer_model), library, fuse_mixes=False), 1.0)
    assert np.abs(fused - unfused).max() <= 2.0  # within rounding of 8-bit pixels
    assert np.array_equal(pixels(generator, None), base)  # unfused again: the base restored exactly


def one_layer_adapter(layout: ModelLayout, part: str) -> Adapter:
    """A rank-2 adapter on the first attention query of `part` in this layout."""
    key = sorted(k for k in layout.shapes if k.startswith(part + ".") and k.endswith("to_q"))[0]
    out_features, in_features = layout.shapes[key]
    return Adapter({key: LoraLayer(torch.ones(2, in_features), torch.ones(out_features, 2), 2.0)})


def test_an_adapter_of_another_family_is_refused_in_one_line(tiny_model, flux_model, sd3_model, tmp_path):
    sd1 = ModelLayout.of(load_pipeline(str(tiny_model)), "sd1")
    flux = ModelLayout.of(load_pipeline(str(flux_model)), "flux")
    sd3 = ModelLayout.of(load_pipeline(str(sd3_model)), "sd3")
    flux_file = write_adapter(
        tmp_path / "flux.safetensors", one_layer_adapter(flux, "transformer"), family="flux"
    )
    sd1_file = write_adapter(tmp_path / "sd1.safetensors", one_layer_adapter(sd1, "unet"), family="sd1")
    assert read_adapter(flux_file, flux).layers  # its own family reads it
    for path, layout in ((flux_file, sd1), (flux_file, sd3), (sd1_file, flux)):
        with pytest.raises(AdapterFormatError) as caught:
            read_adapter(path, layout)
        message = str(caught.value)
        assert "\n" not in message and path.name in message, message


def test_the_estimate_knows_the_transformer_families(flux_model):
    info = inspect_pipeline(load_pipeline(str(flux_model)))
    config = TrainConfig(
        base_model=str(flux_model),
        data=DataConfig(images=".", resolution=1024),
        lora=LoraSpec(rank=16, alpha=16.0),
        mixed_precision="bf16",
    )
    estimate = estimate_training(config, 11_900_000_000, info, "cuda")
    # SimpleTuner: a Flux.1 rank-16 LoRA at 1024 px needs more than 30 GB with a bf16 base
    assert estimate.gpu_memory_gb > 30 and "Flux.1 at 1024 px" in estimate.text
    checkpointed = estimate_training(
        config.replace(gradient_checkpointing=True), 11_900_000_000, info, "cuda"
    )
    assert checkpointed.gpu_memory_gb < estimate.gpu_memory_gb


def test_the_family_and_native_size_are_read_before_loading(flux_model, sd3_model):
    assert read_family_and_resolution(str(flux_model)) == ("flux", 1024)  # Flux's config has no size
    assert read_family_and_resolution(str(sd3_model)) == ("sd3", IMAGE_SIZE)  # sample size x VAE factor


def test_the_runs_text_length_weighting_and_guidance_reach_the_family(transformer_model):
    pipeline = load_pipeline(str(transformer_model))
    family = family_of_pipeline(pipeline)
    run = family.trained_with(TrainConfig(max_sequence_length=20, weighting_scheme="mode", guidance=1.0))
    cpu = torch.device("cpu")
    default, _ = family.encode_captions(pipeline, ["sks a red circle"], [()], cpu)
    short, _ = run.encode_captions(pipeline, ["sks a red circle"], [()], cpu)
    assert default.shape[1] - short.shape[1] == 77 - 20  # T5's tokens (SD3 puts CLIP's 77 before them)
    assert (
        family.objective(pipeline.scheduler.config, "flow").sampling.weighting_scheme
        == ({"sd3": "logit_normal", "flux": "uniform"}[family.name])
    )
    objective = run.objective(pipeline.scheduler.config, "flow")
    assert objective.sampling.weighting_scheme == "mode"
    batch = fixed_batch(pipeline)
    noised = objective.noised(batch.latents, torch.Generator().manual_seed(1))
    with torch.no_grad():
        at_default = family.call_transformer(pipeline.transformer, noised, batch)
        at_run = run.call_transformer(pipeline.transformer, noised, batch)
    # Flux dev's guidance embedding sees the run's value; SD3 has none
    assert torch.equal(at_default, at_run) == (family.name == "sd3")


def test_sd3_trains_without_t5_when_asked(sd3_model):
    pipeline = load_pipeline(str(sd3_model))
    run = family_of_pipeline(pipeline).trained_with(TrainConfig(drop_t5=True))
    embeddings, _ = run.encode_captions(pipeline, ["sks a red circle"], [()], torch.device("cpu"))
    assert pipeline.text_encoder_3 is None  # let go: its memory is free for the transformer
    assert embeddings[:, 77:].abs().max() == 0 and embeddings[:, :77].abs().max() > 0  # T5's tokens empty


def test_captions_over_the_token_limits_are_reported_naming_the_file(transformer_config, concept_dir):
    # T5 at 12 tokens cuts the long caption; CLIP's 77 cuts the longest; the short one is cut by neither
    (concept_dir / "img0.txt").write_text("sks a red circle on a blue sky " * 2)
    (concept_dir / "img1.txt").write_text("sks a red circle " * 30)
    events = []
    train(transformer_config.replace(steps=1, max_sequence_length=12), on_event=events.append)
    notices = [e for e in events if isinstance(e, Started)][0].notices
    assert len(notices) == 2, notices
    t5_only = next(n for n in notices if n.startswith("img0.txt:"))
    assert "T5 reads 12 tokens, the last" in t5_only and "CLIP" not in t5_only
    both = next(n for n in notices if n.startswith("img1.txt:"))
    pipeline = load_pipeline(transformer_config.base_model)
    clip_tokens = len(pipeline.tokenizer("sks a red circle " * 30).input_ids)
    assert f"CLIP reads 77 tokens, the last {clip_tokens - 77} are dropped" in both and "T5 reads 12" in both


@pytest.mark.parametrize(
    "family,denoiser_config,architecture",
    [
        ("flux", {"guidance_embeds": True}, "flux-1-dev/lora"),
        ("flux", {"guidance_embeds": False}, "flux-1-schnell/lora"),
        ("sd3", {"qk_norm": None, "dual_attention_layers": ()}, "stable-diffusion-3-medium/lora"),
        (
            "sd3",
            {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1, 2)},
            "stable-diffusion-3-5-medium/lora",
        ),
        ("sd3", {"qk_norm": "rms_norm", "dual_attention_layers": ()}, "stable-diffusion-3-5-large/lora"),
    ],
)
def test_the_header_names_the_models_own_modelspec_architecture(family, denoiser_config, architecture):
    from sdlora.library.formats.metadata import training_metadata
    from sdlora.models.loading import ModelInfo

    info = ModelInfo(family, "flow", 1024, 4096)
    config = TrainConfig(data=DataConfig(images="concept"))
    header = training_metadata(config, info, 10, ["sks"], {"sks": 1}, denoiser_config=denoiser_config)
    assert header["modelspec.architecture"] == architecture
    assert family_claimed_by({"modelspec.architecture": architecture}).name == family
