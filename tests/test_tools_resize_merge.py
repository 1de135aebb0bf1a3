"""Resize and merge: each layer's ΔW is the best approximation of the rank asked, an exact merge is the weighted
sum, the merged adapter draws what the mix draws, and the CLI verbs write new adapters and refuse bad input."""

from __future__ import annotations

import foreign_formats as ff
import numpy as np
import pytest
import torch
from conftest import cli
from safetensors import safe_open

from sdlora.errors import AdapterFormatError, ConfigError, SdloraError
from sdlora.generation.generate import AdapterWeight, GenerateConfig, Generator
from sdlora.library.formats import Adapter, LoraLayer, write_adapter
from sdlora.library.store import AdapterLibrary, reference_from_pipeline
from sdlora.library.tools.merge import merge, merge_in_library
from sdlora.library.tools.resize import resize, resize_in_library
from sdlora.models.loading import load_pipeline

ENDINGS = ("to_q", "to_k", "to_out.0", "proj_in", "conv1", "conv2", "ff.net.2", "q_proj", "out_proj")


@pytest.fixture(scope="module")
def layout(tiny_model):
    return reference_from_pipeline(load_pipeline(str(tiny_model)))


def random_adapter(layout, seed: int, every: int = 1, family: str = "sd1") -> Adapter:
    """Ranks 3..6 and alphas that differ per layer on attention, convolutions (3×3 and 1×1) and text encoder."""
    layers = {}
    keys = sorted(k for k in layout.shapes if k.endswith(ENDINGS))
    for i, key in enumerate(keys[::every]):
        shape, rank = layout.shapes[key], 3 + (i + seed) % 4
        g = torch.Generator().manual_seed(1000 * seed + i)
        down = torch.randn(rank, *shape[1:], generator=g) * 0.3
        up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=g) * 0.3
        layers[key] = LoraLayer(down, up, float(rank) * (0.5 + i % 3))
    return Adapter(layers, {"sdlora.family": family, "sdlora.trigger_word": f"trig{seed}"})


@pytest.fixture(scope="module")
def library(tmp_path_factory, layout) -> AdapterLibrary:
    """Two random adapters on the tiny model, the second on every other layer only, in a library."""
    folder = tmp_path_factory.mktemp("reshape-lib")
    for name, seed, every in (("a", 1, 1), ("b", 2, 2)):
        write_adapter(folder / f"{name}.safetensors", random_adapter(layout, seed, every), "kohya")
    return AdapterLibrary(folder, layout)


def exact(delta: torch.Tensor) -> torch.Tensor:
    return delta.double().flatten(1)


def assert_best_approximation(source: Adapter, result: Adapter, report) -> None:
    """Each layer's error is the norm of the singular values it dropped; the reported fraction is right."""
    for figures in report.layers:
        want = exact(source.layers[figures.key].delta())
        got = result.layers[figures.key]
        assert got.alpha == got.rank == figures.rank_after  # scale 1: weight 1 means what it meant
        assert got.delta().shape == source.layers[figures.key].delta().shape
        singular = torch.linalg.svdvals(want)
        dropped = float(singular[got.rank :].pow(2).sum().sqrt())
        error = float((exact(got.delta()) - want).norm())
        # within 1e-5 of the dropped norm, or of float32 storage (1e-6 of ΔW) where nothing real was dropped
        assert error == pytest.approx(dropped, rel=1e-5, abs=1e-6 * float(want.norm())), figures.key
        kept = float(singular[: got.rank].pow(2).sum().sqrt() / singular.pow(2).sum().sqrt())
        assert figures.retained == pytest.approx(kept, rel=1e-6), figures.key
    norms = [float(exact(source.layers[f.key].delta()).norm()) for f in report.layers]
    kept_norms = [r * n for r, n in zip([f.retained for f in report.layers], norms, strict=True)]
    overall = (sum(k**2 for k in kept_norms) / sum(n**2 for n in norms)) ** 0.5
    assert report.retained == pytest.approx(overall, rel=1e-6)


