"""`python -m sdlora train` end to end, as a script or server would run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli, draw_concept
from tiny_transformers import tiny_flux_model  # noqa: F401 - a fixture

from sdlora.cli import build_parser, config_from_args
from sdlora.library.formats import read_adapter, read_metadata
from sdlora.library.formats.adapter import ModelLayout
from sdlora.models.families import family_named
from sdlora.models.loading import inspect_pipeline, load_pipeline

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "sdlora", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def test_train_end_to_end(tiny_model, concept_dir, tmp_path, capsys):
    out = tmp_path / "lib"
    result = run_cli(
        "train",
        "--base-model",
        str(tiny_model),
        "--images",
        str(concept_dir),
        "--output",
        str(out),
        "--name",
        "cli-run",
        "--trigger",
        "sks",
        "--steps",
        "4",
        "--rank",
        "4",
        "--alpha",
        "2",
        "--lr",
        "1e-3",
        "--resolution",
        "32",
        "--checkpoint-every",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert "finished step 4" in result.stdout
    meta = read_metadata(out / "cli-run.safetensors")
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_steps"] == "4"
    assert (out / "cli-run.config.json").is_file()

    # The saved config reproduces the run; flags on the line override it; resume continues (in this
    # process: the real process's console was checked above).
    code, printed, errors = cli(
        capsys, "train", "--config", str(out / "cli-run.config.json"), "--steps", "6", "--resume", "latest"
    )
    assert code == 0, errors
    assert "resuming at step 4" in printed + errors
    assert read_metadata(out / "cli-run.safetensors")["ss_steps"] == "6"


def test_user_errors_are_one_line_and_exit_nonzero(tmp_path, concept_dir, capsys):
    result = run_cli("train", "--base-model", str(tmp_path / "missing-model"), "--images", str(concept_dir))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"stpes": 5}')
    code, _, errors = cli(capsys, "train", "--config", str(bad))
    assert code == 2 and "unknown setting(s) stpes" in errors


def test_help_explains_every_flag():
    text = build_parser().parse_args  # noqa: F841 - the parser must build
    result = run_cli("train", "--help")
    for flag in (
        "--base-model",
        "--images",
        "--output",
        "--name",
        "--trigger",
        "--steps",
        "--rank",
        "--alpha",
        "--lr",
        "--resolution",
        "--batch-size",
        "--mixed-precision",
        "--checkpoint-every",
        "--resume",
        "--config",
    ):
        assert flag in result.stdout


def test_flags_override_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('base_model = "m"\nsteps = 10\n[lora]\nrank = 16\nalpha = 8.0\n[data]\nimages = "d"\n')
    args = build_parser().parse_args(["train", "--config", str(path), "--rank", "4", "--no-flip"])
    config = config_from_args(args)
    assert (config.steps, config.lora.rank, config.lora.alpha, config.data.flip) == (10, 4, 8.0, False)


# kohya's ss_base_model_version of each tiny model's family. One UNet and one transformer family train
# in two processes: what is shared between processes (the gradients, the one save) is the same code
# for every family; a family's own step is tested in one process (test_families, test_transformer_training).
KOHYA_VERSIONS = {"tiny_model": "sd_v1", "tiny_flux_model": "flux1"}


@pytest.mark.parametrize("model", list(KOHYA_VERSIONS))
def test_two_process_run_writes_exactly_one_adapter(model, request, concept_dir, tmp_path):
    """Two CPU processes over gloo (torchrun), SD 1.x and Flux.1: gradients are shared, only the
    main process saves, and the adapter loads back onto its base model."""
    tiny_model = request.getfixturevalue(model)
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "sdlora",
            "train",
            "--base-model",
            str(tiny_model),
            "--images",
            str(concept_dir),
            "--output",
            str(out),
            "--name",
            "ddp",
            "--steps",
            "3",
            "--resolution",
            "32",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    adapters = sorted(p.name for p in out.glob("*.safetensors"))
    assert adapters == ["ddp.safetensors"]
    header = read_metadata(out / "ddp.safetensors")
    assert header["sdlora.processes"] == "2"
    assert header["ss_base_model_version"] == KOHYA_VERSIONS[model]
    assert result.stdout.count("finished step 3") == 1
    pipeline = load_pipeline(str(tiny_model))
    family = inspect_pipeline(pipeline).family
    adapter = read_adapter(out / "ddp.safetensors", ModelLayout.of(pipeline, family))
    denoiser = family_named(family).denoiser
    assert adapter.layers and all(key.startswith(denoiser + ".") for key in adapter.layers)


@pytest.fixture(scope="module")
def library_with_one(tiny_model, tmp_path_factory) -> Path:
    """A library holding adapter 'one', trained by `sdlora train` for 2 steps; tests work on copies."""
    from sdlora.cli import main

    root = tmp_path_factory.mktemp("cli-library")
    images = root / "concept"
    images.mkdir()
    for i in range(4):
        draw_concept(images / f"img{i}.png", i)
    lib = root / "lib"
    flags = ["--images", str(images), "--output", str(lib), "--name", "one", "--steps", "2"]
    assert main(["train", "--base-model", str(tiny_model), *flags, "--resolution", "32", "--quiet"]) == 0
    return lib


def test_generate_and_adapters_commands(tiny_model, library_with_one, tmp_path, capsys):
    lib = shutil.copytree(library_with_one, tmp_path / "lib")
    code, out, _ = cli(capsys, "adapters", "--adapters-dir", str(lib), "list")
    assert code == 0 and out.startswith("one\tsd1\trank 8")

    kohya = tmp_path / "exported" / "one-kohya.safetensors"
    code, _, err = cli(
        capsys,
        "adapters",
        "--adapters-dir",
        str(lib),
        "export",
        "one",
        "--format",
        "kohya",
        "--out",
        str(kohya),
    )
    assert code == 0, err
    assert any(k.startswith("lora_unet_") for k in read_metadata_keys(kohya))
    code, _, err = cli(
        capsys,
        "adapters",
        "--adapters-dir",
        str(lib),
        "--base-model",
        str(tiny_model),
        "import",
        str(kohya),
        "--name",
        "two",
    )
    assert code == 0, err
    assert cli(capsys, "adapters", "--adapters-dir", str(lib), "rename", "two", "deux")[0] == 0

    out_png = tmp_path / "img.png"
    code, _, err = cli(
        capsys,
        "generate",
        "--base-model",
        str(tiny_model),
        "--adapters-dir",
        str(lib),
        "--lora",
        "one:0.8",
        "--lora",
        "deux:-0.3",
        "--prompt",
        "sks",
        "--seed",
        "3",
        "--steps",
        "2",
        "--out",
        str(out_png),
    )
    assert code == 0, err
    from PIL import Image

    assert "<lora:one:0.8> <lora:deux:-0.3>" in Image.open(out_png).info["parameters"]
    code, _, err = cli(
        capsys,
        "generate",
        "--base-model",
        str(tiny_model),
        "--adapters-dir",
        str(lib),
        "--lora",
        "nope",
        "--prompt",
        "x",
        "--out",
        str(out_png),
    )
    assert code == 2 and "no adapter named 'nope'" in err
    assert cli(capsys, "adapters", "--adapters-dir", str(lib), "delete", "deux")[0] == 0
    assert cli(capsys, "adapters", "--adapters-dir", str(lib), "list")[1].count("\n") == 1


def read_metadata_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def test_library_options_after_the_verb_and_foreign_files(tiny_model, library_with_one, tmp_path, capsys):
    """`adapters export NAME --adapters-dir DIR` works as people type it; a diffusers-written file comes in;
    a refused one is one line on stderr and exit 2, never a traceback."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file

    lib = shutil.copytree(library_with_one, tmp_path / "lib")
    out = tmp_path / "one-diffusers.safetensors"
    code, _, err = cli(
        capsys,
        "adapters",
        "export",
        "one",
        "--format",
        "diffusers",
        "--out",
        str(out),
        "--adapters-dir",
        str(lib),
    )
    assert code == 0, err
    peft = {k.removeprefix("unet."): v for k, v in load_file(str(out)).items()}
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "dl"),
        unet_lora_layers=convert_state_dict_to_diffusers(peft),
        weight_name="pytorch_lora_weights.safetensors",
    )
    code, printed, err = cli(
        capsys,
        "adapters",
        "import",
        str(tmp_path / "dl" / "pytorch_lora_weights.safetensors"),
        "--name",
        "from-diffusers",
        "--adapters-dir",
        str(lib),
        "--base-model",
        str(tiny_model),
    )
    assert code == 0, err
    assert printed.strip().endswith("from-diffusers.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    code, _, err = cli(
        capsys, "adapters", "import", str(tmp_path / "bad.safetensors"), "--adapters-dir", str(lib)
    )
    assert code == 2 and err.count("\n") == 1 and "bad.safetensors" in err and "Traceback" not in err


