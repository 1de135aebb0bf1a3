"""Extract (a LoRA from two full models) and Bake (a mix fused into a full model), engine and CLI.

The single-file layout is checked against what AUTOMATIC1111's and ComfyUI's checkpoint loaders
look for (their rules in our words, in `test_single_file_keys_follow_the_original_layout`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import cli
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from tiny_models import build_tiny_pipeline, build_tiny_sdxl_pipeline
from tiny_transformers import tiny_flux_model  # noqa: F401, F811 - a fixture

from sdlora.errors import ConfigError, ModelLoadError, SdloraError
from sdlora.generation.generate import AdapterWeight, GenerateConfig, Generator
from sdlora.library.formats import Adapter, LoraLayer, write_adapter
from sdlora.library.store import AdapterLibrary
from sdlora.library.tools.bake import bake
from sdlora.library.tools.extract import (
    extract,
    extract_into_library,
    extract_weights,
    factor,
    target_modules,
)

KNOWN_RANK = 2
FUSE_TOLERANCE = (
    2.0  # 8-bit pixel levels, as tests/test_generate.py allows a fused mix against an unfused one
)


def low_rank_deltas(pipeline, seed: int) -> dict[str, torch.Tensor]:
    """A random rank-2 ΔW added to every other target layer of the UNet and the text encoder."""
    generator, deltas = torch.Generator().manual_seed(seed), {}
    with torch.no_grad():
        for part in ("unet", "text_encoder"):
            for i, (path, module) in enumerate(target_modules(getattr(pipeline, part), part).items()):
                if i % 2:
                    continue
                rows, columns = module.weight.shape[0], module.weight[0].numel()
                delta = torch.randn(rows, KNOWN_RANK, generator=generator) @ torch.randn(
                    KNOWN_RANK, columns, generator=generator
                )
                delta = (0.02 * delta).reshape(module.weight.shape)
                module.weight += delta
                deltas[f"{part}.{path}"] = delta
    return deltas


@pytest.fixture(scope="module")
def low_rank_pair(tmp_path_factory, tiny_model):
    """The tiny base plus a known rank-2 ΔW on half its target layers, saved as a diffusers folder."""
    pipeline = build_tiny_pipeline()  # the same seed as tiny_model: the same weights
    deltas = low_rank_deltas(pipeline, seed=3)
    folder = tmp_path_factory.mktemp("extract") / "tuned-low-rank"
    pipeline.save_pretrained(folder)
    return folder, deltas


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory, tiny_model):
    """The tiny base after a few real Adam steps of full fine-tuning of every UNet layer a LoRA can adapt."""
    pipeline = build_tiny_pipeline()
    unet = pipeline.unet
    weights = [module.weight for module in target_modules(unet, "unet").values()]
    unet.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        sample = torch.randn(2, 4, 16, 16, generator=generator)
        context = torch.randn(2, 8, 32, generator=generator)
        loss = torch.nn.functional.mse_loss(
            unet(sample, torch.tensor([100, 700]), encoder_hidden_states=context).sample,
            torch.zeros_like(sample),
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("extract") / "tuned-trained"
    pipeline.save_pretrained(folder)
    return folder


def pixels(generator: Generator, *adapters: tuple[str, float]) -> np.ndarray:
    mix = tuple(AdapterWeight(n, w) for n, w in adapters)
    config = GenerateConfig(prompt="sks, a red circle", seed=5, steps=3, adapters=mix)
    return np.asarray(generator.generate(config)[0].image, dtype=np.float32)


def drawn(pipeline) -> np.ndarray:
    """What generate draws, for a pipeline that is not a Generator's (a loaded single file)."""
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "sks, a red circle",
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).images[0]
    return image * 255


