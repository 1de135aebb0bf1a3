"""The Train tab's layout: concept images with captions, the settings widgets, the progress view.

The settings widgets are keyed by the TrainConfig field each one shows (`rank`, `trigger_word`, ...):
the handlers (train_handlers) build the config from those names, and the API's parameters carry them.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from sdlora.config import DataConfig, LoraSpec, TrainConfig, field_help, preview_interval
from sdlora.ui import fields
from sdlora.ui.run_view import RunView
from sdlora.ui.studio import Studio

PRESET_KINDS = ("Style", "Character", "Object")
CAPTION_HEADERS = ["image", "caption", "bucket"]  # bucket: at the model's native size, as training picks it
HELP = {**field_help(TrainConfig), **field_help(DataConfig), **field_help(LoraSpec)}
# Hints in the page's words where the config's help speaks of files and flags.
HINTS = {
    "name": "What the adapter is called in the library and in <lora:name> prompt tags.",
    "trigger_word": "Write this word in a prompt to call up the concept; "
    "training puts it in front of every caption that lacks it.",
}
# Layers a preset may adapt besides the attention projections (the demo preset adapts all of these).
EXTRA_TARGET_CHOICES = (
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
)


@dataclass
class TrainWidgets:
    """Every component of the tab; `settings` maps TrainConfig leaf names to the widget showing each."""

    example: gr.Dropdown
    use_example: gr.Button
    files: gr.File
    thumbnails: gr.Gallery
    captions: gr.Dataframe
    caption_tools: gr.Row  # buttons that work on the caption table go here
    caption_prefix: gr.Textbox
    caption_overwrite: gr.Checkbox
    caption_button: gr.Button
    caption_summary: gr.Markdown
    preset: gr.Radio
    preset_note: gr.Markdown
    settings: dict[str, gr.components.Component]
    config: gr.JSON  # a script's settings object (the keys of a --config file); hidden on the page
    estimate: gr.Markdown
    start_button: gr.Button
    stop_button: gr.Button
    status: gr.Markdown
    curve: gr.LinePlot
    previews: gr.Gallery

    @property
    def progress_outputs(self) -> list:
        return [self.status, self.curve, self.previews]


def preset_in_force(base_model: str, kind: str | None) -> str:
    """The preset that choosing `kind` gives on this base model: on the demo model, always the Demo preset."""
    from sdlora.training.presets import preset_for

    return preset_for(base_model, kind if kind in PRESET_KINDS else PRESET_KINDS[-1])


def preset_radio(base_model: str) -> dict:
    """The preset radio's choices and value: only presets that can be in force here, so it shows the one that is."""
    name = preset_in_force(base_model, None)
    return {"choices": list(PRESET_KINDS) if name in PRESET_KINDS else [name], "value": name}


def layout(studio: Studio) -> TrainWidgets:
    """Declare the tab's components; the preset for the server's model fills the numbers on page load."""
    with gr.Row():
        with gr.Column(scale=1):
            concepts = _concept_images(studio.example_concepts())
        with gr.Column(scale=1):
            gr.Markdown("### 2. Settings")
            preset = gr.Radio(
                **preset_radio(studio.base_model),
                label="Preset",
                info="Fills the settings below once (those under More too); change them freely.",
                elem_id="preset",
            )
            preset_note = gr.Markdown(elem_id="preset-note")
            settings = _settings()
            config = gr.JSON(None, visible=False, label="Settings object")
            estimate = gr.Markdown(elem_id="estimate")
            with gr.Row():
                start_button = gr.Button("Train", variant="primary", elem_id="train-button")
                # Clickable only while a run goes (TrainHandlers.controls): with nothing to stop it only misleads.
                stop_button = gr.Button(
                    "Stop and save", variant="stop", interactive=False, elem_id="stop-button"
                )
    progress = _progress()
    return TrainWidgets(
        **concepts,
        preset=preset,
        preset_note=preset_note,
        settings=settings,
        config=config,
        estimate=estimate,
        start_button=start_button,
        stop_button=stop_button,
        **progress,
    )


