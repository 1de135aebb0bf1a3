"""Presets fill numbers the user can change; the demo model gets settings made for it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from sdlora.assets import DEMO_MODEL
from sdlora.cli import build_parser, config_from_args
from sdlora.config import TrainConfig, read_settings
from sdlora.errors import ConfigError
from sdlora.settings import train_config_from
from sdlora.training.estimate import captioning_seconds, estimate_training
from sdlora.training.presets import PRESETS, preset_for, preset_settings

DEMO = TrainConfig.from_dict(preset_settings("Demo"))  # the demo preset over the defaults


def test_demo_model_gets_demo_settings_when_no_flags_given():
    args = build_parser().parse_args(["train", "--base-model", str(DEMO_MODEL), "--images", "x"])
    config = config_from_args(args)
    assert (config.steps, config.learning_rate, config.data.resolution, config.lora.rank) == (
        DEMO.steps,
        DEMO.learning_rate,
        64,
        DEMO.lora.rank,
    )
    assert config.lora.extra_target_modules == DEMO.lora.extra_target_modules
    assert config.data.regularization_images == DEMO.data.regularization_images
    assert config.prior_loss_weight == DEMO.prior_loss_weight != 1.0  # the demo's weighting, not the default
    reg = Path(DEMO.data.regularization_images)
    assert len(list(reg.glob("*.png"))) == len(list(reg.glob("*.txt"))) > 0


def test_regularisation_images_given_by_the_user_win_over_the_demo_presets():
    args = build_parser().parse_args(
        [
            "train",
            "--base-model",
            str(DEMO_MODEL),
            "--images",
            "x",
            "--reg-images",
            "my-reg",
            "--prior-loss-weight",
            "0.5",
        ]
    )
    config = config_from_args(args)
    assert (config.data.regularization_images, config.prior_loss_weight) == ("my-reg", 0.5)
    assert config.data.resolution == 64  # the rest of the demo preset still applies


def test_flags_still_win_over_the_demo_preset():
    args = build_parser().parse_args(
        ["train", "--base-model", str(DEMO_MODEL), "--images", "x", "--steps", "7", "--rank", "2"]
    )
    config = config_from_args(args)
    assert (config.steps, config.lora.rank) == (7, 2)


def test_other_models_keep_generic_defaults():
    args = build_parser().parse_args(["train", "--base-model", "some/model", "--images", "x"])
    assert config_from_args(args).data.resolution == 512


def test_presets_are_partial_settings_read_as_strictly_as_a_config_file(monkeypatch):
    """Every preset reads cleanly; one with a misspelt field path or a wrong type is refused, naming it."""
    for name in PRESETS:
        assert read_settings(PRESETS[name], name) == preset_settings(name)
    monkeypatch.setitem(PRESETS, "Typo", {"lora.rnak": 4, "steps": 10})
    with pytest.raises(ConfigError, match="preset Typo.lora: unknown setting.*rnak"):
        preset_settings("Typo")
    monkeypatch.setitem(PRESETS, "Typo", {"steps": "many"})
    with pytest.raises(ConfigError, match="preset Typo: steps must be int"):
        train_config_from({"data.images": "d"}, base_model="m", preset="Typo")


def test_a_named_preset_sits_between_the_model_defaults_and_the_values_given():
    config = train_config_from(
        {"data.images": "d", "steps": 99}, base_model="m", preset="Style", native_resolution=768
    )
    assert (config.lora.rank, config.lora.alpha, config.steps, config.data.resolution) == (16, 16.0, 99, 768)
    assert preset_for(str(DEMO_MODEL), "Style") == "Demo"  # the demo model has one preset for every kind
    args = build_parser().parse_args(["train", "--base-model", "m", "--images", "d", "--preset", "Character"])
    with pytest.raises(ConfigError, match="resolution 0 means the base model's native size"):
        config_from_args(args)  # a model that says nothing before it loads: the user must say the size
    args = build_parser().parse_args(
        ["train", "--base-model", "m", "--images", "d", "--preset", "Character", "--resolution", "512"]
    )
    assert (config_from_args(args).lora.alpha, config_from_args(args).steps) == (8.0, 1200)


def test_presets_apply_and_estimate():
    config = train_config_from({"data.images": "d"}, base_model="m", preset="Style", native_resolution=768)
    assert (config.lora.rank, config.steps, config.data.resolution) == (16, 1500, 768)
    cpu = estimate_training(config, 860_000_000, None, "cpu")
    gpu = estimate_training(config, 860_000_000, None, "cuda")
    assert gpu.seconds < cpu.seconds and gpu.gpu_memory_gb and cpu.gpu_memory_gb is None
    assert "rough" in gpu.text and "GB" in gpu.text
    with_reg = estimate_training(
        config.replace(data=replace(config.data, regularization_images="r")), 860_000_000, None, "cpu"
    )
    assert with_reg.seconds > 1.5 * cpu.seconds  # twice the images per step


def test_estimate_counts_captioning_time():
    from sdlora.captioning.captioners import spec_of

    config = train_config_from({"data.images": "d"}, base_model="m", preset="Style", native_resolution=512)
    plain = estimate_training(config, 860_000_000, None, "cpu")
    demo = spec_of("demo")
    seconds = captioning_seconds(30, demo.seconds_per_image, on_gpu=False, needs_weights=bool(demo.source))
    captioned = estimate_training(config, 860_000_000, None, "cpu", captioning=(30, "demo", seconds))
    assert captioned.seconds == pytest.approx(plain.seconds + 30 * demo.seconds_per_image)
    assert "captioning 30 images with demo" in captioned.text and "captioning" not in plain.text
    # A weighted captioner moves to the GPU with the training; the demo one has no weights to move.
    assert captioning_seconds(30, 1.0, on_gpu=True, needs_weights=True) < captioning_seconds(
        30, 1.0, True, False
    )


def test_a_preset_fills_a_widget_for_each_setting_and_the_widgets_are_what_trains(tmp_path):
    """Every field a preset sets has a widget (batch size, extra layers, prior weight under More), and the
    config built from the widgets holds exactly the preset's values: nothing is applied a second time."""
    import gradio as gr

    from sdlora.ui import fields
    from sdlora.ui.studio import Studio
    from sdlora.ui.train_handlers import TrainHandlers, preset_fields, train_config
    from sdlora.ui.train_layout import layout

    studio = Studio(str(DEMO_MODEL), tmp_path / "adapters", tmp_path / "concepts", work_dir=tmp_path / "work")
    with gr.Blocks():
        widgets = layout(studio)
    assert set(preset_fields()) <= set(widgets.settings)
    *values, preview_every, _ = TrainHandlers(studio).fill_preset("Object")
    shown = {name: fields.train_defaults()[name] for name in widgets.settings}
    shown.update(zip(preset_fields(), values, strict=True), preview_every=preview_every, images="(uploaded)")
    config = train_config(shown, None, studio)
    assert (config.batch_size, config.prior_loss_weight, config.lora.extra_target_modules) == (
        DEMO.batch_size,
        DEMO.prior_loss_weight,
        DEMO.lora.extra_target_modules,
    )
    assert (config.lora.rank, config.steps, config.data.resolution, config.data.regularization_images) == (
        DEMO.lora.rank,
        DEMO.steps,
        DEMO.data.resolution,
        DEMO.data.regularization_images,
    )
    edited = {**shown, "batch_size": 1, "prior_loss_weight": 1.5, "extra_target_modules": []}
    edited = train_config(edited, None, studio)
    assert (edited.batch_size, edited.prior_loss_weight, edited.lora.extra_target_modules) == (1, 1.5, ())