def test_extract_reproduces_a_known_low_rank_difference(tiny_model, low_rank_pair):
    tuned, deltas = low_rank_pair
    adapter, report = extract(str(tiny_model), str(tuned), rank=KNOWN_RANK + 2)
    assert set(adapter.layers) == set(deltas)  # unchanged layers are left out...
    assert len(report.unchanged) > 0 and len(report.unchanged) + len(report.layers) == 2 * len(deltas) - 1
    for key, delta in deltas.items():  # ...and the changed ones reproduced
        error = (adapter.layers[key].delta() - delta).norm() / delta.norm()
        assert error < 1e-4, key
    assert report.retained == pytest.approx(1.0, abs=1e-6)
    assert "left out as unchanged" in report.lines()[-1]


def test_a_folder_read_one_tensor_at_a_time_extracts_what_the_loaded_model_does(tiny_model, low_rank_pair):
    from sdlora.library.tools.model_weights import FolderWeights, LoadedWeights, model_weights

    lazy_base, lazy_tuned = model_weights(str(tiny_model)), model_weights(str(low_rank_pair[0]))
    assert isinstance(lazy_base, FolderWeights)
    assert all(p.is_meta for part in lazy_base.parts.values() for p in part.parameters())  # nothing loaded
    lazy, _ = extract_weights(lazy_base, lazy_tuned, KNOWN_RANK, None, 1e-6)
    whole = LoadedWeights(str(tiny_model)), LoadedWeights(str(low_rank_pair[0]))
    loaded, _ = extract_weights(*whole, KNOWN_RANK, None, 1e-6)
    assert lazy.layers.keys() == loaded.layers.keys()
    for key, layer in lazy.layers.items():
        assert torch.allclose(layer.delta(), loaded.layers[key].delta(), atol=1e-6), key


def test_extract_to_a_kept_fraction_takes_the_smallest_rank_that_keeps_it(tiny_model, trained_pair):
    adapter, report = extract(str(tiny_model), str(trained_pair), keep=0.9)
    tuned = StableDiffusionPipeline.from_pretrained(str(trained_pair)).unet
    base = StableDiffusionPipeline.from_pretrained(str(tiny_model)).unet
    figure = max(report.layers, key=lambda f: f.rank)
    path = figure.key.removeprefix("unet.")
    delta = tuned.get_submodule(path).weight - base.get_submodule(path).weight
    s = torch.linalg.svdvals(delta.detach().flatten(1)).double()
    kept = lambda k: float(s[:k].square().sum().sqrt() / s.square().sum().sqrt())  # noqa: E731
    assert kept(figure.rank) >= 0.9 > kept(figure.rank - 1)
    assert figure.retained == pytest.approx(kept(figure.rank), rel=1e-5)
    assert adapter.layers[figure.key].rank == figure.rank


@pytest.fixture(scope="module")
def extracted_library(tmp_path_factory, tiny_model, low_rank_pair, trained_pair):
    """A library holding the extracts of both pairs, at a rank >= each difference's."""
    library = AdapterLibrary(tmp_path_factory.mktemp("extract-lib"))
    extract_into_library(library, "low-rank", str(tiny_model), str(low_rank_pair[0]), rank=KNOWN_RANK)
    extract_into_library(library, "trained", str(tiny_model), str(trained_pair), rank=64)  # full rank
    return library


@pytest.fixture(scope="module")
def base_generator(tiny_model, extracted_library):
    """One resident base over the extracts' library, shared by the image tests."""
    return Generator(str(tiny_model), extracted_library)


@pytest.mark.parametrize("name", ["low-rank", "trained"])
def test_extracted_adapter_draws_the_fine_tuned_models_image(
    low_rank_pair, trained_pair, extracted_library, base_generator, name
):
    tuned = {"low-rank": low_rank_pair[0], "trained": trained_pair}[name]
    with_adapter = pixels(base_generator, (name, 1.0))
    fine_tuned = pixels(Generator(str(tuned), AdapterLibrary(extracted_library.root / "none")))
    assert np.abs(fine_tuned - pixels(base_generator)).max() > 10 * FUSE_TOLERANCE  # the tuning shows
    assert np.abs(with_adapter - fine_tuned).max() <= FUSE_TOLERANCE


