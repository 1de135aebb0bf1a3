"""Caching the captions is not the memory peak: the text encoders go on the device (in bf16 under bf16
mixed precision), encode, leave it, and only then does the denoiser go on the device.

This CPU has no GPU, so a spy stands in for one: moving a pipeline part to "cuda" is recorded, not done,
and tensors sent to "cuda" stay on the CPU. A forward hook on each text encoder reads where every part
is at the moment captions are encoded.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import IMAGE_SIZE
from tiny_transformers import tiny_flux_model  # noqa: F401 - fixture

from sdlora.config import DataConfig, LoraSpec, TrainConfig
from sdlora.training import loop

GPU = torch.device("cuda")
PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
TEXT = ("text_encoder", "text_encoder_2")


def _is_gpu(value) -> bool:
    return (isinstance(value, torch.device) and value.type == "cuda") or value == "cuda"


class Placement:
    """Where each pipeline part is, as the code under test moved it; dtype changes are really done."""

    def __init__(self, pipeline, monkeypatch, denoiser_on_gpu: bool):
        self.where = {part: "cpu" for part in PARTS}
        self.where["transformer"] = "cuda" if denoiser_on_gpu else "cpu"
        self.at_encode: list[dict] = []
        for part in PARTS:
            module = getattr(pipeline, part)
            monkeypatch.setattr(module, "to", self._spy(part, module, module.to), raising=False)
        for part in TEXT:
            getattr(pipeline, part).register_forward_pre_hook(self._snapshot(part))
        real_to = torch.Tensor.to

        def tensor_to(tensor, *args, **kwargs):
            args = tuple(torch.device("cpu") if _is_gpu(a) else a for a in args)
            if _is_gpu(kwargs.get("device")):
                kwargs["device"] = torch.device("cpu")
            return real_to(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", tensor_to)

    def _spy(self, part, module, real_to):
        def to(*args, **kwargs):
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
            if device is not None:
                self.where[part] = device.type
            if dtype is not None:
                real_to(dtype=dtype)
            return module

        return to

    def _snapshot(self, part):
        def hook(module, args):
            self.at_encode.append({"encoder": part, "dtype": module.dtype, **self.where})

        return hook


@pytest.fixture()
def prepared(tiny_flux_model, concept_dir, tmp_path):  # noqa: F811 - the fixture imported above
    """The tiny Flux run prepared as on a GPU with bf16 mixed precision (a stand-in accelerator)."""
    config = TrainConfig(
        base_model=str(tiny_flux_model),
        output_dir=str(tmp_path / "out"),
        name="tiny",
        steps=1,
        mixed_precision="no",
        final_preview=False,
        data=DataConfig(images=str(concept_dir), resolution=IMAGE_SIZE),
        lora=LoraSpec(rank=4, alpha=4.0),
    )
    ready = loop._prepare(config, None, None)
    gpu = SimpleNamespace(device=GPU, mixed_precision="bf16")
    return config, dataclasses.replace(ready, accelerator=gpu)


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16 base", "quantized base"])
def test_captions_are_encoded_before_the_denoiser_goes_on_the_device(prepared, monkeypatch, quantized):
    config, ready = prepared
    denoiser = ready.pipeline.transformer
    # A quantized base is put on the GPU by bitsandbytes as it loads.
    monkeypatch.setattr(loop, "is_quantized", lambda model: quantized and model is denoiser)
    placement = Placement(ready.pipeline, monkeypatch, denoiser_on_gpu=quantized)

    encoded, _ = loop._encode_and_cache(config, ready)

    assert len(encoded) == 4 and {snap["encoder"] for snap in placement.at_encode} == set(TEXT)
    for snap in placement.at_encode:
        assert snap["transformer"] == "cpu", snap  # the denoiser is not on the device beside the encoders
        assert snap[snap["encoder"]] == "cuda" and snap["dtype"] == torch.bfloat16, snap
    assert encoded.embeddings.dtype == torch.float32  # the cache itself is float32
    assert all(placement.where[part] == "cpu" for part in ("vae", *TEXT))  # encoders off the device
    assert placement.where["transformer"] == "cpu"

    loop._denoiser_to_device(ready)
    assert placement.where["transformer"] == "cuda"
    assert denoiser.dtype == (torch.float32 if quantized else torch.bfloat16)