def test_resized_layers_are_the_best_rank_k_approximation(library):
    source = library.read("a")
    resized, report = resize(source, rank=2)
    assert {f.rank_after for f in report.layers} == {2} and set(resized.layers) == set(source.layers)
    assert_best_approximation(source, resized, report)
    assert 0 < report.retained < 1 and "retained" in report.lines()[0]


def test_kept_fraction_and_ratio_rules_keep_the_fewest_values_that_satisfy_them(library):
    source = library.read("a")
    resized, report = resize(source, keep=0.8)
    assert_best_approximation(source, resized, report)
    for figures in report.layers:
        singular = torch.linalg.svdvals(exact(source.layers[figures.key].delta()))
        fractions = (torch.cumsum(singular**2, 0) / (singular**2).sum()).sqrt()
        assert figures.retained >= 0.8 - 1e-9
        assert figures.rank_after == 1 or float(fractions[figures.rank_after - 2]) < 0.8  # one fewer: too few
    resized, report = resize(source, ratio=0.5, rank=3)
    for figures in report.layers:
        singular = torch.linalg.svdvals(exact(source.layers[figures.key].delta()))
        assert figures.rank_after == min(3, int((singular >= 0.5 * singular[0]).sum()))
    assert len({f.rank_after for f in report.layers}) > 1  # the rule gives each layer its own rank


def test_resize_at_or_above_the_source_rank_reproduces_every_layer(library):
    source = library.read("a")
    resized, report = resize(source, rank=6)
    for key, layer in source.layers.items():
        want = layer.delta()
        assert resized.layers[key].rank == layer.rank
        assert float((resized.layers[key].delta() - want).abs().max()) <= 1e-5 * float(want.abs().max()), key
    assert report.retained == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    "rule, words",
    [
        ({"keep": 0.9, "ratio": 0.1}, "not both"),
        ({}, "give a rank"),
        ({"rank": 0}, "rank must be"),
        ({"keep": 1.5}, "keep must be"),
        ({"ratio": float("nan")}, "ratio must be"),
        ({"rank": 100000}, "above the size of every layer"),
    ],
)
def test_resize_refuses_a_bad_rule_in_one_line(library, rule, words):
    with pytest.raises(ConfigError, match=words) as caught:
        resize(library.read("a"), **rule)
    assert "\n" not in str(caught.value)


def test_exact_merge_is_the_weighted_sum_and_keeps_layers_of_only_one_input(library):
    a, b = library.read("a"), library.read("b")
    merged, report = merge([(a, 0.7), (b, -0.4)])
    assert set(merged.layers) == set(a.layers) and set(b.layers) < set(a.layers)
    for key, layer in merged.layers.items():
        want = 0.7 * a.layers[key].delta() + (-0.4 * b.layers[key].delta() if key in b.layers else 0)
        assert float((layer.delta() - want).abs().max()) <= 1e-5 * float(want.abs().max()), key
        assert layer.rank == a.layers[key].rank + (b.layers[key].rank if key in b.layers else 0)
    assert report.retained == 1.0


def test_merge_to_a_rank_is_the_best_approximation_of_the_sum(library):
    a, b = library.read("a"), library.read("b")
    merged, report = merge([(a, 0.7), (b, 0.3)], rank=3)
    exact_sum, _ = merge([(a, 0.7), (b, 0.3)])
    assert_best_approximation(exact_sum, merged, report)
    assert report.retained < 1


def test_merge_refuses_other_families_bad_weights_and_mismatched_layers(layout):
    sd1, sdxl = random_adapter(layout, 1), random_adapter(layout, 2, family="sdxl")
    with pytest.raises(AdapterFormatError, match=r"mine \(SD 1.x\) with yours \(SDXL\)"):
        merge([(sd1, 1.0), (sdxl, 1.0)], names=["mine", "yours"])
    with pytest.raises(ConfigError, match="weight nan"):
        merge([(sd1, float("nan"))], names=["mine"])
    key, layer = next(iter(sd1.layers.items()))
    other = Adapter({key: LoraLayer(layer.down[:, :-1], layer.up, 1.0)}, {"sdlora.family": "sd1"})
    with pytest.raises(AdapterFormatError, match=f"{key} is .* in mine but .* in other"):
        merge([(sd1, 1.0), (other, 1.0)], names=["mine", "other"])