def test_extracted_adapter_is_a_normal_library_adapter(extracted_library):
    info = extracted_library.get("trained")
    assert info.family == "sd1"
    with safe_open(str(info.path), framework="pt") as file:
        keys = list(file.keys())
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert any(".lora_down." in k for k in keys) and any(k.endswith(".alpha") for k in keys)


def test_extract_refuses_another_architecture_and_a_bad_rule(tiny_model, tiny_sdxl_model, tmp_path):
    with pytest.raises(ModelLoadError, match="extract needs a fine-tuned model and its own base") as caught:
        extract(str(tiny_model), str(tiny_sdxl_model), rank=4)
    assert "\n" not in str(caught.value)
    for rule in ({"rank": 0}, {"keep": 1.5}, {}, {"rank": 4, "keep": 0.9}):
        with pytest.raises(ConfigError):
            extract(str(tiny_model), str(tiny_model), **rule)
    with pytest.raises(SdloraError, match="does not differ"):
        extract_into_library(AdapterLibrary(tmp_path), "same", str(tiny_model), str(tiny_model), rank=4)


def test_factor_keeps_convolution_shapes():
    delta = torch.randn(8, 4, 3, 3)
    layer, kept, whole = factor(delta, rank=50, keep=None)  # above the full rank, 8: cut to it
    assert layer.down.shape == (8, 4, 3, 3) and layer.up.shape == (8, 8, 1, 1)
    assert torch.allclose(layer.delta(), delta, atol=1e-5) and kept == pytest.approx(whole)


# --- bake -------------------------------------------------------------------------------------

MIX = (("reds", 0.8), ("blues", -0.5))


def random_adapter(pipeline, seed: int, parts=("unet", "text_encoder")) -> Adapter:
    """A rank-4 LoRA with random factors on every target layer of the pipeline's UNet and text encoders."""
    generator, layers = torch.Generator().manual_seed(seed), {}
    for part in parts:
        for path, module in target_modules(getattr(pipeline, part), part).items():
            rows, columns = module.weight.shape[0], module.weight.shape[1:]
            up = 0.1 * torch.randn(rows, 4, *([1, 1] if len(columns) == 3 else []), generator=generator)
            layers[f"{part}.{path}"] = LoraLayer(0.1 * torch.randn(4, *columns, generator=generator), up, 2.0)
    return Adapter(layers, {"modelspec.title": f"random {seed}"})


@pytest.fixture(scope="module")
def mix_library(tmp_path_factory):
    library = AdapterLibrary(tmp_path_factory.mktemp("bake-lib"))
    pipeline = build_tiny_pipeline()
    for seed, (name, _) in enumerate(MIX):
        write_adapter(library.path_of(name), random_adapter(pipeline, seed), "kohya", family="sd1")
    return library


@pytest.fixture(scope="module")
def baked(tmp_path_factory, tiny_model, mix_library):
    """The mix baked into the tiny base as a diffusers folder and as a single file."""
    root = tmp_path_factory.mktemp("baked")
    weighted = [(mix_library.read(name), weight) for name, weight in MIX]
    names = [name for name, _ in MIX]
    folder = bake(str(tiny_model), weighted, root / "baked", names=names)
    stages: list[tuple[int, int, str]] = []
    single = bake(
        str(tiny_model),
        weighted,
        root / "baked.safetensors",
        names=names,
        on_progress=lambda *stage: stages.append(stage),
    )
    return folder, single, stages


def test_bake_reports_its_stages_in_order_and_ends_at_the_total(baked):
    """Loading the base, fusing each adapter, saving: minutes on a real model, each announced as it starts."""
    stages, total = baked[2], len(MIX) + 2
    assert [done for done, _, _ in stages] == list(range(total + 1))
    assert {whole for _, whole, _ in stages} == {total}
    words = [stage for *_, stage in stages]
    assert words[0].startswith("loading the base model")
    assert words[1:3] == ["fusing reds at weight 0.8", "fusing blues at weight -0.5"]
    assert words[3] == f"saving {baked[1].out}" and words[4] == f"saved {baked[1].out}"


