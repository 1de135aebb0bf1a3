"""A shared server no client can break: hostile files, values, sizes and names are refused in one line,
and nothing already saved is lost."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from conftest import cli
from safetensors.torch import save_file

from sdlora.config import (
    AdapterWeight,
    DataConfig,
    GenerateConfig,
    TrainConfig,
    check_adapter_name,
)
from sdlora.errors import AdapterFormatError, CheckpointError, ConfigError, SdloraError
from sdlora.events import Finished, Started, Step, StopFlag
from sdlora.library.store import AdapterLibrary, reference_from_pipeline, safe_name
from sdlora.models.loading import load_pipeline
from sdlora.training.data import load_concept_images
from sdlora.training.loop import train

STEM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
DIFFUSERS_STEM = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def one_line(exc_info, *names: str) -> str:
    """The refusal is one short line that names what it refuses."""
    message = str(exc_info.value)
    assert "\n" not in message and len(message) < 300, message
    for name in names:
        assert name in message, (name, message)
    return message


def kohya_file(path, down, up, alpha=4.0, metadata=None):
    save_file(
        {
            f"{STEM}.lora_down.weight": down,
            f"{STEM}.lora_up.weight": up,
            f"{STEM}.alpha": torch.tensor(alpha),
        },
        str(path),
        metadata=metadata,
    )
    return path


@pytest.fixture(scope="module")
def reference(tiny_model):
    return reference_from_pipeline(load_pipeline(str(tiny_model)))


@pytest.fixture()
def library(tmp_path, reference):
    """A library that already holds one good adapter, which no refusal may touch."""
    out, inn = reference.shapes[DIFFUSERS_STEM]
    lib = AdapterLibrary(tmp_path / "lib", reference)
    lib.import_file(
        kohya_file(tmp_path / "good.safetensors", torch.randn(4, inn) * 0.01, torch.randn(out, 4) * 0.01)
    )
    return lib


def library_files(lib: AdapterLibrary) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in lib.root.iterdir() if p.is_file()}


# 1. Non-finite and absurd values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "dtype", "words"),
    [
        (float("nan"), torch.float32, "NaN or infinite"),
        (float("inf"), torch.float16, "NaN or infinite"),
        (float("nan"), torch.float8_e4m3fn, "NaN or infinite"),
        (1e12, torch.float32, "1e+12"),
        (2e4, torch.bfloat16, "past the 10000"),
    ],
)
def test_non_finite_or_absurd_weights_are_refused_by_import_and_by_reading(
    library, reference, tmp_path, value, dtype, words
):
    out, inn = reference.shapes[DIFFUSERS_STEM]
    bad = kohya_file(tmp_path / "bad.safetensors", torch.full((4, inn), value).to(dtype), torch.zeros(out, 4))
    before = library_files(library)
    with pytest.raises(AdapterFormatError) as refused:
        library.import_file(bad)
    one_line(refused, "bad.safetensors", words)
    assert library_files(library) == before
    # A file copied straight into the library folder is refused when it is read, not used.
    (library.root / "copied.safetensors").write_bytes(bad.read_bytes())
    with pytest.raises(AdapterFormatError) as refused:
        library.read("copied")
    one_line(refused, "copied.safetensors", words)
    assert library.read("good").layers  # the good one still reads


def test_nan_alpha_is_refused_through_the_cli(library, reference, tmp_path, tiny_model, capsys):
    out, inn = reference.shapes[DIFFUSERS_STEM]
    bad = kohya_file(
        tmp_path / "nan-alpha.safetensors", torch.zeros(4, inn), torch.zeros(out, 4), float("nan")
    )
    before = library_files(library)
    code, _, err = cli(
        capsys,
        "adapters",
        "import",
        str(bad),
        "--adapters-dir",
        str(library.root),
        "--base-model",
        str(tiny_model),
    )
    assert code == 2 and err.count("\n") == 1 and "nan-alpha.safetensors" in err and "NaN" in err
    assert library_files(library) == before


# 2. Malformed files: one line, never a traceback -----------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "words"),
    [
        ({f"{DIFFUSERS_STEM}.lora_A.weight": torch.zeros(4, 16)}, "no up weight"),
        (
            {
                f"{STEM}.hada_w1_a": torch.zeros(16, 2),
                f"{STEM}.hada_w1_b": torch.zeros(2, 16),
                f"{STEM}.hada_w2_a": torch.zeros(16, 2),
            },
            "no hada_w2_b tensor",
        ),
        (
            {
                f"{STEM}.hada_w1_a": torch.zeros(16, 2),
                f"{STEM}.hada_w1_b": torch.zeros(2, 16),
                f"{STEM}.hada_w2_a": torch.zeros(15, 2),
                f"{STEM}.hada_w2_b": torch.zeros(2, 16),
            },
            "do not fit together",
        ),
        (
            {f"{STEM}.lora_down.weight": torch.zeros(4, 16), f"{STEM}.lora_up.weight": torch.zeros(16, 5)},
            "ranks differ",
        ),
        (
            {f"{STEM}.lora_down.weight": torch.zeros(0, 16), f"{STEM}.lora_up.weight": torch.zeros(16, 0)},
            "ranks differ",
        ),
        (
            {f"{STEM}.lokr_w1": torch.zeros(4, 4), f"{STEM}.lokr_w2_a": torch.zeros(4, 2)},
            "no lokr_w2_b tensor",
        ),
        (
            {
                f"{STEM}.lora_down.weight": torch.zeros(4, 16),
                f"{STEM}.lora_up.weight": torch.zeros(16, 4),
                f"{STEM}.alpha": torch.tensor([1.0, 2.0]),
            },
            "not one number",
        ),
    ],
)
@pytest.mark.parametrize("checked", [True, False])
def test_malformed_layers_are_one_line_refusals(library, tmp_path, tensors, words, checked):
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path))
    if not checked:
        library.reference = None
    before = library_files(library)
    with pytest.raises(AdapterFormatError) as refused:
        library.import_file(path)
    one_line(refused, "broken.safetensors", words)
    assert library_files(library) == before


def test_cli_import_without_base_model_checks_against_the_default_model(tmp_path, capsys):
    """README: SDXL files and wrong shapes are refused; without --base-model the app's default model is the check."""
    lib = tmp_path / "lib"
    xl = kohya_file(
        tmp_path / "xl.safetensors",
        torch.zeros(4, 64),
        torch.zeros(64, 4),
        metadata={"ss_base_model_version": "sdxl_base_v1-0"},
    )
    wrong = kohya_file(tmp_path / "wrong.safetensors", torch.zeros(4, 777), torch.zeros(64, 4))
    for path, words in ((xl, "sdxl_base_v1-0"), (wrong, "different base model")):
        code, _, err = cli(capsys, "adapters", "import", str(path), "--adapters-dir", str(lib))
        assert code == 2 and err.count("\n") == 1 and path.name in err and words in err, err
        assert "default base model" in err and "Traceback" not in err
    assert not list(lib.glob("*.safetensors"))