def test_merge_joins_a_flat_and_a_1x1_convolution_form_of_one_layer():
    g = torch.Generator().manual_seed(0)
    flat = LoraLayer(torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g), 1.0)
    conv = LoraLayer(torch.randn(3, 8, 1, 1, generator=g), torch.randn(6, 3, 1, 1, generator=g), 6.0)
    merged, _ = merge([(Adapter({"unet.proj_in": flat}), 0.5), (Adapter({"unet.proj_in": conv}), 2.0)])
    layer = merged.layers["unet.proj_in"]
    assert layer.down.shape == (5, 8, 1, 1) and layer.up.shape == (6, 5, 1, 1)  # the base layer's form
    want = 0.5 * flat.delta() + 2.0 * conv.delta().flatten(1)
    torch.testing.assert_close(layer.delta().flatten(1), want, rtol=1e-5, atol=1e-6)


def test_merged_adapter_draws_what_the_mix_draws(tiny_model, library):
    merge_in_library(library, [("a", 0.7), ("b", 0.3)], "ab-exact")
    generator = Generator(str(tiny_model), library)

    def pixels(*mix):
        config = GenerateConfig(
            prompt="trig1", seed=3, steps=3, adapters=tuple(AdapterWeight(*m) for m in mix)
        )
        return np.asarray(generator.generate(config)[0].image, dtype=np.float32)

    merged, mixed = pixels(("ab-exact", 1.0)), pixels(("a", 0.7), ("b", 0.3))
    assert np.abs(merged - mixed).max() <= 2.0  # the fuse tests' tolerance: 8-bit rounding
    assert np.abs(merged - pixels()).max() > 20  # and the adapters do change the image


def test_imported_loha_and_lokr_resize_as_lora_layers(tmp_path, layout):
    library = AdapterLibrary(tmp_path, layout)
    shapes = {
        k: s for k, s in layout.shapes.items() if k.startswith("unet.") and k.endswith(("to_q", "conv1"))
    }
    full = max(min(shape[0], int(np.prod(shape[1:]))) for shape in shapes.values())  # keeps every layer whole
    for algorithm, (tensors, deltas) in (
        ("LoHa", ff.loha_layers(shapes, rank=2, seed=3, tucker_conv=False)),
        ("LoKr", ff.lokr_layers(shapes, rank=2, seed=4)),
    ):
        library.import_file(ff.save(tmp_path / f"{algorithm}.x.safetensors", tensors), name=algorithm)
        resize_in_library(library, algorithm, f"{algorithm}-lora", rank=full)
        resized = library.read(f"{algorithm}-lora")
        assert resized.source_format == "kohya LoRA"
        for key, want in deltas.items():
            got = resized.layers[key].delta()
            assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), (algorithm, key)


