"""Every common LoRA format in, the library's files out: per-layer ΔW kept, images equal to diffusers'.

Sources are adapters trained here (attention only; with the ResNet convolutions; alpha != rank)
plus text-encoder layers at their own alpha. Each is written in each format by that format's
own rules (tests/foreign_formats.py), imported, exported in both formats, and compared layer
by layer: ΔW = (alpha/r)·up·down within 1e-5.
"""

from __future__ import annotations

import os
import stat

import foreign_formats as ff
import numpy as np
import pytest
import torch
from conftest import draw_concept
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from sdlora.config import DataConfig, LoraSpec, TrainConfig
from sdlora.errors import AdapterFormatError
from sdlora.generation.generate import AdapterWeight, GenerateConfig, Generator, make_scheduler
from sdlora.library.formats import FORMATS, read_adapter, read_metadata
from sdlora.library.store import AdapterLibrary, reference_from_pipeline
from sdlora.models.loading import load_pipeline
from sdlora.training.loop import train

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def layout(tiny_model):
    return reference_from_pipeline(load_pipeline(str(tiny_model)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_model, layout):
    """name -> {layer: (down, up, alpha)}: two trained adapters, and one with text-encoder layers too."""
    root = tmp_path_factory.mktemp("sources")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        draw_concept(images / f"{i}.png", i)
    found = {}
    for name, extra, alpha in (("attention", (), 2.0), ("conv", ("conv1", "conv2"), 3.0)):
        config = TrainConfig(
            base_model=str(tiny_model),
            output_dir=str(root / "out"),
            name=name,
            steps=3,
            learning_rate=2e-2,
            final_preview=False,
            seed=3,
            data=DataConfig(images=str(images), trigger_word="sks", resolution=32),
            lora=LoraSpec(rank=4, alpha=alpha, extra_target_modules=extra),
        )
        adapter = read_adapter(train(config).adapter_path)
        found[name] = {k: (layer.down, layer.up, layer.alpha) for k, layer in adapter.layers.items()}
        assert any(layer.up.abs().max() > 0 for layer in adapter.layers.values())  # trained: B is not zero
    g = torch.Generator().manual_seed(11)
    text = dict(found["attention"])
    for key, shape in layout.shapes.items():
        if key.startswith("text_encoder.") and key.endswith(("_proj", "fc1", "fc2")):
            alpha = 6.0 if "self_attn" in key else 0.5  # self-attention alphas once came back doubled
            text[key] = (
                torch.randn(4, shape[1], generator=g) * 0.1,
                torch.randn(shape[0], 4, generator=g) * 0.1,
                alpha,
            )
    found["text encoder"] = text
    return found


def delta(down, up, alpha):
    return (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))


def write_format(fmt: str, layers, folder, unet) -> os.PathLike:
    folder.mkdir(parents=True, exist_ok=True)
    up_attention = {0, 1}  # the tiny model: both levels have attention, one ResNet each
    if fmt == "kohya":
        return ff.save(folder / "kohya.safetensors", ff.kohya(layers))
    if fmt == "kohya, original SD names":
        return ff.save(
            folder / "ldm.safetensors", ff.kohya(layers, lambda p: ff.ldm_path(p, 1, up_attention))
        )
    if fmt == "ComfyUI diffusion_model":
        return ff.save(folder / "comfy.safetensors", ff.comfyui(layers, 1, up_attention))
    if fmt == "diffusers save_lora_weights (lora.down)":
        return ff.diffusers_save(StableDiffusionPipeline, layers, folder, old_keys=True)
    if fmt == "diffusers save_lora_weights (lora_A)":
        return ff.diffusers_save(StableDiffusionPipeline, layers, folder, old_keys=False)
    if fmt == "PEFT save_pretrained":
        return ff.peft_save_pretrained(unet, layers, folder)
    raise AssertionError(fmt)


# Where diffusers' own load_lora_weights reads a file and applies it at the right scale.
DIFFUSERS_READS = {"kohya", "diffusers save_lora_weights (lora.down)", "diffusers save_lora_weights (lora_A)"}
FORMAT_ROWS = [
    "kohya",
    "kohya, original SD names",
    "ComfyUI diffusion_model",
    "diffusers save_lora_weights (lora.down)",
    "diffusers save_lora_weights (lora_A)",
    "PEFT save_pretrained",
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model, layout):
    library = AdapterLibrary(tmp_path_factory.mktemp("library"), layout)
    return library, Generator(str(tiny_model), library)


def assert_same_deltas(expected, adapter, what):
    assert set(adapter.layers) == set(expected), what
    for key, (down, up, alpha) in expected.items():
        got = adapter.layers[key].delta().flatten(1)
        assert torch.allclose(got, delta(down, up, alpha), atol=TOLERANCE, rtol=TOLERANCE), f"{what}: {key}"


