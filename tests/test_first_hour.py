"""What a new user meets in the first hour (issue #23 items 1-9), checked without a browser."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from sdlora.assets import DEMO_MODEL
from sdlora.config import TRIGGER_WORD, DataConfig, TrainConfig, preview_interval
from sdlora.settings import train_config_from
from sdlora.training.estimate import SPEED_FILE, estimate_training, measured_speed, remember_speed


def demo_config(output_dir: Path, steps: int = 600) -> TrainConfig:
    values = {"name": "n", "output_dir": str(output_dir), "steps": steps, "data": {"images": "d"}}
    return train_config_from(values, base_model=str(DEMO_MODEL), preset="Demo", validate=False)


def test_the_estimate_uses_the_seconds_per_step_this_machine_measured(tmp_path):
    config = demo_config(tmp_path, steps=100)
    rough = estimate_training(config, 2_000_000, None, "cpu")
    assert not rough.measured and "rough" in rough.text
    remember_speed(config, "cpu", 1.37, steps=600)
    learnt = estimate_training(config, 2_000_000, None, "cpu")
    assert learnt.measured and learnt.seconds_per_step == pytest.approx(1.37)
    assert learnt.seconds == pytest.approx(137) and "1.37 s/step" in learnt.text and "measured" in learnt.text
    # Another resolution costs another amount per step: the measurement does not carry over.
    other = config.replace(data=DataConfig(images="d", resolution=128))
    assert measured_speed(other, "cpu") is None and measured_speed(config, "cuda") is None
    remember_speed(config, "cuda:0", 0.05, steps=600)  # the trainer names the GPU, the app the device type
    assert measured_speed(config, "cuda") == pytest.approx(0.05)


def test_a_damaged_speed_record_falls_back_to_the_formula(tmp_path):
    config = demo_config(tmp_path)
    (tmp_path / SPEED_FILE).write_text("{not json")
    assert not estimate_training(config, 2_000_000, None, "cpu").measured
    remember_speed(config, "cpu", 0.9, steps=10)  # the next run rewrites it
    assert measured_speed(config, "cpu") == pytest.approx(0.9)


def test_a_training_run_records_its_speed_for_the_next_estimate(tiny_config):
    from sdlora.training.loop import train

    train(tiny_config)
    records = json.loads((Path(tiny_config.output_dir) / SPEED_FILE).read_text())
    assert len(records) == 1
    (record,) = records.values()
    assert record["steps"] == tiny_config.steps and record["seconds_per_step"] > 0
    estimate = estimate_training(tiny_config, 1_000, None, "cpu")
    assert estimate.measured and estimate.seconds_per_step == pytest.approx(record["seconds_per_step"])


def test_preview_interval_follows_the_run_length():
    for steps in (1, 3, 40, 100, 600, 1500):
        assert 1 <= preview_interval(steps) <= steps
        assert steps // preview_interval(steps) >= min(steps, 4)  # a short run still shows previews


def test_one_trigger_word_default_for_the_cli_the_config_and_the_train_tab():
    import gradio as gr

    from sdlora.cli import build_parser, config_from_args
    from sdlora.ui.train_layout import layout

    args = build_parser().parse_args(["train", "--base-model", "m", "--images", "x"])
    assert config_from_args(args).data.trigger_word == DataConfig().trigger_word == TRIGGER_WORD
    with gr.Blocks():
        widgets = layout(SimpleNamespace(base_model=str(DEMO_MODEL), example_concepts=lambda: []))
    assert widgets.settings["trigger_word"].value == TRIGGER_WORD
    assert widgets.settings["preview_every"].value == preview_interval(widgets.settings["steps"].value)


@pytest.fixture()
def handlers(tmp_path):
    """The Train tab's handlers over a stand-in studio on the demo model that estimates from the formula."""
    from sdlora.training.estimate import Estimate
    from sdlora.ui.train_handlers import TrainHandlers

    def estimate(config, uncaptioned=0):
        return Estimate(config.steps * 0.5, None, f"about {config.steps * 0.5:.0f} s")

    def train_config(values, source="settings", validate=True):
        values = {**values, "output_dir": str(tmp_path)}
        return train_config_from(values, base_model=str(DEMO_MODEL), source=source, validate=validate)

    studio = SimpleNamespace(
        base_model=str(DEMO_MODEL),
        estimate=estimate,
        train_config=train_config,
        run=None,
        queue=SimpleNamespace(pending=lambda: False),
    )
    return TrainHandlers(studio)


def test_a_run_well_below_the_presets_steps_warns_before_it_starts(handlers):
    short = handlers.estimate(None, "Object", steps=100, preview_every=120)
    assert "100 steps is well below the 600 the Demo preset needs" in short
    assert "none will appear in 100" in short  # an interval past the run's end shows nothing
    assert "⚠" not in handlers.estimate(None, "Object", steps=600, preview_every=preview_interval(600))