def test_wrong_shape_file_copied_into_the_library_is_one_line_in_the_cli(tmp_path, capsys):
    lib = tmp_path / "lib"
    lib.mkdir()
    kohya_file(lib / "odd.safetensors", torch.zeros(4, 16), torch.zeros(16, 3))
    save_file(
        {f"{STEM}.lora_down.weight": torch.tensor(1.0), f"{STEM}.lora_up.weight": torch.zeros(16, 4)},
        str(lib / "scalar.safetensors"),
    )
    code, _, err = cli(
        capsys,
        "adapters",
        "export",
        "odd",
        "--out",
        str(tmp_path / "x.safetensors"),
        "--adapters-dir",
        str(lib),
    )
    assert code == 2 and err.count("\n") == 1 and "odd.safetensors" in err and "Traceback" not in err
    code, out, err = cli(capsys, "adapters", "list", "--adapters-dir", str(lib))
    # Both files are damaged: each is listed with a note saying why, never as a usable adapter.
    assert code == 0 and "Traceback" not in err and "scalar" not in out
    assert "damaged: scalar.safetensors" in err and "damaged: odd.safetensors" in err


# 3. Generation values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf"), 1e15, 10.5, "1", True])
def test_adapter_weight_must_be_finite_and_bounded(weight):
    with pytest.raises(ConfigError) as refused:
        AdapterWeight("star", weight)
    one_line(refused, "weight of adapter 'star'")


def test_prompt_tag_weights_are_bounded_too():
    from sdlora.generation.generate import parse_prompt

    with pytest.raises(ConfigError) as refused:
        parse_prompt("a star <lora:star:15>")
    one_line(refused, "'star'")
    assert parse_prompt("a star <lora:star:-10>")[1][0].weight == -10