def image(generator_or_pipe, prompt="sks, a red circle") -> np.ndarray:
    # the sampler named: a bare pipeline has no "auto" (the Generator's "the model's own": Euler a here)
    config = GenerateConfig(prompt=prompt, seed=4, steps=3, width=32, height=32, scheduler="Euler a")
    if isinstance(generator_or_pipe, Generator):
        return np.asarray(generator_or_pipe.generate(config)[0].image, dtype=np.int16)
    pipe = generator_or_pipe
    pipe.scheduler = make_scheduler(config.scheduler, pipe.scheduler.config)
    result = pipe(
        prompt,
        width=32,
        height=32,
        num_inference_steps=3,
        guidance_scale=config.guidance,
        generator=torch.Generator().manual_seed(4),
    )
    return np.asarray(result.images[0], dtype=np.int16)


@pytest.mark.parametrize("fmt", FORMAT_ROWS)
@pytest.mark.parametrize("source", ["attention", "conv", "text encoder"])
def test_round_trip_over_formats(source, fmt, sources, shared, tiny_model, layout, tmp_path):
    layers = sources[source]
    if fmt == "PEFT save_pretrained":  # peft saves one model part per folder
        layers = {k: v for k, v in layers.items() if k.startswith("unet.")}
    library, generator = shared
    unet = load_pipeline(str(tiny_model)).unet
    path = write_format(fmt, layers, tmp_path / "in", unet)

    info = library.import_file(path, name=f"{source}-{fmt}")
    assert all(k.startswith("lora_unet_") or k.startswith("lora_te_") for k in load_file(str(info.path)))
    assert_same_deltas(layers, library.read(info.name), f"{fmt} imported")
    for out_format in FORMATS:
        exported = read_adapter(library.export(info.name, out_format, tmp_path / out_format), layout)
        assert_same_deltas(layers, exported, f"{fmt} exported as {out_format}")
        if fmt != "diffusers save_lora_weights (lora.down)":  # that format holds no alpha: scale folded in
            assert {k: la.alpha for k, la in exported.layers.items()} == {k: v[2] for k, v in layers.items()}

    ours = image_with(generator, info.name)
    if fmt in DIFFUSERS_READS and not (fmt == "kohya" and source == "text encoder"):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(path))
        assert np.abs(ours - image(pipe)).max() <= 1, (
            "diffusers' own load of the same file draws another image"
        )
    diffusers_export = library.export(info.name, "diffusers", tmp_path / "for-diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(diffusers_export))
    assert np.abs(ours - image(pipe)).max() <= 1


def image_with(generator: Generator, name: str) -> np.ndarray:
    config = GenerateConfig(
        prompt="sks, a red circle", seed=4, steps=3, width=32, height=32, adapters=(AdapterWeight(name, 1.0),)
    )
    with_adapter = np.asarray(generator.generate(config)[0].image, dtype=np.int16)
    generator.forget(name)
    return with_adapter


def test_text_encoder_layers_apply_at_their_own_alpha(sources, shared, tiny_model, tmp_path):
    """What the CLIP layers output with the adapter equals the base layers plus ΔW added by hand."""
    library, generator = shared
    layers = sources["text encoder"]
    info = library.import_file(ff.save(tmp_path / "te.safetensors", ff.kohya(layers)), name="te-check")
    generator.generate(GenerateConfig(prompt="x", steps=1, adapters=(AdapterWeight(info.name, 1.0),)))
    reference = load_pipeline(str(tiny_model)).text_encoder
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for key, (down, up, alpha) in layers.items():
            if key.startswith("text_encoder."):
                modules[key.split(".", 1)[1].removeprefix("text_model.")].weight += delta(down, up, alpha)
        ids = torch.tensor([[1, 5, 9, 2]])
        assert torch.allclose(
            generator.pipeline.text_encoder(ids).last_hidden_state,
            reference(ids).last_hidden_state,
            atol=1e-5,
        )
    generator.forget(info.name)


def test_diffusers_kohya_route_misscales_text_encoder_alphas(sources, tiny_model, tmp_path):
    """Why generation does not hand kohya files to diffusers: on transformers 5 diffusers 0.42 drops
    'text_model.' from the weights but not from the alphas, so text-encoder layers whose alpha is
    not their rank come out at the wrong scale. If this starts failing, diffusers fixed it (update
    docs/formats.md)."""
    te_only = {k: v for k, v in sources["text encoder"].items() if k.startswith("text_encoder.")}
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    base = load_pipeline(str(tiny_model)).text_encoder
    modules = dict(base.named_modules())
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        for key, (down, up, alpha) in te_only.items():
            modules[key.split(".", 1)[1].removeprefix("text_model.")].weight += delta(down, up, alpha)
        pipe.load_lora_weights(str(ff.save(tmp_path / "te.safetensors", ff.kohya(te_only))))
        wrong = (pipe.text_encoder(ids).last_hidden_state - base(ids).last_hidden_state).abs().max()
    assert wrong > 1e-3


@pytest.mark.parametrize("algorithm", ["LoHa", "LoHa Tucker", "LoKr"])
def test_lycoris_files_apply_the_update_lycoris_defines(algorithm, layout, shared, tmp_path):
    shapes = {
        k: s
        for k, s in layout.shapes.items()
        if k.startswith("unet.") and k.endswith(("to_q", "to_out.0", "conv1", "conv2", "proj_in", "ff.net.2"))
    }
    if algorithm == "LoKr":
        tensors, deltas = ff.lokr_layers(shapes, rank=2, seed=1)
    else:
        tensors, deltas = ff.loha_layers(shapes, rank=3, seed=2, tucker_conv=algorithm == "LoHa Tucker")
    library, generator = shared
    info = library.import_file(ff.save(tmp_path / f"{algorithm}.safetensors", tensors), name=algorithm)
    assert load_file(str(info.path)).keys() == tensors.keys()  # kept byte for byte: A1111 and ComfyUI read it
    assert info.kind == f"LyCORIS {algorithm.split()[0]}"
    adapter = library.read(info.name)
    assert set(adapter.layers) == set(deltas)
    for key, expected in deltas.items():
        assert torch.allclose(adapter.layers[key].delta(), expected, atol=TOLERANCE, rtol=TOLERANCE), key
    kohya = read_adapter(library.export(info.name, "kohya", tmp_path / "k"), layout)
    for key, expected in deltas.items():
        assert torch.allclose(kohya.layers[key].delta(), expected, atol=TOLERANCE, rtol=TOLERANCE), key
    config = GenerateConfig(prompt="sks", seed=1, steps=2, adapters=(AdapterWeight(info.name, 1.0),))
    assert generator.generate(config)[0].image.size == (32, 32)
    generator.forget(info.name)


def _dora(path):
    return ff.save(
        path,
        {
            "lora_unet_x.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
            "lora_unet_x.dora_scale": torch.ones(1, 4),
        },
    )


@pytest.mark.parametrize(
    "name, tensors, message",
    [
        ("dora.safetensors", None, "is a DoRA adapter"),
        ("oft.safetensors", {"lora_unet_x.oft_blocks": torch.zeros(2, 2, 2)}, "is an OFT/BOFT adapter"),
        ("full.safetensors", {"lora_unet_x.diff": torch.zeros(2, 2)}, "weight difference"),
        (
            "other-arch.safetensors",
            {
                "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 4),
                "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(4, 2),
            },
            "match nothing in this SD 1.x base model",
        ),
        (
            "half.safetensors",
            {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 16)},
            "has no up weight",
        ),
        (
            "nan.safetensors",
            {
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.full(
                    (4, 16, 1, 1), float("nan")
                ),
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(16, 4, 1, 1),
            },
            "NaN or infinite",
        ),
    ],
)
def test_refusals_are_one_line_naming_the_file(name, tensors, message, layout, tmp_path):
    path = _dora(tmp_path / name) if tensors is None else ff.save(tmp_path / name, tensors)
    library = AdapterLibrary(tmp_path / "lib", layout)
    with pytest.raises(AdapterFormatError, match=message) as caught:
        library.import_file(path)
    text = str(caught.value)
    assert name in text and "\n" not in text and len(text) < 300
    assert not (tmp_path / "lib").exists() or not list((tmp_path / "lib").iterdir())