def test_train_and_generate_without_base_model_use_the_demo_model_and_the_apps_library(
    tmp_path, monkeypatch, capsys
):
    """The CLI's defaults are the app's: the demo model, and the `adapters` library `generate` and the app read."""
    import app

    monkeypatch.chdir(tmp_path)
    star = REPO / "assets" / "concepts" / "star"
    code, out, err = cli(
        capsys,
        "train",
        "--images",
        str(star),
        "--name",
        "star",
        "--steps",
        "1",
        "--no-final-preview",
        "--quiet",
    )
    assert code == 0, err
    assert (tmp_path / "adapters" / "star.safetensors").is_file()
    saved = json.loads((tmp_path / "adapters" / "star.config.json").read_text())
    assert saved["base_model"] == str(REPO / "assets" / "demo-model") and saved["data"]["resolution"] == 64
    assert Path(app.parse_args([]).adapters_dir).resolve() == tmp_path / "adapters"
    code, out, err = cli(
        capsys, "generate", "--prompt", "sks", "--lora", "star", "--steps", "1", "--out", "a.png"
    )
    assert code == 0, err
    assert (tmp_path / "a.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train"], "no concept images given"),
        (["train", "--images", "x", "--rank", "0"], "rank must be a whole number from 1 to"),
        (["generate", "--out", "a.png"], "the following arguments are required: --prompt"),
        (["queue", "add", "--steps", "5"], "no concept images given"),
    ],
)
def test_a_missing_option_is_refused_before_anything_heavy_loads(args, message):
    code = (
        "import sys\nfrom sdlora.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
        "except SystemExit as exc:\n    code = exc.code\n"
        "heavy = [m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules]\n"
        "print('heavy:', heavy)\nsys.exit(code)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "heavy: []" in result.stdout