@pytest.mark.parametrize("guidance", [float("nan"), float("inf"), -1.0, 31.0, "7"])
def test_guidance_must_be_finite_and_in_range(guidance):
    with pytest.raises(ConfigError) as refused:
        GenerateConfig(prompt="x", guidance=guidance).validate()
    one_line(refused, "guidance")


def test_sane_generation_values_pass():
    GenerateConfig(
        prompt="x", guidance=0.0, adapters=(AdapterWeight("a", -10), AdapterWeight("b", 2.5))
    ).validate(64)
    GenerateConfig(prompt="x", guidance=30, width=128, height=64).validate(64)


# 4. Sizes -----------------------------------------------------------------------------------------------


def test_generation_size_is_bounded_by_the_native_side_and_a_pixel_cap():
    with pytest.raises(ConfigError) as refused:
        GenerateConfig(prompt="x", width=1024, height=64).validate(native_resolution=64)
    one_line(refused, "1024x64", "native 64 px", "128")
    with pytest.raises(ConfigError) as refused:  # without the model, the hard cap still holds
        GenerateConfig(prompt="x", width=4096, height=4096).validate()
    one_line(refused, "4096x4096", "4,194,304")
    GenerateConfig(prompt="x", width=2048, height=2048).validate(native_resolution=1024)


def test_training_resolution_is_bounded(tiny_config):
    with pytest.raises(ConfigError) as refused:
        DataConfig(images="d", resolution=4096).validate()
    one_line(refused, "training resolution", "4096x4096")
    config = tiny_config.replace(data=DataConfig(images=tiny_config.data.images, resolution=128))
    with pytest.raises(ConfigError) as refused:  # the tiny model is 32 px: at most 64
        train(config)
    one_line(refused, "training resolution", "native 32 px")
    assert not any(Path(config.output_dir).rglob("*.safetensors"))


# 5. Names -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "CON",
        "con",
        "nul.txt",
        "COM1",
        "LPT9",
        "aux .png",
        "star.",
        "star ",
        " star",
        ".hidden",
        "a<b",
        "a:b",
        "a|b",
        "tab\there",
        "x" * 101,
        "é" * 101,
        "",
    ],
)
def test_names_that_are_not_portable_file_names_are_refused(name):
    with pytest.raises(ConfigError) as refused:
        check_adapter_name(name)
    one_line(refused, "adapter name")
    with pytest.raises(SdloraError) as refused:
        TrainConfig(base_model="m", name=name, data=DataConfig(images="d")).validate()
    one_line(refused)


@pytest.mark.parametrize("name", ["star", "my star v2", "console", "com10", "lpt", "x" * 100, "ünïcode-✓"])
def test_ordinary_names_pass(name):
    check_adapter_name(name)
    assert safe_name(name) == name


def test_library_refuses_reserved_and_long_names_and_keeps_what_it_has(library, tmp_path):
    before = library_files(library)
    source = library.get("good").path
    for wanted in ("CON", "nul.txt", "lpt1.safetensors", "y" * 300):
        with pytest.raises(SdloraError) as refused:
            library.import_file(source, name=wanted)
        one_line(refused)
        with pytest.raises(SdloraError):
            library.rename("good", wanted)
    assert library_files(library) == before


def test_train_with_a_300_character_name_is_a_config_error(tiny_config):
    from sdlora.settings import train_config_from

    with pytest.raises(ConfigError) as refused:  # the one road every door takes to train()
        train_config_from({**tiny_config.to_dict(), "name": "n" * 300})
    one_line(refused, "300 characters")


# 6, 7, 9. A run: an import that takes its name, a Latin-1 caption, a stop before the first step -----------


