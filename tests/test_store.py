"""The adapter library: listing, import validation, export formats, safe names."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import unet_output
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from sdlora.errors import AdapterFormatError, SdloraError
from sdlora.library.formats import read_adapter, read_metadata
from sdlora.library.store import AdapterLibrary, reference_from_pipeline, safe_name
from sdlora.models.loading import load_pipeline
from sdlora.training.loop import train


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_model):
    """One adapter trained on the tiny model (alpha != rank, ResNet convolutions adapted too, as the demo
    preset does), shared by this module's tests."""
    from conftest import draw_concept

    from sdlora.config import DataConfig, LoraSpec, TrainConfig

    root = tmp_path_factory.mktemp("store")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        draw_concept(images / f"{i}.png", i)
    config = TrainConfig(
        base_model=str(tiny_model),
        output_dir=str(root / "trained"),
        name="red",
        steps=4,
        learning_rate=5e-3,
        data=DataConfig(images=str(images), trigger_word="sks", resolution=32),
        lora=LoraSpec(rank=4, alpha=2.0, extra_target_modules=("conv1", "conv2")),
    )
    return train(config).adapter_path


@pytest.fixture()
def library(tmp_path, tiny_model):
    return AdapterLibrary(tmp_path / "lib", reference_from_pipeline(load_pipeline(str(tiny_model))))


def test_trained_adapter_is_listed_with_its_facts(trained_adapter):
    listing = AdapterLibrary(trained_adapter.parent).list()
    assert not listing.problems
    (info,) = listing.adapters
    assert (info.name, info.rank, info.alpha, info.steps, info.trigger_words) == ("red", 4, 2.0, 4, ("sks",))
    assert info.family == "sd1" and info.preview is not None and info.preview.is_file()


def test_damaged_entry_is_reported_and_skipped(library, trained_adapter):
    library.import_file(trained_adapter)
    (library.root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    listing = library.list()
    assert [a.name for a in listing.adapters] == ["red"]
    assert len(listing.problems) == 1 and "broken.safetensors" in listing.problems[0]


def test_library_file_is_kohya_with_true_alpha_and_loads_in_diffusers(
    library, trained_adapter, tiny_model, tmp_path
):
    kohya = load_file(str(trained_adapter))  # what training writes into the library
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= kohya.keys()
    assert all(k.startswith("lora_unet_") for k in kohya)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # 3x3 convolutions keep their kernel in lora_down
    assert kohya[f"{conv}.lora_down.weight"].shape[2:] == (3, 3) and kohya[f"{conv}.lora_up.weight"].ndim == 4
    assert all(v.item() == 2.0 for k, v in kohya.items() if k.endswith(".alpha"))  # true alpha, not the rank
    assert read_metadata(trained_adapter)["ss_network_alpha"] == "2.0"

    library.import_file(trained_adapter)
    diffusers_path = library.export("red", "diffusers", tmp_path / "d")
    assert all(k.startswith("unet.") and ".lora_" in k for k in load_file(str(diffusers_path)))
    outputs = []
    for path in (trained_adapter, diffusers_path):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
        pipe.load_lora_weights(str(path))
        outputs.append(unet_output(pipe.unet))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)

    reimported = library.import_file(diffusers_path, name="red-from-diffusers")
    assert all(k.startswith("lora_unet_") for k in load_file(str(reimported.path)))  # converted on the way in
    original, again = read_adapter(trained_adapter), read_adapter(reimported.path)
    assert original.layers.keys() == again.layers.keys()
    for key, layer in original.layers.items():
        assert torch.equal(layer.down, again.layers[key].down) and torch.equal(layer.up, again.layers[key].up)
        assert layer.alpha == again.layers[key].alpha == 2.0