def test_defaults_come_from_what_the_model_is_not_where_it_lives(tmp_path, tiny_sdxl_model, tiny_model):
    import shutil

    from sdlora.assets import DEMO_MARKER
    from sdlora.settings import defaults_line

    copy = tmp_path / "somewhere" / "my-demo"
    copy.mkdir(parents=True)
    for name in ("model_index.json", DEMO_MARKER):  # what marks it; the weights do not matter here
        shutil.copy(DEMO_MODEL / name, copy / name)

    def run(base):
        config = config_from_args(
            build_parser().parse_args(["train", "--base-model", str(base), "--images", "x"])
        )
        return config, defaults_line(str(base))

    config, line = run(copy)
    assert (config.data.resolution, config.lora.rank, config.steps) == (64, 16, 600) and "demo preset" in line
    config, line = run(tiny_sdxl_model)  # an SDXL folder: its own native size (1024 for the real one)
    assert config.data.resolution == 32 and line.startswith("defaults: SDXL at its native 32 px")
    config, line = run(tiny_model)
    assert config.data.resolution == 32 and "SD 1.x" in line and config.lora.rank == 8
    config, line = run(tmp_path / "not-a-model")
    assert config.data.resolution == 512 and "generic" in line


def test_gpu_memory_estimate_follows_model_size_and_memory_settings():
    from sdlora.models.loading import ModelInfo

    sdxl, sd15 = ModelInfo("sdxl", "epsilon", 1024, 2048), ModelInfo("sd1", "epsilon", 512, 768)
    xl = TrainConfigFor(1024)
    base = estimate_training(xl, 2_567_000_000, sdxl, "cuda").gpu_memory_gb
    assert 10 < base < 16  # SimpleTuner's published SDXL LoRA run at batch 1: 13 GiB
    checkpointed = estimate_training(xl.replace(gradient_checkpointing=True), 2_567_000_000, sdxl, "cuda")
    assert checkpointed.gpu_memory_gb < 0.7 * base and "SDXL at 1024 px" in checkpointed.text
    small_state = estimate_training(
        xl.replace(optimizer="adamw8bit"), 2_567_000_000, sdxl, "cuda"
    ).gpu_memory_gb
    assert small_state < base
    sd = estimate_training(TrainConfigFor(512), 860_000_000, sd15, "cuda").gpu_memory_gb
    assert 2 < sd < 4  # published SD 1.5 LoRA at 512 px: 2.9 GiB
    assert estimate_training(xl, 2_567_000_000, sdxl, "cpu").gpu_memory_gb is None