def test_baked_folder_and_single_file_draw_the_fused_mix(tiny_model, mix_library, baked):
    folder, single, _ = baked
    generator = Generator(str(tiny_model), mix_library)
    fused_mix = pixels(generator, *MIX)
    assert np.abs(fused_mix - pixels(generator)).max() > 10 * FUSE_TOLERANCE  # the mix shows in the image
    from_folder = pixels(Generator(str(folder.out), AdapterLibrary(mix_library.root / "none")))
    assert np.abs(from_folder - fused_mix).max() <= FUSE_TOLERANCE
    loaded = StableDiffusionPipeline.from_single_file(
        str(single.out), config=str(tiny_model), local_files_only=True, safety_checker=None
    )
    same_sampler = StableDiffusionPipeline.from_pretrained(str(folder.out), safety_checker=None)
    assert np.abs(drawn(loaded) - drawn(same_sampler)).max() <= FUSE_TOLERANCE
    assert json.loads((folder.out / "baked.json").read_text())["sdlora.baked"] == json.dumps(
        [list(m) for m in MIX]
    )
    assert folder.layers == single.layers == len(mix_library.read("reds").layers)
    assert "reds at weight 0.8" in single.lines()
    # the size in the unit the browser's file box and the Library table use (2**20 bytes), not 10**6
    size = single.out.stat().st_size
    assert f"{size / 2**20:.1f} MB)" in single.lines()[-1] or f"{size / 2**10:.0f} KB)" in single.lines()[-1]


@pytest.fixture(scope="module")
def baked_sdxl(tmp_path_factory, tiny_sdxl_model):
    """A random adapter baked into the tiny SDXL as a float16 single file, and that adapter."""
    adapter = random_adapter(build_tiny_sdxl_pipeline(), 7, ("unet", "text_encoder", "text_encoder_2"))
    out = tmp_path_factory.mktemp("baked-xl") / "xl.safetensors"
    bake(str(tiny_sdxl_model), [(adapter, 0.6)], out, dtype="fp16", names=["xl-mix"])
    return out, adapter