def _write_pickle(path):
    torch.save({"lora_A": torch.zeros(2)}, path)


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("corrupt.safetensors", lambda p: p.write_bytes(b"\x00" * 3), "empty or too short"),
        ("empty.safetensors", lambda p: p.write_bytes(b""), "empty or too short"),
        ("huge.safetensors", lambda p: p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}"), "header claims"),
        (
            "lying.safetensors",
            lambda p: p.write_bytes(_lying_header()),
            "claims a size the file does not hold",
        ),
        ("model.ckpt", _write_pickle, "only .safetensors"),
        ("sneaky.safetensors", _write_pickle, "pickled"),
        (
            "notlora.safetensors",
            lambda p: save_file({"conv.weight": torch.zeros(2, 2)}, str(p)),
            "not a LoRA",
        ),
    ],
)
def test_bad_files_are_refused_by_name_and_library_unchanged(
    library, trained_adapter, tmp_path, name, make, message
):
    library.import_file(trained_adapter)
    before = sorted(p.name for p in library.root.iterdir())
    bad = tmp_path / name
    make(bad)
    with pytest.raises(AdapterFormatError, match=message) as excinfo:
        library.import_file(bad)
    assert name in str(excinfo.value)
    assert sorted(p.name for p in library.root.iterdir()) == before


def _lying_header() -> bytes:
    header = json.dumps(
        {"x.lora_A.weight": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 16]}}
    )
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + b"\x00" * 16


def test_wrong_architecture_and_wrong_shape_are_refused(library, trained_adapter, tmp_path):
    tensors = load_file(str(trained_adapter))
    wrong_shape = {
        k: (torch.zeros(v.shape[0], v.shape[1] + 1) if k.endswith("attn2_to_k.lora_down.weight") else v)
        for k, v in tensors.items()
    }
    save_file(wrong_shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(AdapterFormatError, match="shape.safetensors.*different base model"):
        library.import_file(tmp_path / "shape.safetensors")
    sdxl = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(4.0),
    }
    save_file(sdxl, str(tmp_path / "xl.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(AdapterFormatError, match="xl.safetensors was made for sdxl"):
        library.import_file(tmp_path / "xl.safetensors")
    assert not library.root.exists() or not list(library.root.glob("*.safetensors"))


@pytest.mark.parametrize("wanted", ["../evil", "a/b", "..", "/etc/passwd", "x\\..\\y", ".hidden"])
def test_names_cannot_leave_the_library(library, trained_adapter, wanted):
    try:
        info = library.import_file(trained_adapter, name=wanted)
    except SdloraError:
        return
    assert info.path.parent.resolve() == library.root.resolve()
    assert "/" not in info.name and not info.name.startswith(".")


def test_no_silent_overwrite_and_rename_delete(library, trained_adapter):
    first = library.import_file(trained_adapter)
    second = library.import_file(trained_adapter)
    assert (first.name, second.name) == ("red", "red-2")
    with pytest.raises(SdloraError, match="already exists"):
        library.rename("red-2", "red")
    renamed = library.rename("red-2", "blue")
    assert renamed.name == "blue" and not (library.root / "red-2.safetensors").exists()
    library.delete("blue")
    assert [a.name for a in library.list().adapters] == ["red"]


def test_user_metadata_is_written_into_the_header(library, trained_adapter):
    library.import_file(trained_adapter)
    info = library.update_info(
        "red",
        title="Red things",
        author="me",
        license="CC-BY-4.0",
        tags=["shapes", "red"],
        trigger_words=["sks", "ohwx"],
    )
    assert (info.title, info.author, info.tags, info.trigger_words) == (
        "Red things",
        "me",
        ("shapes", "red"),
        ("sks", "ohwx"),
    )
    meta = read_metadata(info.path)
    assert meta["modelspec.title"] == "Red things" and meta["modelspec.license"] == "CC-BY-4.0"
    assert meta["ss_network_dim"] == "4"  # training metadata kept
    with pytest.raises(SdloraError, match="unknown adapter field"):
        library.update_info("red", colour="red")


def test_safe_name():
    assert safe_name("my lora.safetensors") == "my lora"
    with pytest.raises(SdloraError, match="plain file name"):
        safe_name("../../x")  # refused, never mapped to another adapter's name
