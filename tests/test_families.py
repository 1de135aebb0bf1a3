"""Model families: one home for what differs between SD 1.x, SD 2.x, SDXL and the demo model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from golden_runs import DEMO_MODEL, GOLDEN, RUNS, made_on, train_run

from sdlora.config import LoraSpec
from sdlora.errors import ModelLoadError
from sdlora.models.families import (
    DEFAULT,
    DEMO,
    FAMILIES,
    family_claimed_by,
    family_for_parts,
    family_named,
    family_of,
    family_of_folder,
    family_of_pipeline,
    family_of_single_file,
)
from sdlora.models.families.sd1 import SD1
from sdlora.models.families.sd2 import SD2
from sdlora.models.families.sdxl import SDXL
from sdlora.models.loading import family_and_resolution, load_pipeline
from sdlora.training.presets import PRESETS


@pytest.fixture()
def models(request) -> dict:
    """The model a golden run trains on, built lazily so each run pays only for its own."""
    fixtures = {"tiny-epsilon": "tiny_model", "tiny-v": "tiny_vpred_model", "tiny-sdxl": "tiny_sdxl_model"}
    return lambda name: DEMO_MODEL if name == "demo" else request.getfixturevalue(fixtures[name])


@pytest.mark.parametrize("run", list(RUNS))
def test_training_is_unchanged_by_the_family_seams(run, models, tmp_path):
    """Bit for bit where the golden tensors were made (same CPU kernels, same torch); elsewhere float
    rounding may differ in the last bits, so there only closeness is asserted."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    path = GOLDEN / f"{run}.safetensors"
    golden = load_file(str(path))
    with safe_open(str(path), "pt") as file:
        same_machine = file.metadata() == made_on()
    trained = train_run(run, models(RUNS[run]), tmp_path)
    assert sorted(trained) == sorted(golden)
    same = torch.equal if same_machine else lambda a, b: torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    differing = [key for key in golden if not same(trained[key], golden[key])]
    assert not differing, f"{len(differing)} of {len(golden)} tensors differ, first {differing[0]}"


CONFIGS = Path(__file__).resolve().parents[1] / "sdlora" / "models" / "configs"
# Each shipped config folder (named like modelspec's architecture ids), its family and native size.
SHIPPED = {
    "stable-diffusion-v1": ("sd1", 512, "epsilon"),
    "stable-diffusion-v2-512": ("sd2", 512, "epsilon"),
    "stable-diffusion-v2-768-v": ("sd2", 768, "v_prediction"),
    "stable-diffusion-xl-v1-base": ("sdxl", 1024, "epsilon"),
}


def read_config(folder: str, part: str) -> dict:
    return json.loads((CONFIGS / folder / part / "config.json").read_text())


@pytest.mark.parametrize("folder", list(SHIPPED))
def test_each_family_is_recognised_from_its_configs(folder):
    name, resolution, prediction = SHIPPED[folder]
    unet, vae = read_config(folder, "unet"), read_config(folder, "vae")
    family = family_of(unet)
    assert family is family_named(name)
    assert family.native_resolution(unet, vae) == resolution
    assert family_and_resolution(unet, vae)[:2] == (name, resolution)
    pipeline_class = json.loads((CONFIGS / folder / "model_index.json").read_text())["_class_name"]
    assert pipeline_class in family.pipeline_classes
    assert family.config_folder(prediction) == folder  # single files of this family load with these configs


def test_loaded_models_are_recognised_by_their_denoiser(tiny_model, tiny_sdxl_model):
    assert family_of_pipeline(load_pipeline(str(tiny_model))) is SD1
    assert family_of_pipeline(load_pipeline(str(tiny_sdxl_model))) is SDXL


def test_the_demo_model_is_sd1_in_its_configs_and_known_by_its_marker(tiny_model):
    assert family_of(json.loads((DEMO_MODEL / "unet" / "config.json").read_text())) is SD1
    assert family_of_folder(DEMO_MODEL) is DEMO and DEMO.marks(DEMO_MODEL)
    assert family_of_folder(tiny_model) is None
    # Everything a file or a step sees is SD 1.x's: the demo model's adapters are SD 1.x adapters.
    assert (DEMO.name, DEMO.kohya_version, DEMO.kohya_text_prefixes) == (
        SD1.name,
        SD1.kohya_version,
        SD1.kohya_text_prefixes,
    )
    assert DEMO.preset in PRESETS


