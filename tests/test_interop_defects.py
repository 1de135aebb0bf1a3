"""The four defects the interop run of issue #21 found, each shown by what a user does with the files.

(a) an imported LoHa/LoKr exported again must have each base layer's shape (1x1 convolutions stay 4-D);
(b) `adapters export` follows --base-model (original-SD names on a base laid out unlike SD 1.5);
(c) a PEFT file without its adapter_config.json is refused in one line naming it, or takes a given alpha;
(d) files from diffusers' writer and ComfyUI files are listed with their alpha, not "alpha None".
"""

from __future__ import annotations

import foreign_formats as ff
import pytest
import torch
from conftest import cli
from safetensors.torch import load_file

from sdlora.errors import AdapterFormatError
from sdlora.library.formats import read_adapter
from sdlora.library.store import AdapterLibrary, reference_from_pipeline
from sdlora.models.loading import load_pipeline

UP_ATTENTION = {0, 1}  # the tiny model: both levels have attention, one ResNet each


@pytest.fixture(scope="module")
def base(tiny_model):
    pipeline = load_pipeline(str(tiny_model))
    return pipeline, reference_from_pipeline(pipeline)


@pytest.fixture(scope="module")
def layers(base):
    """A few layers of the tiny model at an alpha other than their rank: attention, 1x1 proj_in, a 3x3 conv."""
    g = torch.Generator().manual_seed(5)
    chosen = {}
    for key, shape in base[1].shapes.items():
        deep = key.startswith(("unet.down_blocks.0.", "unet.up_blocks.1."))  # level 1: numbered unlike SD 1.5
        if deep and key.endswith(("attn1.to_q", "proj_in", "resnets.0.conv1")):
            flat_in = int(torch.tensor(shape[1:]).prod())
            down = torch.randn(4, flat_in, generator=g).reshape(4, *shape[1:]) * 0.1
            up = torch.randn(shape[0], 4, generator=g).reshape(
                shape[0], 4, *([1, 1] if len(shape) == 4 else [])
            )
            chosen[key] = (down, up * 0.1, 2.0)
    assert any(len(shape) == 4 and shape[2] == 1 for k, shape in base[1].shapes.items() if k in chosen)
    return chosen


def delta(down, up, alpha):
    return (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))


@pytest.mark.parametrize("algorithm", ["LoHa", "LoKr"])
def test_exported_lycoris_layers_have_the_base_layer_shapes(algorithm, base, tiny_model, tmp_path, capsys):
    shapes = {
        k: s
        for k, s in base[1].shapes.items()
        if k.startswith("unet.") and k.endswith(("proj_in", "proj_out"))
    }
    make = ff.lokr_layers if algorithm == "LoKr" else ff.loha_layers
    tensors, deltas = make(shapes, rank=2, seed=3) if algorithm == "LoKr" else make(shapes, 2, 3, False)
    assert any(t.ndim == 2 for k, t in tensors.items() if "proj_in" in k)  # LyCORIS stores 1x1 convs flat
    source = ff.save(tmp_path / f"{algorithm}.safetensors", tensors)
    lib = ["--adapters-dir", str(tmp_path / "lib"), "--base-model", str(tiny_model)]
    assert cli(capsys, "adapters", *lib, "import", str(source), "--name", "lyco")[0] == 0
    out = tmp_path / "out.safetensors"
    assert cli(capsys, "adapters", "export", "lyco", "--out", str(out), *lib)[0] == 0
    exported = load_file(str(out))
    for key, shape in shapes.items():
        stem = "lora_unet_" + key.split(".", 1)[1].replace(".", "_")
        down, up = exported[f"{stem}.lora_down.weight"], exported[f"{stem}.lora_up.weight"]
        assert down.shape[1:] == shape[1:] and up.shape[0] == shape[0] and up.ndim == len(shape), key
        rank = down.shape[0]
        scale = exported[f"{stem}.alpha"].item() / rank
        assert torch.allclose(scale * (up.flatten(1) @ down.flatten(1)), deltas[key].flatten(1), atol=1e-5)
    # A new adapter made from it (block weights applied) is written with the base's shapes too.
    assert cli(capsys, "adapters", *lib, "block-weights", "lyco", "--lbw", "ALL", "--as", "lyco-all")[0] == 0
    made = load_file(str(tmp_path / "lib" / "lyco-all.safetensors"))
    downs = {k: t for k, t in made.items() if k.endswith("lora_down.weight")}
    assert downs and all(t.ndim == 4 for t in downs.values())