def test_an_adapter_imported_under_the_running_name_is_kept(tiny_config, library, concept_dir):
    (concept_dir / "img1.txt").write_bytes("a caf\xe9 circle".encode("cp1252"))
    lib = AdapterLibrary(tiny_config.output_dir)
    config = tiny_config.replace(steps=2)
    events = []

    def import_during_the_run(event):
        events.append(event)
        if isinstance(event, Step) and event.step == 1:
            lib.import_file(library.get("good").path, name="tiny")

    result = train(config, on_event=import_during_the_run)
    imported = lib.get("tiny").path
    assert imported.read_bytes() == library.get("good").path.read_bytes()  # the import survived
    assert result.adapter_path.name == "tiny-2.safetensors" and result.adapter_path.is_file()
    assert result.config_path.name == "tiny-2.config.json" and result.config_path.is_file()
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.adapter_path == str(result.adapter_path)
    assert "tiny-2.safetensors" in finished.message and "\n" not in finished.message
    # 7: the Latin-1 caption was used, and the run's first message says how it was read.
    (started,) = [e for e in events if isinstance(e, Started)]
    assert not started.skipped_files and any("img1.txt" in n and "Windows-1252" in n for n in started.notices)


def test_latin1_caption_is_read_and_reported(concept_dir):
    (concept_dir / "img2.txt").write_bytes(b"caf\xe9 \x81")  # 0x81 is undefined in cp1252: Latin-1 then
    (concept_dir / "img1.txt").write_bytes("na\xefve".encode("cp1252"))
    concepts = load_concept_images(DataConfig(images=str(concept_dir), trigger_word="", resolution=32))
    captions = {c.path.name: c.caption for c in concepts.images}
    assert captions["img1.png"] == "naïve" and captions["img2.png"].startswith("café")
    assert not concepts.problems
    notes = {n.path.name: str(n) for n in concepts.notices}
    assert "Windows-1252" in notes["img1.txt"] and "read as Latin-1" in notes["img2.txt"]
    assert "img0.txt" not in notes  # UTF-8 captions say nothing


def test_stop_before_the_first_step_saves_nothing(tiny_config):
    stop = StopFlag()
    stop.request()
    events = []
    result = train(tiny_config, stop=stop, on_event=events.append)
    assert result.adapter_path is None and result.steps == 0 and result.stopped_early
    assert not any(Path(tiny_config.output_dir).rglob("*.safetensors"))
    assert AdapterLibrary(tiny_config.output_dir).list().adapters == []
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.adapter_path == ""
    assert "no adapter was saved" in finished.message


# 8. Resume with changed settings ------------------------------------------------------------------------


def test_resume_refuses_changed_settings_and_lists_them(tiny_config, tmp_path):
    config = tiny_config.replace(steps=2)
    first = train(config)
    saved = first.adapter_path.read_bytes()
    other_images = tmp_path / "other"
    other_images.mkdir()
    changed = config.replace(
        learning_rate=5e-3,
        seed=8,
        steps=4,
        data=DataConfig(images=str(other_images), trigger_word="sks", resolution=32),
    )
    with pytest.raises(CheckpointError) as refused:
        train(changed, resume="latest")
    message = one_line(refused, "learning_rate 0.001 -> 0.005", "seed 7 -> 8", "data.images (changed)")
    assert "steps" not in message.split("(only")[0]  # steps may change, so it is not listed
    assert first.adapter_path.read_bytes() == saved
    assert train(config.replace(steps=3, preview_every=0, checkpoint_every=1), resume="latest").steps == 3


# 10. Leftovers of killed writes -------------------------------------------------------------------------


def test_stale_temp_files_are_cleaned_when_the_library_opens(library):
    root = library.root
    old = time.time() - 3600
    stale = root / ".star.safetensors.ab12cd_9.tmp"
    fresh = root / ".moon.safetensors.zz99yy00.tmp"
    foreign = root / "notes.tmp"
    nested = root / ".exports" / "kohya" / ".good.safetensors.q1w2e3r4.tmp"
    partial = root / ".runs" / "star" / "checkpoints" / ".step-000004.partial"
    complete = root / ".runs" / "star" / "checkpoints" / "step-000002"
    nested.parent.mkdir(parents=True)
    partial.mkdir(parents=True)
    complete.mkdir(parents=True)
    (partial / "lora.safetensors").write_bytes(b"half")
    for path in (stale, fresh, foreign, nested):
        path.write_bytes(b"half a file")
    for path in (stale, foreign, nested, partial, complete):
        os.utime(path, (old, old))
    reopened = AdapterLibrary(root)
    assert not stale.exists() and not nested.exists() and not partial.exists()
    assert fresh.exists() and foreign.exists() and complete.exists()  # young, not ours, or complete: kept
    assert set(reopened.removed_leftovers) == {stale, nested, partial}
    assert [a.name for a in reopened.list().adapters] == ["good"]