@pytest.mark.parametrize(
    ("config", "name", "words"),
    [
        (
            {"_class_name": "SD3Transformer2DModel", "joint_attention_dim": 4096, "sample_size": 128},
            "sd3",
            "SD3.5",
        ),
        ({"joint_attention_dim": 4096, "pos_embed_max_size": 192, "sample_size": 128}, "sd3", "SD3.5"),
        ({"_class_name": "FluxTransformer2DModel", "guidance_embeds": True}, "flux", "Flux.1"),
        ({"num_single_layers": 38, "guidance_embeds": False}, "flux", "Flux.1"),
    ],
)
def test_transformer_families_are_recognised_from_their_configs(config, name, words):
    family = family_of(config)
    assert (family.name, family.words, family.denoiser) == (name, words, "transformer")


@pytest.mark.parametrize(
    "config",
    [
        {"_class_name": "PixArtTransformer2DModel", "sample_size": 128},
        {"_class_name": "HunyuanDiT2DModel", "sample_size": 128},
        {"sample_size": 64},  # a UNet without text conditioning
    ],
)
def test_an_unknown_denoiser_is_refused_in_one_line(config):
    with pytest.raises(ModelLoadError) as caught:
        family_of(config)
    message = str(caught.value)
    assert "\n" not in message and "SD 1.x" in message and "SDXL" in message
    assert config.get("_class_name", "unknown") in message


def test_an_unknown_family_name_is_refused_in_one_line():
    with pytest.raises(ModelLoadError, match="unknown model family 'pixart'.*sd1"):
        family_named("pixart")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_a_family_reads_back_the_ids_it_writes(family):
    assert family_claimed_by({"sdlora.family": family.name}) is family
    assert family_claimed_by({"ss_base_model_version": family.kohya_version}) is family
    assert family_claimed_by({"modelspec.architecture": family.modelspec_architecture}) is family
    assert family_of_single_file(family.single_file_kind) is family


def test_headers_of_other_tools_name_their_family():
    assert family_claimed_by({"ss_v2": "True", "ss_base_model_version": ""}) is SD2
    assert family_claimed_by({"modelspec.architecture": "stable-diffusion-xl-v1-refiner/lora"}) is SDXL
    assert family_claimed_by({"sdlora.family": "pixart", "ss_base_model_version": "sd_v1"}) is SD1
    assert family_claimed_by({"ss_base_model_version": "pixart_sigma"}) is None
    assert family_claimed_by({}) is None


def test_an_adapter_that_names_no_family_is_taken_by_its_parts():
    assert family_for_parts(["unet", "text_encoder"]) is DEFAULT is SD1
    assert family_for_parts(["unet"]) is SD1
    assert family_for_parts(["unet", "text_encoder", "text_encoder_2"]) is SDXL
    assert family_for_parts(["transformer", "text_encoder", "text_encoder_2"]).name == "sd3"
    assert family_for_parts(["transformer", "text_encoder"]).name == "flux"


def test_family_names_are_spelled_only_in_the_family_home():
    """Outside sdlora/models/families the engine asks a family; it never tests a family's name."""
    package = Path(__file__).resolve().parents[1] / "sdlora"
    home = package / "models" / "families"
    spelled = re.compile(r'"(sd1|sd2|sdxl|sd3|flux)"')
    found = [
        f"{path.relative_to(package)}:{number}"
        for path in package.rglob("*.py")
        if home not in path.parents
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if spelled.search(line)
    ]
    assert not found


def test_the_default_lora_targets_are_layers_of_each_familys_denoiser(tiny_model, tiny_sdxl_model):
    for model in (tiny_model, tiny_sdxl_model):
        pipeline = load_pipeline(str(model))
        family = family_of_pipeline(pipeline)
        names = [name for name, _ in getattr(pipeline, family.denoiser).named_modules()]
        for target in family.lora_targets:
            assert any(name.endswith("." + target) for name in names), (family.name, target)
    assert LoraSpec().target_modules == DEFAULT.lora_targets