def header(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_cli_resize_and_merge_write_new_adapters_that_say_what_they_came_from(library, tiny_model, capsys):
    root = str(library.root)
    code, out, err = cli(
        capsys, "adapters", "--adapters-dir", root, "resize", "a", "--rank", "2", "--as", "a-2"
    )
    assert code == 0, err
    assert "a (rank 6) -> a-2" in out and "file size" in out and "unet." in out
    layers = len(library.read("a").layers)
    assert "\rresize: 100%" in err and f"{layers}/{layers}" in err  # progress on stderr, not stdout
    assert f"{layers}/{layers}" not in out
    made = header(library.path_of("a-2"))
    assert made["sdlora.made_from"] == "a resized to rank 2" and made["ss_network_dim"] == "2"
    assert made["sdlora.trigger_word"] == "trig1" and "sdlora.train_config" not in made
    code, out, err = cli(
        capsys, "adapters", "merge", "a:0.7", "b:0.3", "--as", "ab-2", "--rank", "2",
        "--adapters-dir", root, "--base-model", str(tiny_model),
    )  # fmt: skip
    assert code == 0, err
    assert "ΔW's Frobenius norm retained" in out and "inputs together" in out
    made = header(library.path_of("ab-2"))
    assert made["sdlora.made_from"] == "merge of a x 0.7 + b x 0.3, SVD to rank 2"
    assert made["sdlora.trigger_word"] == "trig1, trig2"
    assert (
        "rank 2" in cli(capsys, "adapters", "--adapters-dir", root, "list")[1].split("ab-2")[1].split("\n")[0]
    )
    code, out, err = cli(
        capsys,
        "adapters",
        "resize",
        "a",
        "--keep",
        "0.9",
        "--as",
        "a-2",
        "--overwrite",
        "--adapters-dir",
        root,
        "--quiet",
    )
    assert code == 0 and err == "", err
    assert header(library.path_of("a-2"))["sdlora.made_from"] == "a resized to 90% of each layer's norm"


@pytest.mark.parametrize(
    "args, words",
    [
        (("resize", "a", "--rank", "2", "--as", "b"), "an adapter named 'b' already exists"),
        (("resize", "a", "--keep", "0.9", "--ratio", "0.1", "--as", "new"), "not both"),
        (("resize", "nobody", "--rank", "2", "--as", "new"), "no adapter named 'nobody'"),
        (("merge", "a:0.5", "b:nan", "--as", "new"), "b: weight nan is not a finite number"),
        (("merge", "a:x", "--as", "new"), "expected NAME:WEIGHT"),
    ],
)
def test_cli_refuses_in_one_line_and_writes_nothing(library, capsys, args, words):
    before = sorted(p.name for p in library.root.iterdir())
    code, _, err = cli(capsys, "adapters", "--adapters-dir", str(library.root), *args)
    assert code == 2 and words in err and err.count("\n") == 1
    assert sorted(p.name for p in library.root.iterdir()) == before


def tiny_pipeline(family: str, folder):
    from tiny_models import build_tiny_sdxl_pipeline
    from tiny_transformers import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    if family == "sdxl":
        return build_tiny_sdxl_pipeline()
    return (build_tiny_flux_pipeline if family == "flux" else build_tiny_sd3_pipeline)(folder)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_every_family_resizes_and_merges_through_its_own_file_names(family, tmp_path):
    """SDXL (two text encoders), SD3 and Flux.1 (transformer names, fused projections) alike: at full rank
    a resize and a merge of an adapter with itself give back its ΔW after the library's write and read."""
    layout = reference_from_pipeline(tiny_pipeline(family, tmp_path / "tokenizers"))
    assert layout.family == family
    keys = sorted(layout.shapes)[:: max(1, len(layout.shapes) // 16)]
    layers = {}
    for i, key in enumerate(keys):
        shape, rank, g = layout.shapes[key], 2 + i % 3, torch.Generator().manual_seed(i)
        down = torch.randn(rank, *shape[1:], generator=g) * 0.3
        layers[key] = LoraLayer(
            down, torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=g), 2.0
        )
    library = AdapterLibrary(tmp_path / "lib", layout)
    source = Adapter(layers, {"sdlora.family": family})
    write_adapter(library.path_of("f"), source, "kohya", family=family, blocks=layout.blocks)
    source = library.read("f")  # what the file holds (a fused projection may be split into its parts)
    resize_in_library(library, "f", "f-full", rank=4)
    merge_in_library(library, [("f", 0.5), ("f-full", 0.5)], "f-same")
    for name in ("f-full", "f-same"):
        got = library.read(name)
        assert set(got.layers) == set(source.layers)
        for key, layer in source.layers.items():
            want = layer.delta()
            assert float((got.layers[key].delta() - want).abs().max()) <= 1e-5 * float(want.abs().max()), key
    other = Adapter({"unet.x": LoraLayer(torch.ones(1, 4), torch.ones(4, 1), 1.0)}, {"sdlora.family": "sd1"})
    with pytest.raises(SdloraError, match="different model families"):
        merge([(source, 1.0), (other, 1.0)], names=["f", "s"])
