"""Block weights in the LoRA Block Weight extension's convention: presets, the block of each layer, the CLI."""

from __future__ import annotations

import os

import foreign_formats as ff
import pytest
import torch
from conftest import cli

from sdlora.errors import ConfigError
from sdlora.library.formats import Adapter, LoraLayer, layer_shapes
from sdlora.library.tools.block_weights import (
    SD_LORA,
    SDXL_LORA,
    UNET_ALL,
    apply_block_weights,
    block_of,
    parse_block_weights,
)

CONFIGS = "sdlora/models/configs"


def meta_unet_shapes(config: str) -> dict[str, tuple[int, ...]]:
    """Every adaptable layer of a real UNet, built from its shipped config without weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(f"{CONFIGS}/{config}/unet"))
    return {f"unet.{path}": shape for path, shape in layer_shapes(unet).items()}


@pytest.fixture(scope="module")
def sd15_adapter() -> Adapter:
    """A rank-1 LoCon over SD 1.5's real UNet (attention, ResNets, samplers) and two text-encoder layers."""
    shapes = meta_unet_shapes("stable-diffusion-v1")
    shapes.update(
        {f"text_encoder.text_model.encoder.layers.{i}.self_attn.q_proj": (768, 768) for i in (0, 11)}
    )
    g = torch.Generator().manual_seed(0)
    layers = {}
    for key, shape in shapes.items():
        ends = ("to_q", "proj_in", "conv1", "downsamplers.0.conv", "upsamplers.0.conv", "q_proj", "linear_1")
        if key.endswith(ends):
            down = torch.randn(1, *shape[1:], generator=g)
            up = torch.randn(shape[0], 1, *([1, 1] if len(shape) == 4 else []), generator=g)
            layers[key] = LoraLayer(down, up, 1.0)
    return Adapter(layers)


def extension_block(key: str) -> str | None:
    """The block as the extension finds it: by the original-SD name of the layer (text encoders: BASE)."""
    part, path = key.split(".", 1)
    if part != "unet":
        return "BASE"
    ldm = ff.ldm_path(path, 2, {1, 2, 3}).split(".")
    if ldm[0] not in ("input_blocks", "middle_block", "output_blocks"):
        return None
    if ldm[0] == "middle_block":
        return "M00"
    return {"input_blocks": "IN", "output_blocks": "OUT"}[ldm[0]] + f"{int(ldm[1]):02}"


