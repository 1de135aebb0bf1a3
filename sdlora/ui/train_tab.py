"""The Train tab: concept images with captions, settings from a preset, a run with live progress."""

from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from sdlora.config import DataConfig, LoraSpec, TrainConfig, field_help
from sdlora.ui.messages import readable_errors
from sdlora.ui.run_view import RunView, view_run
from sdlora.ui.studio import Studio
from sdlora.ui.uploads import read_captions

PRESET_KINDS = ("Style", "Character", "Object")
CAPTION_HEADERS = ["image", "caption"]
POLL_SECONDS = 0.5
HELP = {**field_help(TrainConfig), **field_help(DataConfig), **{f"lora.{k}": v for k, v in field_help(LoraSpec).items()}}


@dataclass
class TrainTab:
    """Components other tabs wire to."""

    finished: gr.Dependency  # the end of the progress stream that follows a click on Train
    watch: object  # generator handler streaming progress; app.py re-attaches it on page load
    progress_outputs: list


def train_config(name: str, trigger: str, template: str, rank: float, alpha: float, steps: float, lr: float,
                 resolution: float, preview_every: float, seed: float, flip: bool) -> TrainConfig:
    """Widget values -> TrainConfig; the base model and output folder are the server's."""
    return TrainConfig(
        name=name.strip(), steps=int(steps), learning_rate=float(lr), seed=int(seed),
        preview_every=int(preview_every),
        data=DataConfig(trigger_word=trigger.strip(), caption_template=template or "{trigger}",
                        resolution=int(resolution), flip=bool(flip), images="(uploaded)"),
        lora=LoraSpec(rank=int(rank), alpha=float(alpha)))


def caption_table(images, captions=None) -> pd.DataFrame:
    captions = captions if captions is not None else read_captions(images)
    return pd.DataFrame({"image": [p.name for p in images], "caption": captions}, columns=CAPTION_HEADERS)


def captions_from_table(table) -> dict[str, str]:
    if table is None or len(table) == 0:
        return {}
    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table, columns=CAPTION_HEADERS)
    return {str(r["image"]): "" if pd.isna(r["caption"]) else str(r["caption"]) for _, r in frame.iterrows()}


def view_outputs(view: RunView) -> tuple:
    curve = pd.DataFrame(view.curve(), columns=["step", "loss"])
    return view.summary(), curve, view.previews or None