def header(path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], set[str]]:
    with safe_open(str(path), framework="pt") as file:
        shapes = {k: tuple(file.get_slice(k).get_shape()) for k in file.keys()}
        dtypes = {file.get_slice(k).get_dtype() for k in file.keys()}
        return shapes, file.metadata(), dtypes


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_file_keys_follow_the_original_layout(family, baked, baked_sdxl, tiny_model, tiny_sdxl_model):
    """The rules AUTOMATIC1111 (sd_models_config) and ComfyUI (model_detection, supported_models) read by."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    path = baked[1].out if family == "sd1" else baked_sdxl[0]
    folder = tiny_model if family == "sd1" else tiny_sdxl_model
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    shapes, metadata, dtypes = header(path)
    unet = "model.diffusion_model."
    # Three parts, each under the prefix both loaders split a checkpoint by.
    text = (
        ("cond_stage_model.transformer.text_model.",)
        if family == "sd1"
        else ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.")
    )
    assert all(k.startswith((unet, "first_stage_model.", *text)) for k in shapes)
    # UNet: the first convolution gives the model width and input channels, out.2 the output channels.
    width = unet_config["block_out_channels"][0]
    assert shapes[f"{unet}input_blocks.0.0.weight"] == (width, 4, 3, 3)
    assert shapes[f"{unet}out.2.weight"] == (4, width, 3, 3)
    # Blocks are numbered flat: (layers per level + 1) slots a level, a downsampler `op` in the last slot;
    # a ResNet has in_layers.0 and out_layers.3; a transformer sits in slot 1 of a block.
    slots = unet_config["layers_per_block"] + 1
    assert f"{unet}input_blocks.{slots}.0.op.weight" in shapes
    assert (
        f"{unet}input_blocks.1.0.in_layers.0.weight" in shapes
        and f"{unet}middle_block.0.out_layers.3.weight" in shapes
    )
    first_attention = next(k for k in shapes if ".1.transformer_blocks.0.attn2.to_k.weight" in k)
    # The context width is attn2.to_k's input; linear projections are 2-D, 1x1 convolutions 4-D.
    assert shapes[first_attention][1] == unet_config["cross_attention_dim"]
    proj_in = first_attention.split("transformer_blocks")[0] + "proj_in.weight"
    assert len(shapes[proj_in]) == (2 if unet_config.get("use_linear_projection") else 4)
    assert f"{unet}middle_block.1.proj_in.weight" in shapes
    # SDXL alone has the size-and-pooled conditioning embedding, label_emb.0.0, its width the adm channels.
    adm = f"{unet}label_emb.0.0.weight"
    assert (adm in shapes) == (family == "sdxl")
    if family == "sdxl":
        assert shapes[adm][1] == unet_config["projection_class_embeddings_input_dim"]
        # AUTOMATIC1111 tells SDXL by the second encoder's ln_final; OpenCLIP stacks q, k, v in in_proj.
        hidden = shapes["conditioner.embedders.1.model.ln_final.weight"][0]
        assert shapes["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] == (
            3 * hidden,
            hidden,
        )
        assert "conditioner.embedders.1.model.text_projection" in shapes
        assert (
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
            in shapes
        )
    else:
        assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in shapes
    # The VAE: encoder levels from the top, decoder levels from the bottom, mid attention as 1x1 convolutions.
    assert len(shapes["first_stage_model.decoder.mid.attn_1.q.weight"]) == 4
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in shapes
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in shapes
    if family == "sd1":  # diffusers' own detection; its SDXL marker is resblocks.9, deeper than the tiny SDXL
        stand_ins = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        assert infer_diffusers_model_type(stand_ins) == "v1"
    else:
        marker = CHECKPOINT_KEY_NAMES["xl_base"].replace("resblocks.9.", "resblocks.1.")
        assert marker in shapes
    assert dtypes == ({"F32"} if family == "sd1" else {"F16"})
    assert "reds" in metadata["sdlora.baked"] or "xl-mix" in metadata["sdlora.baked"]


def module_at(model, path: str):
    """A module by library path (transformers 5 flattens CLIPTextModel but not the one with a projection)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return model.get_submodule(path.removeprefix("text_model."))