# The extension's README: which of the 17 blocks each default preset turns on.
PRESET_BLOCKS = {
    "INS": {"BASE", "IN01", "IN02", "IN04"},
    "IND": {"BASE", "IN05", "IN07", "IN08"},
    "INALL": {"BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08"},
    "MIDD": {"BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06"},
    "OUTD": {"BASE", "OUT03", "OUT04", "OUT05", "OUT06"},
    "OUTS": {"BASE", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"},
    "OUTALL": {"BASE", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"},
    "ALL": set(SD_LORA),
    "NONE": set(),
}


@pytest.mark.parametrize("preset", PRESET_BLOCKS)
def test_presets_expand_to_the_extensions_documented_vectors(preset):
    weights = parse_block_weights(preset.lower(), "sd1")
    assert len(weights) == 17
    assert {block for block, w in zip(SD_LORA, weights, strict=True) if w == 1} == PRESET_BLOCKS[preset]
    assert set(weights) <= {0.0, 1.0}
    assert parse_block_weights("ALL0.5", "sd2") == (0.5,) * 17
    assert parse_block_weights("ALL", "sdxl") == (1.0,) * 12


@pytest.mark.parametrize(
    ("text", "family", "message"),
    [
        ("INZ", "sd1", r"unknown block-weight preset 'INZ'; the presets are NONE, ALL, INS"),
        ("1,0,1", "sd1", r"'1,0,1': 3 weights, but SD 1\.x takes 17 or 26 \(BASE, IN01"),
        (",".join(["1"] * 17), "sdxl", r"17 weights, but SDXL takes 12 or 20"),
        ("OUTD", "sdxl", r"preset OUTD is defined for the 17 blocks of SD 1\.x/2\.x; for SDXL give 12"),
        ("1," * 16 + "nan", "sd1", r"nan is not between"),
        ("1," * 16 + "two", "sd1", r"'two' is not a number"),
    ],
)
def test_a_bad_preset_or_count_is_one_line_naming_both(text, family, message):
    with pytest.raises(ConfigError, match=message) as refused:
        parse_block_weights(text, family)
    assert "\n" not in str(refused.value)


def test_each_block_holds_the_layers_the_extension_puts_there(sd15_adapter):
    blocks = {key: block_of(key, UNET_ALL) for key in sd15_adapter.layers}
    assert blocks == {key: extension_block(key) for key in sd15_adapter.layers}
    attention = {block for key, block in blocks.items() if key.endswith(("to_q", "q_proj"))}
    assert attention == set(SD_LORA)  # the 17 blocks are exactly where SD 1.5's attention is


def assert_scaled(weighted: LoraLayer, layer: LoraLayer, factor: float, key: str) -> None:
    """ΔW = (alpha/r)·up·down, so the same down and alpha with up times the factor is ΔW times it."""
    assert torch.equal(weighted.down, layer.down) and weighted.alpha == layer.alpha, key
    assert torch.allclose(weighted.up, factor * layer.up), key


def test_a_zero_weight_removes_exactly_that_blocks_layers(sd15_adapter):
    for zeroed in SD_LORA:
        weights = tuple(0.0 if b == zeroed else (0.5 if b == "M00" else 1.0) for b in SD_LORA)
        weighted = apply_block_weights(sd15_adapter, weights)
        in_block = {k for k in sd15_adapter.layers if block_of(k, SD_LORA) == zeroed}
        not_named = {k for k in sd15_adapter.layers if block_of(k, UNET_ALL) in set(UNET_ALL) - set(SD_LORA)}
        assert in_block and set(weighted.layers) == set(sd15_adapter.layers) - in_block - not_named, zeroed
    assert set(apply_block_weights(sd15_adapter, parse_block_weights("NONE", "sd1")).layers) == {
        "unet.time_embedding.linear_1"  # outside every block: weight 1, as in the extension
    }
    weights = parse_block_weights("MIDD", "sd1")
    weighted = apply_block_weights(sd15_adapter, weights)
    for key, layer in sd15_adapter.layers.items():
        block = block_of(key, SD_LORA)
        expected = 1.0 if block is None else dict(zip(SD_LORA, weights, strict=True)).get(block, 0.0)
        if expected == 0:
            assert key not in weighted.layers
        else:
            assert_scaled(weighted.layers[key], layer, expected, key)
    half = apply_block_weights(sd15_adapter, tuple(0.5 if b == "M00" else 1.0 for b in UNET_ALL))
    for key, layer in sd15_adapter.layers.items():
        factor = 0.5 if block_of(key, UNET_ALL) == "M00" else 1.0
        assert_scaled(half.layers[key], layer, factor, key)


def test_sdxl_twelve_blocks_are_where_its_attention_is():
    shapes = meta_unet_shapes("stable-diffusion-xl-v1-base")
    attention = {block_of(k, SDXL_LORA) for k in shapes if k.endswith("attn2.to_k")}
    assert attention == set(SDXL_LORA) - {"BASE"}


def test_transformer_blocks_each_take_their_weight():
    def layer(value):
        return LoraLayer(torch.full((1, 4), value), torch.ones(4, 1), 1.0)

    keys = [
        "transformer.x_embedder",
        "transformer.transformer_blocks.1.attn.to_q",
        "transformer.single_transformer_blocks.2.proj_out",
        "transformer.proj_out",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q",
    ]
    adapter = Adapter({k: layer(1.0) for k in keys})
    flux = dict.fromkeys(("CLIP", "T5", "IN", "OUT"), 1.0) | {"D01": 0.0, "S02": 0.25}
    names = ["CLIP", "T5", "IN"] + [f"D{i:02}" for i in range(19)] + [f"S{i:02}" for i in range(38)] + ["OUT"]
    weighted = apply_block_weights(adapter, tuple(flux.get(n, 1.0) for n in names))
    assert set(weighted.layers) == set(keys) - {"transformer.transformer_blocks.1.attn.to_q"}
    assert weighted.layers["transformer.single_transformer_blocks.2.proj_out"].delta().max() == 0.25
    sd3 = parse_block_weights(",".join(["1"] * 26 + ["0"]), "sd3")  # TE, IN, J00-J23, OUT
    joint = Adapter({k: v for k, v in adapter.layers.items() if "single" not in k})
    assert set(apply_block_weights(joint, sd3).layers) == set(joint.layers) - {"transformer.proj_out"}
    with pytest.raises(ConfigError, match="S02, which the 27 block weights do not reach"):
        apply_block_weights(Adapter({"transformer.single_transformer_blocks.2.proj_out": layer(1.0)}), sd3)


@pytest.fixture(scope="module")
def tiny_library(tiny_model, tmp_path_factory):
    """The tiny model's layout and a library holding 'src', a LoRA on its attention and text encoder."""
    from sdlora.library.store import reference_from_pipeline
    from sdlora.models.loading import load_pipeline

    layout = reference_from_pipeline(load_pipeline(str(tiny_model)))
    g = torch.Generator().manual_seed(1)
    layers = {
        k: (torch.randn(2, s[1], generator=g) * 0.3, torch.randn(s[0], 2, generator=g) * 0.3, 1.0)
        for k, s in layout.shapes.items()
        if k.endswith(("to_q", "to_v", "q_proj"))
    }
    root = tmp_path_factory.mktemp("blocks")
    source = ff.save(root / "src.safetensors", ff.kohya(layers))
    lib = ["--adapters-dir", str(root / "lib"), "--base-model", str(tiny_model)]
    assert cli_quietly("adapters", *lib, "import", str(source), "--name", "src") == 0
    return layout, root / "lib", lib


def cli_quietly(*args: str) -> int:
    from sdlora.cli import main

    return main(list(args))


def test_cli_saves_a_new_adapter_with_block_weights(tiny_library, capsys):
    from sdlora.library.store import AdapterLibrary

    layout, folder, lib = tiny_library
    code, out, err = cli(capsys, "adapters", "block-weights", "src", "--lbw", "OUTALL", "--as", "outs", *lib)
    assert code == 0, err
    library = AdapterLibrary(folder, layout)
    source_adapter, weighted = library.read("src"), library.read("outs")
    kept = {k for k in source_adapter.layers if block_of(k, SD_LORA) in PRESET_BLOCKS["OUTALL"]}
    assert kept and set(weighted.layers) == kept and len(kept) < len(source_adapter.layers)
    for key in kept:
        assert torch.allclose(weighted.layers[key].delta(), source_adapter.layers[key].delta())
    code, _, err = cli(capsys, "adapters", "block-weights", "src", "--lbw", "OUTZ", "--as", "other", *lib)
    assert code == 2 and err.count("\n") == 1 and "OUTZ" in err
    code, _, err = cli(capsys, "adapters", "block-weights", "src", "--lbw", "ALL", "--as", "outs", *lib)
    assert code == 2 and "already exists" in err


def test_lbw_tag_draws_what_the_adapter_rows_draw(tiny_model, tiny_library):
    import numpy as np

    from sdlora.generation.generate import AdapterWeight, GenerateConfig, Generator
    from sdlora.library.store import AdapterLibrary

    generator = Generator(str(tiny_model), AdapterLibrary(tiny_library[1]))

    def draw(prompt="sks, a red circle", *adapters):
        config = GenerateConfig(prompt=prompt, seed=3, steps=2, width=32, height=32, adapters=adapters)
        image = generator.generate(config)[0]
        return np.asarray(image.image), image.parameters

    rows, parameters = draw(
        "sks, a red circle", AdapterWeight("src", 0.8, "1,1,0,0,0,0,0,0.5,0,0,0,0,0,0,0,0,0")
    )
    plain, _ = draw("sks, a red circle", AdapterWeight("src", 0.8))  # the fused mix cache tells them apart
    tagged, _ = draw("sks, a red circle <lora:src:0.8:lbw=1,1,0,0,0,0,0,0.5,0,0,0,0,0,0,0,0,0>")
    assert np.array_equal(tagged, rows) and not np.array_equal(plain, rows)
    assert "<lora:src:0.8:lbw=1,1,0,0,0,0,0,0.5,0,0,0,0,0,0,0,0,0>" in parameters
    preset, _ = draw("sks, a red circle <lora:src:0.8:lbw=outall>")
    saved, _ = draw("sks, a red circle <lora:outs:0.8>")  # the CLI's adapter: OUTALL applied and saved
    assert np.array_equal(preset, saved) and not np.array_equal(preset, rows)
    with pytest.raises(ConfigError, match="lbw: unknown block-weight preset 'OUTZ'|preset 'OUTZ'"):
        draw("sks <lora:src:0.8:lbw=OUTZ>")
    with pytest.raises(ConfigError, match="'te=1' is not read here"):
        draw("sks <lora:src:0.8:te=1>")
    assert {"src", "src:lbw=OUTALL"} <= set(generator.resident)
    generator.forget("src")  # after a rename or delete: every block weighting of it goes too
    assert not [key for key in generator.resident if key.startswith("src")]


def test_block_weights_in_the_library_and_generate_tabs_in_chromium(demo_app, tmp_path):
    """On the demo model: save an adapter with OUTALL from the Library tab, then draw with a row's block weights."""
    import shutil

    from chromium import SCREENSHOTS, TIMEOUT_MS, browser_setup, containing, exactly, open_tab
    from playwright.sync_api import expect

    reason = browser_setup()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    studio = demo_app.studio
    studio.generator()  # the demo model's layout, which the adapter below is made for
    g = torch.Generator().manual_seed(2)
    layers = {
        k: LoraLayer(torch.randn(2, s[1], generator=g) * 0.3, torch.randn(s[0], 2, generator=g) * 0.3, 1.0)
        for k, s in studio.library.reference.shapes.items()
        if k.endswith(("to_q", "to_v"))
    }
    if not studio.library.path_of("lbw-src").exists():
        studio.library.add(Adapter(layers), "lbw-src")

    def shoot(page, name):
        page.screenshot(path=str(tmp_path / name), full_page=True)
        if os.environ.get("SDLORA_UPDATE_SCREENSHOTS") == "1":
            shutil.copyfile(tmp_path / name, SCREENSHOTS / name)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        page.goto(demo_app.url)
        open_tab(page, "Library")
        page.locator("#adapters-table [role=gridcell]").filter(has_text=exactly("lbw-src")).first.click()
        page.locator("#block-weights-panel").get_by_text("Block weights").first.click()
        page.locator("#block-weights-text textarea, #block-weights-text input").first.fill("OUTALL")
        page.locator("#block-weights-save").click()
        selected = page.locator("#selected-adapter textarea, #selected-adapter input").first
        expect(selected).to_have_value("lbw-src-outall")
        expect(page.locator("#adapters-table")).to_contain_text("lbw-src-outall")
        shoot(page, "library-block-weights.png")

        open_tab(page, "Generate")
        page.locator("#adapter-1 input").click()
        page.get_by_role("option", name="lbw-src", exact=True).click()
        page.locator("#block-weights-1 textarea, #block-weights-1 input").first.fill("OUTALL")
        page.locator("#prompt textarea").fill("a red circle")
        page.locator("#seed input").fill("3")
        page.locator("#generate-button").click()
        expect(page.locator("#parameters textarea")).to_have_value(containing("<lora:lbw-src:1:lbw=OUTALL>"))
        expect(page.locator("#results img").first).to_be_visible()
        shoot(page, "generate-block-weights.png")
        browser.close()
    saved = studio.library.read("lbw-src-outall")
    assert set(saved.layers) == {k for k in layers if block_of(k, SD_LORA) in PRESET_BLOCKS["OUTALL"]}
