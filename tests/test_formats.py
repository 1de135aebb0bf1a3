"""Adapter files: atomic writes and the metadata other tools read."""

from __future__ import annotations

import json

import pytest
import torch

from sdlora import formats
from sdlora.config import LoraSpec
from sdlora.formats import read_metadata, save_adapter


def test_a_crash_while_writing_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    state = {"down_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 4)}
    save_adapter(path, state, LoraSpec(rank=2, alpha=4))
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a fi")
        raise OSError("disk full")

    monkeypatch.setattr(formats, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(path, state, LoraSpec(rank=2, alpha=8))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_header_has_diffusers_alpha_and_kohya_keys(tmp_path):
    path = save_adapter(tmp_path / "b.safetensors", {"x.to_q.lora_A.weight": torch.ones(2, 4)},
                        LoraSpec(rank=2, alpha=3.5), {"ss_network_dim": "2"})
    meta = read_metadata(path)
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == 2 and adapter["unet.lora_alpha"] == 3.5
    assert adapter["unet.target_modules"] == sorted(["to_q", "to_k", "to_v", "to_out.0"])
    assert meta["ss_network_dim"] == "2"
