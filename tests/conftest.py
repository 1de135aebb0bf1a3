"""Shared fixtures: tiny models built once per session, the app servers the app tests share, concept images."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tiny models gain nothing from a second thread, and OpenMP threads that outnumber free
# cores spin-wait: a 30 ms step took 8 s while another process used both cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Where a test asks for more threads (the thread-count tests, the demo build), idle OpenMP threads sleep
# instead of spinning: with the other worker on the other core, a 1-step run at 2 threads took 40 s
# spinning and 9 s passive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from app_server import DEMO_MODEL, serving_model  # noqa: E402
from chromium import browser  # noqa: E402, F401 - the browser tests' Chromium, one per test module
from PIL import Image, ImageDraw  # noqa: E402
from tiny_models import IMAGE_SIZE, save_tiny_model, save_tiny_sdxl_model  # noqa: E402

torch.set_num_threads(1)  # tiny models run fastest on one thread, and CI has two cores

# `make test` hands whole files to three workers in collection order (--dist loadfile
# --no-loadscope-reorder). The files that take a minute or more (its --durations list names them),
# longest first, go first, so that the workers end together rather than one running a long file
# alone at the end while the others wait. The rest keep pytest's order.
RUN_FIRST = (
    "test_demo_learning.py",
    "test_cli.py",
    "test_transformer_objective.py",
    "test_browser.py",
    "test_browser_first_hour.py",
    "test_train.py",
    "test_entry_points.py",
    "test_app.py",
    "test_app_api.py",
    "test_queue.py",
    "test_demo_build.py",
    "test_validation_browser.py",
    "test_transformer_training.py",
    "test_formats.py",
    "test_browser_flux.py",
    "test_app_queue.py",
    "test_demo_evaluate.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long files first (a stable sort: the tests of a file keep their order)."""
    first = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(RUN_FIRST)))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A diffusers folder of a tiny epsilon-prediction SD-1.x-shaped model with random weights."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-eps", "epsilon")


@pytest.fixture(scope="session")
def tiny_vpred_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-v", "v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory) -> Path:
    """A diffusers folder of a tiny SDXL (two text encoders, text_time conditioning) with random weights."""
    return save_tiny_sdxl_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_app(tiny_model, tmp_path_factory):
    """The app over the tiny model, shared by the app tests that only add adapters and finished jobs.

    Its concepts folder is assets/concepts, as in a checkout. Tests that need an empty queue, another
    library or another base model start their own server (app_server.serving).
    """
    with serving_model(str(tiny_model), tmp_path_factory.mktemp("tiny-app")) as served:
        yield served


@pytest.fixture(scope="session")
def demo_app(tmp_path_factory):
    """The app over the shipped demo model, whose default captioner (the demo one) needs no weights."""
    if not (DEMO_MODEL / "model_index.json").exists():
        pytest.skip(f"no demo model at {DEMO_MODEL} (python -m sdlora.demo.build)")
    with serving_model(str(DEMO_MODEL), tmp_path_factory.mktemp("demo-app")) as served:
        yield served


def unet_output(unet, seed: int = 0) -> torch.Tensor:
    """The UNet's output on a fixed random latent, timestep pair and context: compares weights by behaviour."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 16, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (a subprocess per command would spend most of the time importing torch)."""
    from sdlora.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def draw_concept(path: Path, index: int, colour=(220, 30, 30)) -> Path:
    image = Image.new("RGB", (48, 40), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse([4 + index, 4, 30 + index, 30], fill=colour)
    image.save(path)
    return path


@pytest.fixture()
def concept_dir(tmp_path) -> Path:
    """Four small concept images, one with its own caption."""
    folder = tmp_path / "concept"
    folder.mkdir()
    for i in range(4):
        draw_concept(folder / f"img{i}.png", i)
    (folder / "img0.txt").write_text("a red circle")
    return folder


@pytest.fixture()
def tiny_config(tiny_model, concept_dir, tmp_path):
    """A TrainConfig for a quick run on the tiny model."""
    from sdlora.config import DataConfig, LoraSpec, TrainConfig

    return TrainConfig(
        base_model=str(tiny_model),
        output_dir=str(tmp_path / "out"),
        name="tiny",
        steps=6,
        learning_rate=1e-3,
        seed=7,
        data=DataConfig(images=str(concept_dir), trigger_word="sks", resolution=IMAGE_SIZE),
        lora=LoraSpec(rank=4, alpha=16.0),
    )