def test_files_are_readable_by_other_users_and_rename_updates_the_name_inside(sources, layout, tmp_path):
    library = AdapterLibrary(tmp_path / "lib", layout)
    source = ff.save(tmp_path / "x.safetensors", ff.kohya(sources["attention"]))
    os.chmod(source, 0o600)
    old_mask = os.umask(0o022)
    try:
        info = library.import_file(source, name="before")
        exported = library.export("before", "diffusers", tmp_path / "out")
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(info.path.stat().st_mode) == 0o644 and stat.S_IMODE(exported.stat().st_mode) == 0o644
    renamed = library.rename("before", "after")
    meta = read_metadata(renamed.path)
    assert meta["ss_output_name"] == "after" and meta["modelspec.title"] == "after"
    assert_same_deltas(sources["attention"], library.read("after"), "renamed")


def test_tucker_locon_mid_is_folded_exactly(layout, tmp_path):
    """LoCon's lora_mid: ΔW[o,i,h,w] = alpha/r · Σ up[o,n]·mid[n,m,h,w]·down[m,i] (AUTOMATIC1111, ComfyUI)."""
    key = next(k for k, s in layout.shapes.items() if k.endswith("resnets.0.conv1") and len(s) == 4)
    out, inp, kh, kw = layout.shapes[key]
    g = torch.Generator().manual_seed(5)
    down, mid, up = (
        torch.randn(3, inp, 1, 1, generator=g),
        torch.randn(3, 3, kh, kw, generator=g),
        torch.randn(out, 3, 1, 1, generator=g),
    )
    stem = "lora_unet_" + key.split(".", 1)[1].replace(".", "_")
    path = ff.save(
        tmp_path / "tucker.safetensors",
        {
            f"{stem}.lora_down.weight": down,
            f"{stem}.lora_mid.weight": mid,
            f"{stem}.lora_up.weight": up,
            f"{stem}.alpha": torch.tensor(1.5),
        },
    )
    expected = 1.5 / 3 * torch.einsum("nmhw,on,mi->oihw", mid, up.flatten(1), down.flatten(1))
    assert torch.allclose(read_adapter(path, layout).layers[key].delta(), expected, atol=TOLERANCE)
