"""One road from values to a TrainConfig: every door gives the same config, checked once, torch-free."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sdlora.assets import DEMO_MODEL, EXAMPLE_CONCEPTS
from sdlora.config import TrainConfig
from sdlora.errors import ConfigError
from sdlora.models.hub import is_hub_id, looks_like_path
from sdlora.settings import train_config_from

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=cwd
    )


def test_the_road_and_the_queue_import_no_torch():
    result = run_python(
        "import sys, sdlora.settings, sdlora.jobs.queue, sdlora.cli, sdlora.ui.fields; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'gradio') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    assert result.returncode == 0, result.stderr


def test_the_road_checks_once_and_names_the_setting():
    with pytest.raises(ConfigError, match="settings.lora: unknown setting.*rnak"):
        train_config_from({"lora.rnak": 4, "data.images": "d"})
    with pytest.raises(ConfigError, match="rank must be a whole number from 1 to"):
        train_config_from({"lora": {"rank": 0}, "data": {"images": "d"}})
    unchecked = train_config_from(
        {"lora.rank": 0}, validate=False
    )  # the estimate's view of half-typed widgets
    assert unchecked.lora.rank == 0 and unchecked.base_model == str(DEMO_MODEL)


def test_the_four_doors_give_equal_train_configs(tmp_path, monkeypatch, capsys):
    """The CLI, the Train tab's widgets, /train's settings object and `queue add` give one TrainConfig
    for the same values (each has its own copy of the images, and the queue adds checkpoints)."""
    import gradio as gr

    from sdlora.cli import build_parser, config_from_args, main
    from sdlora.jobs.queue import JobQueue
    from sdlora.ui import fields
    from sdlora.ui.studio import Studio
    from sdlora.ui.train_handlers import TrainHandlers, preset_fields
    from sdlora.ui.train_layout import layout

    images, library = EXAMPLE_CONCEPTS / "star", tmp_path / "adapters"
    given = {"name": "door", "trigger_word": "sks", "steps": 30, "rank": 4, "alpha": 2.0}
    given |= {"learning_rate": 1e-3, "preview_every": 6, "flip": True}
    flags = ["--images", str(images), "--output", str(library), "--name", "door", "--trigger", "sks"]
    flags += [
        "--steps",
        "30",
        "--rank",
        "4",
        "--alpha",
        "2",
        "--lr",
        "1e-3",
        "--preview-every",
        "6",
        "--flip",
    ]

    cli = config_from_args(build_parser().parse_args(["train", *flags]))

    studio = Studio(str(DEMO_MODEL), library, EXAMPLE_CONCEPTS, work_dir=tmp_path / "work")
    queued = []
    monkeypatch.setattr(
        studio, "queue_training", lambda config, files, captions, client="": queued.append(config)
    )
    handlers = TrainHandlers(studio)
    with gr.Blocks():
        widgets = layout(studio)
    *preset_values, preview_every, _ = handlers.fill_preset("Object")  # what a page shows after loading
    page = {name: fields.train_defaults()[name] for name in widgets.settings}
    page.update(zip(preset_fields(), preset_values, strict=True), preview_every=preview_every)
    handlers.queue_job([str(p) for p in sorted(images.iterdir())], None, None, **{**page, **given})
    settings_object = fields.nested(given)
    settings_object["data"]["images"] = str(images)  # a concept folder on the server
    handlers.queue_job(None, None, settings_object)
    widget, script = queued

    assert main(["queue", "add", *flags]) == 0
    job = JobQueue(library).jobs()[-1].train_config()
    assert job.checkpoint_every == 3  # the queue's own: a job without checkpoints gets ten

    def same_run(config: TrainConfig) -> TrainConfig:
        return config.replace(checkpoint_every=0, data=dataclasses.replace(config.data, images=""))

    assert same_run(cli) == same_run(widget) == same_run(script) == same_run(job)
    assert (cli.lora.rank, cli.batch_size, cli.data.resolution, cli.prior_loss_weight) == (4, 4, 64, 2.0)


@pytest.mark.parametrize(
    "source, hub",
    [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", True),
        ("Salesforce/blip-image-captioning-large", True),
        ("demo-model", False),  # hub.py said hub id, the studio said path: one word is a folder name
        ("org/name", False),  # "org" is a folder here: the studio said path, hub.py said hub id
        ("models/sd15.safetensors", False),  # a missing single file, not a repository
        ("a/b/c", False),
        ("./owner/name", False),
        ("~/name", False),
        ("/abs/name", False),
        ("owner/na me", False),
        ("owner/-name", False),
        ("owner/na..me", False),
    ],
)
def test_hub_id_or_path_has_one_rule(source, hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    assert is_hub_id(source) is hub and looks_like_path(source) is not hub


def test_a_failed_queue_write_keeps_the_queue_and_leaves_no_temp_file(tmp_path, monkeypatch):
    from sdlora.jobs.queue import JobQueue

    config = train_config_from({"data.images": str(EXAMPLE_CONCEPTS / "star"), "name": "one"})
    queue = JobQueue(tmp_path / "adapters")
    queue.add(config)
    before = queue.path.read_text()

    real_fsync, here = os.fsync, threading.current_thread()

    def disk_full(fd):  # only in this thread: another test's queue worker may still be polling
        if threading.current_thread() is not here:
            return real_fsync(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        queue.add(config.replace(name="two"))
    assert queue.path.read_text() == before and json.loads(before)["jobs"][0]["name"] == "one"
    assert not list(queue.folder.glob("*.tmp"))


def test_packaged_assets_are_found_from_any_working_folder(tmp_path):
    result = run_python(
        "from sdlora.assets import DEMO_MODEL, is_demo_model; from sdlora.ui.studio import Studio; "
        "s = Studio('x', 'lib'); print(is_demo_model(DEMO_MODEL), len(s.example_concepts()) > 0)",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


def test_the_loop_trusts_a_checked_config_and_a_queued_job_is_checked_when_read_back(
    tiny_config, tmp_path, monkeypatch
):
    from sdlora.jobs.queue import JobQueue
    from sdlora.training.loop import train

    queue = JobQueue(tmp_path / "library")
    queue.add(tiny_config)
    state = json.loads(queue.path.read_text())
    state["jobs"][0]["config"]["lora"]["rank"] = 0  # the queue file edited by hand
    queue.path.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="rank must be a whole number"):
        queue.jobs()[0].train_config()

    monkeypatch.setattr(TrainConfig, "validate", lambda self: pytest.fail("train() checked the config again"))
    assert train(tiny_config.replace(steps=1, final_preview=False)).steps == 1


def model_configs(folder: Path, transformer_class: str) -> Path:
    """A folder holding only the configs the road reads before loading (a transformer's and the VAE's)."""
    for part, config in (
        ("transformer", {"_class_name": transformer_class, "sample_size": 128}),
        ("vae", {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]}),
    ):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "setting,value,transformer",
    [
        ("min_snr_gamma", 5.0, "FluxTransformer2DModel"),
        ("noise_offset", 0.05, "SD3Transformer2DModel"),
        ("drop_t5", True, "FluxTransformer2DModel"),
    ],
)
def test_settings_that_mean_nothing_for_a_flow_family_are_refused_naming_them(
    setting, value, transformer, tmp_path
):
    model = model_configs(tmp_path / "model", transformer)
    with pytest.raises(ConfigError) as caught:
        train_config_from({"data.images": "d", setting: value}, base_model=str(model))
    message = str(caught.value)
    assert message.startswith(setting) and "\n" not in message


def test_transformer_settings_pass_where_they_mean_something_and_unet_models_ignore_them(tmp_path):
    sd3 = model_configs(tmp_path / "sd3", "SD3Transformer2DModel")
    config = train_config_from(
        {"data.images": "d", "drop_t5": True, "max_sequence_length": 256, "weighting_scheme": "mode"},
        base_model=str(sd3),
    )
    assert (config.drop_t5, config.max_sequence_length, config.weighting_scheme) == (True, 256, "mode")
    # a UNet model has no T5 and no flow matching: the settings are carried, and ignored
    assert train_config_from(
        {"data.images": "d", "max_sequence_length": 300, "min_snr_gamma": 5.0}
    ).min_snr_gamma
    with pytest.raises(ConfigError, match="max_sequence_length must be a whole number from 1 to 512"):
        train_config_from({"data.images": "d", "max_sequence_length": 1024}, base_model=str(sd3))
    with pytest.raises(ConfigError, match="weighting_scheme must be one of default, logit_normal"):
        train_config_from({"data.images": "d", "weighting_scheme": "lognorm"}, base_model=str(sd3))