def _concept_images(examples: list[str]) -> dict:
    gr.Markdown("### 1. Concept images")
    with gr.Row(visible=bool(examples)):
        example = gr.Dropdown(
            examples,
            value=examples[0] if examples else None,
            label="Example concepts",
            scale=3,
            elem_id="example-concept",
        )
        use_example = gr.Button("Use this example", scale=1, elem_id="use-example")
    files = gr.File(
        file_count="multiple",
        file_types=["image", ".zip", ".txt"],
        label="Concept images: drop image files, their .txt captions, or a .zip",
        height=140,
        elem_id="concept-files",
    )
    thumbnails = gr.Gallery(
        label="Thumbnails", columns=4, height=240, format="png", allow_preview=False, elem_id="thumbnails"
    )
    with gr.Row(equal_height=True) as caption_tools:
        caption_prefix = gr.Textbox(
            "",
            label="Caption prefix",
            scale=2,
            elem_id="caption-prefix",
            placeholder="the trigger word",
            info="Captions written for you start with this (empty: with the trigger word).",
        )
        caption_overwrite = gr.Checkbox(
            False,
            label="Overwrite",
            scale=1,
            elem_id="caption-overwrite",
            info="Replace captions already in the table.",
        )
        caption_button = gr.Button("Caption images", scale=1, elem_id="caption-button")
    caption_summary = gr.Markdown(elem_id="caption-summary")
    captions = gr.Dataframe(
        headers=CAPTION_HEADERS,
        datatype=["str", "str", "str"],
        interactive=True,
        label="Captions: edit them here",
        column_count=3,
        max_height=260,
        wrap=True,
        elem_id="captions",
    )
    return dict(
        example=example,
        use_example=use_example,
        files=files,
        thumbnails=thumbnails,
        caption_tools=caption_tools,
        caption_prefix=caption_prefix,
        caption_overwrite=caption_overwrite,
        caption_button=caption_button,
        caption_summary=caption_summary,
        captions=captions,
    )


def _settings() -> dict[str, gr.components.Component]:
    """One widget per TrainConfig field the tab shows, keyed by the field's name; defaults from TrainConfig."""
    d = fields.train_defaults()

    def info(name: str) -> str:
        return HELP[name]["help"]

    s: dict[str, gr.components.Component] = {}
    with gr.Row():
        s["name"] = gr.Textbox(d["name"], label="Adapter name", info=HINTS["name"], elem_id="adapter-name")
        s["trigger_word"] = gr.Textbox(
            d["trigger_word"], label="Trigger word", info=HINTS["trigger_word"], elem_id="trigger-word"
        )
    s["caption_template"] = gr.Textbox(
        d["caption_template"], label="Caption template", info=info("caption_template")
    )
    # No precision=0 on the number fields: gradio's rounding turns NaN into an error no client sees;
    # as floats they reach the one road, whose check names the field (a whole 8.0 becomes 8).
    with gr.Row():
        s["rank"] = gr.Number(d["rank"], label="Rank", minimum=1, elem_id="rank")
        s["alpha"] = gr.Number(d["alpha"], label="Alpha", minimum=0.01, elem_id="alpha")
        s["steps"] = gr.Number(d["steps"], label="Steps", minimum=1, elem_id="steps")
    with gr.Row():
        s["learning_rate"] = gr.Number(
            d["learning_rate"], label="Learning rate", minimum=0, step=1e-5, elem_id="learning-rate"
        )
        s["resolution"] = gr.Number(
            d["resolution"],
            label="Resolution (0: model native)",
            minimum=0,
            step=8,
            elem_id="resolution",
        )
        s["preview_every"] = gr.Number(
            preview_interval(d["steps"]),
            label="Preview every N steps",
            minimum=0,
            info="follows Steps; 0: no previews",
            elem_id="preview-every",
        )
    with gr.Accordion("More", open=False):
        with gr.Row():
            s["batch_size"] = gr.Number(
                d["batch_size"],
                label="Batch size",
                minimum=1,
                info=info("batch_size"),
                elem_id="batch-size",
            )
            s["seed"] = gr.Number(d["seed"], label="Seed", info=info("seed"))
        s["extra_target_modules"] = gr.Dropdown(
            list(EXTRA_TARGET_CHOICES),
            value=list(d["extra_target_modules"]),
            multiselect=True,
            allow_custom_value=True,
            label="Extra layers to adapt",
            info=info("extra_target_modules"),
            elem_id="extra-targets",
        )
        s["flip"] = gr.Checkbox(d["flip"], label="Flip images", info=info("flip"))
        s["regularization_images"] = gr.Textbox(
            d["regularization_images"],
            label="Regularisation images folder (optional, on this server)",
            info=info("regularization_images"),
            elem_id="reg-images",
        )
        s["prior_loss_weight"] = gr.Number(
            d["prior_loss_weight"],
            label="Regularisation loss weight",
            minimum=0,
            info=info("prior_loss_weight"),
            elem_id="prior-loss-weight",
        )
    return s


def _progress() -> dict:
    gr.Markdown("### 3. Progress")
    status = gr.Markdown(RunView().summary(), elem_id="train-status")
    with gr.Row():
        curve = gr.LinePlot(
            pd.DataFrame({"step": [], "loss": [], "series": []}),
            x="step",
            y="loss",
            color="series",  # the smoothed training loss, validation points, the lowest validation step
            label="Loss",
            height=260,
            y_axis_format=".3f",  # one width from the first step on: the axis kept cutting longer labels
            scale=3,
            visible=False,  # shown with the first step: an empty chart says nothing
            elem_id="loss-curve",
        )
        previews = gr.Gallery(
            label="Previews at fixed seeds", columns=2, height=260, format="png", scale=2, elem_id="previews"
        )
    return dict(status=status, curve=curve, previews=previews)