def build(studio: Studio) -> TrainTab:
    """Lay out the Train tab inside the current Blocks and wire its events."""
    from sdlora.presets import PRESETS

    defaults, start = TrainConfig(), PRESETS[PRESET_KINDS[0]]
    examples = studio.example_concepts()
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### 1. Concept images")
            with gr.Row(visible=bool(examples)):
                example = gr.Dropdown(examples, value=examples[0] if examples else None, label="Example concepts",
                                      scale=3)
                use_example = gr.Button("Use this example", scale=1)
            files = gr.File(file_count="multiple", file_types=["image", ".zip", ".txt"],
                            label="Concept images: drop image files, their .txt captions, or a .zip", height=140)
            thumbnails = gr.Gallery(label="Thumbnails", columns=6, height=220, format="png", allow_preview=False)
            captions = gr.Dataframe(headers=CAPTION_HEADERS, datatype=["str", "str"], interactive=True,
                                    label="Captions (leave empty to use the template)", column_count=2,
                                    max_height=260, wrap=True)
        with gr.Column(scale=1):
            gr.Markdown("### 2. Settings")
            with gr.Row():
                name = gr.Textbox(defaults.name, label="Adapter name", info=HELP["name"]["help"])
                trigger = gr.Textbox("sks", label="Trigger word", info=HELP["trigger_word"]["help"])
            template = gr.Textbox(defaults.data.caption_template, label="Caption template",
                                  info=HELP["caption_template"]["help"])
            preset = gr.Radio(list(PRESET_KINDS), value=PRESET_KINDS[0], label="Preset",
                              info="Fills rank, steps, learning rate and resolution; change them freely.")
            with gr.Row():
                rank = gr.Number(start.rank, label="Rank", precision=0, minimum=1, info=HELP["lora.rank"]["help"])
                alpha = gr.Number(start.alpha, label="Alpha", minimum=0.01, info=HELP["lora.alpha"]["help"])
                steps = gr.Number(start.steps, label="Steps", precision=0, minimum=1)
            with gr.Row():
                lr = gr.Number(start.learning_rate, label="Learning rate", minimum=0, step=1e-5)
                resolution = gr.Number(start.resolution, label="Resolution", precision=0, minimum=8, step=8)
                preview_every = gr.Number(max(1, start.steps // 5), label="Preview every N steps", precision=0,
                                          minimum=0, info="0: no previews")
            with gr.Accordion("More", open=False):
                seed = gr.Number(defaults.seed, label="Seed", precision=0, info=HELP["seed"]["help"])
                flip = gr.Checkbox(defaults.data.flip, label="Flip images", info=HELP["flip"]["help"])
            estimate = gr.Markdown()
            with gr.Row():
                start_button = gr.Button("Train", variant="primary")
                stop_button = gr.Button("Stop and save", variant="stop")
    gr.Markdown("### 3. Progress")
    status = gr.Markdown(RunView().summary())
    with gr.Row():
        curve = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss", label="Loss",
                            height=260, scale=3)
        previews = gr.Gallery(label="Previews at fixed seeds", columns=2, height=260, format="png", scale=2)

    settings = [name, trigger, template, rank, alpha, steps, lr, resolution, preview_every, seed, flip]
    progress_outputs = [status, curve, previews]

    @readable_errors
    def show_images(paths):
        images = studio.stage_upload(paths or [])
        return images, caption_table(images)

    @readable_errors
    def load_example(example_name):
        paths = studio.example_files(example_name)
        images = [p for p in paths if p.suffix.lower() != ".txt"]
        return [str(p) for p in paths], images, caption_table(images)

    @readable_errors
    def fill_preset(kind):
        from sdlora.presets import preset_for

        p = preset_for(studio.base_model, kind)
        return p.rank, p.alpha, p.steps, p.learning_rate, p.resolution, max(1, p.steps // 5)

    @readable_errors
    def estimate_run(*values):
        return studio.estimate(train_config(*values)).text

    @readable_errors
    def start(paths, table, *values):
        if not paths:
            raise gr.Error("Add concept images first (drop files or a .zip, or use an example).")
        studio.start_training(train_config(*values), paths, captions_from_table(table))
        return view_outputs(studio_view(studio))

    def watch():
        view = studio_view(studio)
        yield view_outputs(view)
        seen = _progress_key(view)
        while view.active:
            time.sleep(POLL_SECONDS)
            view = studio_view(studio)
            if _progress_key(view) != seen:
                seen = _progress_key(view)
                yield view_outputs(view)

    def stop():
        if not studio.stop_training():
            gr.Warning("No training run is in progress.")
        return view_outputs(studio_view(studio))

    files.upload(show_images, files, [thumbnails, captions], api_name="upload_images")
    files.clear(lambda: ([], caption_table([])), None, [thumbnails, captions], api_name="clear_images")
    use_example.click(load_example, example, [files, thumbnails, captions], api_name="use_example")
    preset.input(fill_preset, preset, [rank, alpha, steps, lr, resolution, preview_every], api_name="apply_preset")
    gr.on([steps.change, resolution.change, rank.change], estimate_run, settings, estimate, api_name="estimate",
          show_progress="hidden", trigger_mode="always_last")
    started = start_button.click(start, [files, captions, *settings], progress_outputs, api_name="train")
    watched = started.success(watch, None, progress_outputs, api_name="watch_training", concurrency_limit=None,
                              show_progress="hidden")
    stop_button.click(stop, None, progress_outputs, api_name="stop", concurrency_limit=None)
    return TrainTab(finished=watched, watch=watch, progress_outputs=progress_outputs)


def studio_view(studio: Studio) -> RunView:
    """The current (or last) run of this server as a RunView."""
    run = studio.run
    if run is None:
        return RunView()
    return view_run(run.snapshot(), studio.run_name, run.running, run.stop.requested)


def _progress_key(view: RunView) -> tuple:
    return view.state, view.step, view.previews[0][1] if view.previews else "", view.message