def test_baked_sdxl_single_file_holds_base_plus_weighted_delta(tiny_sdxl_model, baked_sdxl):
    path, adapter = baked_sdxl
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(tiny_sdxl_model), local_files_only=True
    )
    base = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model))

    def expected(part: str, path_: str) -> torch.Tensor:
        return module_at(getattr(base, part), path_).weight + 0.6 * adapter.layers[f"{part}.{path_}"].delta()

    checked = 0
    for part in ("unet", "text_encoder"):
        for path_ in adapter.in_part(part):
            ours = module_at(getattr(loaded, part), path_).weight.float()
            assert torch.allclose(ours, expected(part, path_), atol=2e-3, rtol=2e-3), (
                path_
            )  # float16 rounding
            checked += 1
    # The second encoder read back by hand: diffusers mistakes a tiny SDXL's second encoder for the first
    # when both have the same width (real SDXL's are 768 and 1280 wide).
    with safe_open(str(path), framework="pt") as file:
        stacked = file.get_tensor("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
    qkv = [expected("text_encoder_2", f"text_model.encoder.layers.0.self_attn.{x}_proj") for x in "qkv"]
    assert torch.allclose(stacked.float(), torch.cat(qkv), atol=2e-3, rtol=2e-3)
    assert checked > 20


def test_bake_refuses_in_one_line_and_overwrites_nothing(tiny_model, mix_library, baked, baked_sdxl):
    folder = baked[0].out
    before = (folder / "baked.json").read_text()
    reds = mix_library.read("reds")
    with pytest.raises(SdloraError, match="already exists"):
        bake(str(tiny_model), [(reds, 1.0)], folder)
    assert (folder / "baked.json").read_text() == before
    with pytest.raises(ConfigError, match="precision"):
        bake(str(tiny_model), [(reds, 1.0)], folder.parent / "x.safetensors", dtype="fp8")
    with pytest.raises(ConfigError, match="at least one adapter"):
        bake(str(tiny_model), [], folder.parent / "y")
    with pytest.raises(SdloraError, match="does not fit this sd1 base model") as caught:
        bake(str(tiny_model), [(baked_sdxl[1], 1.0)], folder.parent / "z", names=["xl-mix"])
    assert "\n" not in str(caught.value) and not (folder.parent / "z").exists()


def test_cli_extract_and_bake(capsys, tiny_model, low_rank_pair, mix_library, tmp_path):
    library = ["--adapters-dir", str(mix_library.root)]
    code, out, err = cli(
        capsys, "adapters", "extract", "--base", str(tiny_model), "--tuned", str(low_rank_pair[0]),
        "--rank", "2", "--as", "cli-extract", *library,
    )  # fmt: skip
    assert code == 0, err
    assert "layers extracted" in out and mix_library.get("cli-extract").path.is_file()
    pipeline = build_tiny_pipeline()
    layers = sum(len(target_modules(getattr(pipeline, part), part)) for part in ("unet", "text_encoder"))
    assert "\rextract: 100%" in err and f"{layers}/{layers}" in err  # the bar over the layers, on stderr
    code, _, err = cli(capsys, "adapters", *library, "extract", "--base", str(tiny_model), "--tuned",
                       str(low_rank_pair[0]), "--rank", "2", "--as", "cli-extract")  # fmt: skip
    assert code == 2 and "already exists" in err
    out_file = tmp_path / "mix.safetensors"
    args = ["adapters", "bake", "--lora", "reds:0.8", "--lora", "blues:-0.5", "--out", str(out_file)]
    code, out, err = cli(capsys, *args, "--base-model", str(tiny_model), "--dtype", "fp16", *library)
    assert code == 0, err
    assert "single file, original layout, fp16" in out
    assert header(out_file)[2] == {"F16"}
    assert err.splitlines()[1:] == [
        "bake [1/4] fusing reds at weight 0.8",
        "bake [2/4] fusing blues at weight -0.5",
        f"bake [3/4] saving {out_file}",
        f"bake [4/4] saved {out_file}",
    ]
    assert err.startswith(f"bake [0/4] loading the base model {tiny_model}") and "bake [" not in out
    code, _, err = cli(capsys, *args, "--base-model", str(tiny_model), *library, "--quiet")
    assert code == 2 and "already exists" in err and err.count("\n") == 1


def test_flux_extract_reproduces_the_difference_and_bakes_back_into_a_folder(tiny_flux_model, tmp_path):  # noqa: F811
    """A transformer family: the attention projections extracted, the adapter baked back gives the tuned weights."""
    from sdlora.models.loading import load_pipeline

    pipeline = load_pipeline(str(tiny_flux_model))
    base = {
        path: module.weight.detach().clone()
        for path, module in target_modules(pipeline.transformer, "transformer").items()
    }
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in target_modules(pipeline.transformer, "transformer").values():
            rows, columns = module.weight.shape
            module.weight += (
                0.01
                * torch.randn(rows, 2, generator=generator)
                @ torch.randn(2, columns, generator=generator)
            )
    pipeline.save_pretrained(tmp_path / "tuned")
    library = AdapterLibrary(tmp_path / "lib")
    info, report = extract_into_library(
        library, "flux-x", str(tiny_flux_model), str(tmp_path / "tuned"), rank=2
    )
    assert info.family == "flux" and len(report.layers) == len(base)
    adapter = library.read("flux-x")
    baked = bake(str(tiny_flux_model), [(adapter, 1.0)], tmp_path / "baked", names=["flux-x"])
    again = load_pipeline(str(baked.out)).transformer
    for path, before in base.items():
        tuned = pipeline.transformer.get_submodule(path).weight
        assert torch.allclose(again.get_submodule(path).weight, tuned, atol=1e-5), path
        assert (tuned - before).abs().max() > 1e-3


def test_original_layout_agrees_with_the_single_file_tests_writer(tiny_sdxl_model):
    """The engine's original-layout names equal the ones tests/test_single_file.py writes its genuine
    checkpoints with (SD 1.x/2.x/SDXL UNet, VAE, OpenAI CLIP and OpenCLIP), key for key and value for value."""
    from ldm_layout import clip_to_ldm, open_clip_to_ldm, unet_key_to_ldm, unet_vae_to_ldm

    from sdlora.models import original_layout

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model))
    unet, layers = pipeline.unet, pipeline.unet.config.layers_per_block
    with_attention = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    their_unet = {
        f"model.diffusion_model.{unet_key_to_ldm(k, with_attention, layers)}": v
        for k, v in unet.state_dict().items()
    }
    for ours, theirs in (
        (original_layout.unet_tensors(unet), their_unet),
        (
            original_layout.vae_tensors(pipeline.vae),
            {
                k: v
                for k, v in unet_vae_to_ldm(unet, pipeline.vae).items()
                if k.startswith("first_stage_model.")
            },
        ),
        (original_layout.clip_tensors(pipeline.text_encoder, "p."), clip_to_ldm(pipeline.text_encoder, "p.")),
        (
            original_layout.open_clip_tensors(pipeline.text_encoder_2, "q."),
            open_clip_to_ldm(pipeline.text_encoder_2, "q."),
        ),
    ):
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_cli_bake_with_block_weights_bakes_only_the_weighted_blocks(
    capsys, tiny_model, mix_library, tmp_path
):
    """`--lora reds:0.8:lbw=OUTALL`: layers of weighted blocks as baked without block weights, the rest the base's."""
    from diffusers import UNet2DConditionModel

    from sdlora.library.tools.block_weights import BY_LENGTH, block_of, parse_block_weights

    library = ["--adapters-dir", str(mix_library.root), "--base-model", str(tiny_model)]
    plain, out_only = tmp_path / "plain", tmp_path / "out-only"
    for lora, out in (("reds:0.8", plain), ("reds:0.8:lbw=OUTALL", out_only)):
        code, _, err = cli(capsys, "adapters", "bake", "--lora", lora, "--out", str(out), *library)
        assert code == 0, err
    weights = parse_block_weights("OUTALL", "sd1")
    weight_of = dict(zip(BY_LENGTH[len(weights)], weights, strict=True))
    base, baked_plain, baked = (
        UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").state_dict()
        for folder in (tiny_model, plain, out_only)
    )
    kept = dropped = 0
    for path in mix_library.read("reds").in_part("unet"):
        key, weight = f"unet.{path}", f"{path}.weight"
        if weight_of.get(block_of(key, tuple(weight_of)), 0.0) == 1.0:
            assert torch.equal(baked[weight], baked_plain[weight]), key
            kept += 1
        else:
            assert torch.equal(baked[weight], base[weight]), key
            dropped += 1
    assert kept and dropped  # both kinds of block were in the adapter
    assert any(not torch.equal(baked_plain[k], base[k]) for k in base)  # the plain bake did change weights
    code, _, err = cli(
        capsys, "adapters", "bake", "--lora", "reds:1:lbw=NOPE", "--out", str(tmp_path / "x"), *library
    )
    assert code == 2 and "NOPE" in err and "\n" not in err.strip() and not (tmp_path / "x").exists()