def test_the_preset_shown_is_the_preset_in_force(handlers):
    from sdlora.ui.train_layout import preset_radio

    assert preset_radio(str(DEMO_MODEL)) == {"choices": ["Demo"], "value": "Demo"}  # not "Object"
    *_, note = handlers.fill_preset("Demo")
    assert note.startswith("Preset **Demo**")
    assert preset_radio("some/hub-model") == {"choices": ["Style", "Character", "Object"], "value": "Object"}


def test_controls_that_cannot_act_are_not_clickable(handlers):
    from sdlora.ui.library_tab import LibraryHandlers, download_button

    stop, curve = handlers.controls()
    assert stop.interactive is False and curve.visible is False  # nothing runs, no loss to draw
    rename, delete = LibraryHandlers.selection_controls("")
    assert rename.interactive is False and delete.interactive is False
    assert download_button(None)["interactive"] is False
    assert LibraryHandlers.selection_controls("star")[1].interactive is True


def test_the_page_says_how_many_images_and_captions_were_loaded():
    from sdlora.ui.train_handlers import TrainHandlers, caption_table

    table = caption_table([Path("a.png"), Path("b.png"), Path("c.png")], ["a star", "", "a heart"])
    assert TrainHandlers.loaded_summary(table).startswith("**3 images loaded**, 2 with a caption")
    assert TrainHandlers.loaded_summary(caption_table([])) == ""


def test_downloads_are_named_by_format(tmp_path, tiny_config):
    from sdlora.library.store import AdapterLibrary
    from sdlora.training.loop import train

    result = train(tiny_config)
    library = AdapterLibrary(result.adapter_path.parent)
    kohya = library.export("tiny", "kohya", tmp_path / "k")
    diffusers = library.export("tiny", "diffusers", tmp_path / "d")
    assert (kohya.name, diffusers.name) == ("tiny.safetensors", "tiny.diffusers.safetensors")


def test_the_first_estimate_counts_the_previews_the_run_will_draw(tmp_path):
    """Every preview_every steps and the final one, which reuses a preview drawn at the last step."""
    from sdlora.training.estimate import preview_seconds

    config = demo_config(tmp_path, steps=600)
    plain = estimate_training(config.replace(preview_every=0, final_preview=False), 2_000_000, None, "cpu")
    assert "preview" not in plain.text
    for every, drawn in ((150, 4), (250, 3), (0, 1)):
        with_previews = config.replace(preview_every=every)
        renders, seconds = preview_seconds(with_previews, 2_000_000, "cpu", (300, 100))
        assert renders == drawn and seconds > 0
        said = estimate_training(with_previews, 2_000_000, None, "cpu", layers=(300, 100))
        alone = estimate_training(
            with_previews.replace(preview_every=0, final_preview=False),
            2_000_000,
            None,
            "cpu",
            layers=(300, 100),
        )
        assert said.seconds == pytest.approx(alone.seconds + seconds)
        assert f"{drawn} preview{'s' * (drawn > 1)} included" in said.text
    # Twice the seeds, twice the images; in batches of the batch size, more calls cost more.
    one = preview_seconds(config.replace(preview_seeds=(1,)), 2_000_000, "cpu", (300, 100))[1]
    two = preview_seconds(config.replace(preview_seeds=(1, 2)), 2_000_000, "cpu", (300, 100))[1]
    assert two > one
    assert preview_seconds(config.replace(batch_size=1), 2_000_000, "cpu", (300, 100))[1] > two
    # one denoiser pass per sampling step (Flux.1: no negative prompt) costs less than guidance's two
    assert preview_seconds(config, 2_000_000, "cpu", (300, 100), passes=1)[1] < two


def test_the_first_estimate_grows_with_the_layers_a_step_calls(tmp_path):
    config = demo_config(tmp_path, steps=100)
    few = estimate_training(config, 2_000_000, None, "cpu", layers=(300, 50))
    many = estimate_training(config, 2_000_000, None, "cpu", layers=(300, 150))
    assert many.seconds_per_step > few.seconds_per_step and not many.measured


def test_layer_counts_name_the_layers_the_adapter_adapts(tiny_model):
    """What the estimate counts is what add_lora adapts, on the bare model and with an adapter loaded."""
    from peft.tuners.lora import LoraLayer

    from sdlora.config import LoraSpec
    from sdlora.models.loading import load_pipeline
    from sdlora.training.lora import add_lora, layer_counts

    for spec in (LoraSpec(rank=2), LoraSpec(rank=2, extra_target_modules=("proj_in", "ff.net.2", "conv1"))):
        unet = load_pipeline(str(tiny_model)).unet
        modules, adapted = layer_counts(unet, spec)
        add_lora(unet, spec)
        assert adapted == sum(isinstance(m, LoraLayer) for m in unet.modules()) > 0
        assert layer_counts(unet, spec) == (modules, adapted)  # the loaded adapter's own parts not counted
    assert adapted > layer_counts(unet, LoraSpec(rank=2))[1]