def test_a_library_that_cannot_tell_a_lycoris_shape_refuses_to_export(base, tiny_model, tmp_path):
    shapes = {k: s for k, s in base[1].shapes.items() if k.endswith("proj_in")}
    tensors, _ = ff.loha_layers(shapes, 2, 3, False)
    library = AdapterLibrary(tmp_path / "lib", base[1])
    library.import_file(ff.save(tmp_path / "loha.safetensors", tensors), name="loha")
    blind = AdapterLibrary(tmp_path / "lib")  # no base model known
    with pytest.raises(AdapterFormatError, match=r"^loha\.safetensors: .*base model") as refused:
        blind.export("loha", "kohya", tmp_path / "out")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_export_follows_base_model_for_original_sd_names(base, layers, tiny_model, tmp_path, capsys):
    source = ff.save(
        tmp_path / "ldm.safetensors", ff.kohya(layers, lambda p: ff.ldm_path(p, 1, UP_ATTENTION))
    )
    lib = ["--adapters-dir", str(tmp_path / "lib"), "--base-model", str(tiny_model)]
    assert cli(capsys, "adapters", *lib, "import", str(source), "--name", "ldm")[0] == 0
    for fmt in ("kohya", "diffusers"):
        out = tmp_path / f"{fmt}.safetensors"
        code, _, err = cli(capsys, "adapters", *lib, "export", "ldm", "--format", fmt, "--out", str(out))
        assert code == 0, err
        exported = read_adapter(out, base[1])
        assert set(exported.layers) == set(layers)
        for key, (down, up, alpha) in layers.items():
            assert torch.allclose(exported.layers[key].delta().flatten(1), delta(down, up, alpha), atol=1e-5)


def test_peft_file_without_its_config_is_refused_or_takes_the_given_alpha(
    base, layers, tiny_model, tmp_path, capsys
):
    unet_layers = {k: v for k, v in layers.items() if not k.endswith("conv1")}
    source = ff.peft_save_pretrained(base[0].unet, unet_layers, tmp_path / "peft")
    (tmp_path / "peft" / "adapter_config.json").unlink()
    library = AdapterLibrary(tmp_path / "lib", base[1])
    with pytest.raises(
        AdapterFormatError, match=r"^adapter_model\.safetensors: .*adapter_config\.json"
    ) as no:
        library.import_file(source, name="peft")
    assert "\n" not in str(no.value) and not list((tmp_path / "lib").glob("*.safetensors"))
    lib = ["--adapters-dir", str(tmp_path / "lib"), "--base-model", str(tiny_model)]
    code, out, err = cli(capsys, "adapters", *lib, "import", str(source), "--name", "peft", "--alpha", "2")
    assert code == 0, err
    imported = library.read("peft")
    for key, (down, up, alpha) in unet_layers.items():
        assert imported.layers[key].alpha == 2.0
        assert torch.allclose(imported.layers[key].delta().flatten(1), delta(down, up, alpha), atol=1e-5)


def test_diffusers_and_comfyui_files_are_listed_with_their_alpha(base, layers, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    library = AdapterLibrary(tmp_path / "lib", base[1])
    unet_layers = {k: v for k, v in layers.items() if not k.endswith("conv1")}
    diffusers_file = ff.diffusers_save(StableDiffusionPipeline, unet_layers, tmp_path / "d", old_keys=False)
    comfy_file = ff.save(tmp_path / "comfy.safetensors", ff.comfyui(layers, 1, UP_ATTENTION))
    library.import_file(diffusers_file, name="from-diffusers")
    library.import_file(comfy_file, name="from-comfyui")
    (tmp_path / "lib" / "dropped-in.safetensors").write_bytes(diffusers_file.read_bytes())  # not imported
    listed = {a.name: a.alpha for a in library.list(whole=False).adapters}
    assert listed == {"from-diffusers": 2.0, "from-comfyui": 2.0, "dropped-in": 2.0}
    code, out, _ = cli(capsys, "adapters", "--adapters-dir", str(tmp_path / "lib"), "list")
    assert code == 0 and "alpha None" not in out and out.count("alpha 2.0") == 3