def TrainConfigFor(resolution: int):  # noqa: N802 - reads as the config it builds
    from sdlora.config import DataConfig, LoraSpec, TrainConfig

    return TrainConfig(
        base_model="m", data=DataConfig(images="x", resolution=resolution), lora=LoraSpec(rank=16, alpha=16)
    )


@pytest.mark.parametrize(
    "transformer,preset", [("FluxTransformer2DModel", "Flux.1"), ("SD3Transformer2DModel", "SD3.5")]
)
def test_flux_and_sd3_models_get_their_familys_preset_for_every_kind(transformer, preset, tmp_path):
    from test_settings import model_configs

    model = str(model_configs(tmp_path / "model", transformer))
    assert {preset_for(model, kind) for kind in ("Style", "Character", "Object")} == {preset}
    assert preset_for(str(DEMO_MODEL), "Style") == "Demo" and preset_for("some/model", "Style") == "Style"
    config = train_config_from({"data.images": "d"}, base_model=model, preset="Character")
    assert (config.lora.rank, config.lora.alpha, config.learning_rate, config.optimizer) == (
        16,
        16.0,
        1e-4,
        "adamw",
    )
    assert config.data.resolution == 1024  # the model's native size
    # what the settings give still wins over the preset
    mine = train_config_from({"data.images": "d", "lora.rank": 4}, base_model=model, preset="Style")
    assert mine.lora.rank == 4 and mine.learning_rate == 1e-4
