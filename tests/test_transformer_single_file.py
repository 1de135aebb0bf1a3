"""SD3.5 and Flux.1 single files as people download them: recognised from the header's keys, the
transformer read through diffusers' from_single_file and the other parts taken from a diffusers folder,
or refused in one line that names what is missing."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_transformers import tiny_sd3_model  # noqa: F401 - fixture
from transformer_single_files import write_flux_transformer_only, write_sd3_all_in_one

from sdlora.errors import ModelLoadError
from sdlora.models.loading import inspect_pipeline, load_pipeline
from sdlora.models.single_file import inspect_checkpoint
from sdlora.models.transformer_single_file import PARTS_ENV


def refusal(source) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_pipeline(str(source))
    message = str(caught.value)
    assert "\n" not in message and str(source) in message, message
    return message


def test_an_sd35_all_in_one_file_loads_its_transformer_with_the_rest_from_a_diffusers_folder(
    tiny_sd3_model,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    monkeypatch.delenv(PARTS_ENV, raising=False)
    base = load_pipeline(str(tiny_sd3_model))
    alone = write_sd3_all_in_one(base.transformer, tmp_path / "sd3.5_tiny.safetensors", nudge=0.01)
    assert inspect_checkpoint(alone).family == "sd3"
    assert f"set {PARTS_ENV}" in refusal(alone)  # nothing beside it to take the VAE and encoders from
    monkeypatch.setenv(PARTS_ENV, str(tiny_sd3_model))
    pipeline = load_pipeline(str(alone))
    assert inspect_pipeline(pipeline).family == "sd3"
    loaded, folder = pipeline.transformer.state_dict(), base.transformer.state_dict()
    assert loaded.keys() == folder.keys()
    for key, weight in folder.items():  # the file's weights (nudged), not the folder's transformer
        assert torch.allclose(loaded[key], weight + 0.01, atol=1e-6), key
    assert torch.equal(pipeline.vae.decoder.conv_in.weight, base.vae.decoder.conv_in.weight)


def test_a_file_inside_its_diffusers_folder_takes_the_rest_from_there(tiny_sd3_model, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.delenv(PARTS_ENV, raising=False)
    folder = shutil.copytree(tiny_sd3_model, tmp_path / "stable-diffusion-3.5-tiny")
    inside = write_sd3_all_in_one(load_pipeline(str(folder)).transformer, folder / "sd3.5_tiny.safetensors")
    assert inspect_pipeline(load_pipeline(str(inside))).family == "sd3"
    shutil.rmtree(folder / "vae")
    assert "has no vae" in refusal(inside)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_a_bfl_flux_file_is_recognised_and_without_its_folder_refused_in_one_line(
    prefix,
    tiny_sd3_model,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    path = write_flux_transformer_only(tmp_path / "flux1-dev.safetensors", prefix=prefix)
    assert inspect_checkpoint(path).family == "flux"
    monkeypatch.setenv(PARTS_ENV, str(tiny_sd3_model))  # another family's folder does not count
    message = refusal(path)
    assert "holds only the Flux.1 transformer" in message and PARTS_ENV in message
