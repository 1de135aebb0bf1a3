"""The Train tab: concept images with captions, settings from a preset, a run with live progress."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from sdlora.config import DataConfig, TrainConfig, field_help
from sdlora.errors import ConceptImagesError, SdloraError
from sdlora.ui import queue_view
from sdlora.ui.messages import readable_errors
from sdlora.ui.run_view import RunView, view_run
from sdlora.ui.studio import Studio
from sdlora.ui.uploads import read_captions

PRESET_KINDS = ("Style", "Character", "Object")
CAPTION_HEADERS = ["image", "caption", "bucket"]  # bucket: at the model's native size, as training picks it
POLL_SECONDS = 0.5
HELP = {**field_help(TrainConfig), **field_help(DataConfig)}


@dataclass
class TrainTab:
    """Components other tabs wire to."""

    finished: gr.Dependency  # the end of the progress stream that follows a click on Train
    watch: object  # generator handler streaming progress; app.py re-attaches it on page load
    progress_outputs: list
    on_load: tuple  # (handler, inputs, outputs): the preset for the server's base model, on page load
    estimate: tuple  # (handler, inputs, outputs) of the time estimate


def train_config(kind: str, base_model: str, name: str, trigger: str, template: str, rank: float, alpha: float,
                 steps: float, lr: float, resolution: float, preview_every: float, seed: float,
                 flip: bool, regularization_images: str = "") -> TrainConfig:
    """Widget values -> TrainConfig: the preset's other numbers (batch, extra layers), then the widgets'."""
    from sdlora.presets import apply_preset, preset_for

    config = TrainConfig(name=name.strip(), seed=int(seed), preview_every=int(preview_every),
                         data=DataConfig(trigger_word=trigger.strip(), caption_template=template or "{trigger}",
                                         flip=bool(flip), images="(uploaded)"))
    config = apply_preset(config, preset_for(base_model, kind))
    return config.replace(
        steps=int(steps), learning_rate=float(lr),
        data=dataclasses.replace(config.data, resolution=int(resolution or 0),
                                 regularization_images=(regularization_images or "").strip()),
        lora=dataclasses.replace(config.lora, rank=int(rank), alpha=float(alpha)))


def caption_table(images, captions=None, buckets=None) -> pd.DataFrame:
    captions = captions if captions is not None else read_captions(images)
    buckets = buckets if buckets is not None else [""] * len(images)
    return pd.DataFrame({"image": [p.name for p in images], "caption": captions, "bucket": buckets},
                        columns=CAPTION_HEADERS)


def captions_from_table(table) -> dict[str, str]:
    if table is None or len(table) == 0:
        return {}
    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
    frame = frame.set_axis(CAPTION_HEADERS[: len(frame.columns)], axis=1)  # a script may send two columns
    return {str(r["image"]): "" if pd.isna(r["caption"]) else str(r["caption"]) for _, r in frame.iterrows()}


def view_outputs(view: RunView) -> tuple:
    curve = pd.DataFrame(view.curve(), columns=["step", "loss"])
    return view.summary(), curve, view.previews or None


def build(studio: Studio) -> TrainTab:
    """Lay out the Train tab inside the current Blocks and wire its events."""
    defaults = TrainConfig()  # the preset for the server's base model fills the numbers on page load
    examples = studio.example_concepts()
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### 1. Concept images")
            with gr.Row(visible=bool(examples)):
                example = gr.Dropdown(examples, value=examples[0] if examples else None, label="Example concepts",
                                      scale=3, elem_id="example-concept")
                use_example = gr.Button("Use this example", scale=1, elem_id="use-example")
            files = gr.File(file_count="multiple", file_types=["image", ".zip", ".txt"],
                            label="Concept images: drop image files, their .txt captions, or a .zip", height=140,
                            elem_id="concept-files")
            thumbnails = gr.Gallery(label="Thumbnails", columns=4, height=240, format="png", allow_preview=False,
                                    elem_id="thumbnails")
            captions = gr.Dataframe(headers=CAPTION_HEADERS, datatype=["str", "str", "str"], interactive=True,
                                    label="Captions (leave empty to use the template; bucket: the shape each image "
                                          "trains at, at the model's native size)", column_count=3,
                                    max_height=260, wrap=True, elem_id="captions")
        with gr.Column(scale=1):
            gr.Markdown("### 2. Settings")
            with gr.Row():
                name = gr.Textbox(defaults.name, label="Adapter name", info=HELP["name"]["help"],
                                  elem_id="adapter-name")
                trigger = gr.Textbox("sks", label="Trigger word", info=HELP["trigger_word"]["help"],
                                     elem_id="trigger-word")
            template = gr.Textbox(defaults.data.caption_template, label="Caption template",
                                  info=HELP["caption_template"]["help"])
            preset = gr.Radio(list(PRESET_KINDS), value=PRESET_KINDS[-1], label="Preset",
                              info="Fills rank, steps, learning rate and resolution; change them freely.")
            preset_note = gr.Markdown(elem_id="preset-note")
            with gr.Row():
                rank = gr.Number(defaults.lora.rank, label="Rank", precision=0, minimum=1)
                alpha = gr.Number(defaults.lora.alpha, label="Alpha", minimum=0.01)
                steps = gr.Number(defaults.steps, label="Steps", precision=0, minimum=1, elem_id="steps")
            with gr.Row():
                lr = gr.Number(defaults.learning_rate, label="Learning rate", minimum=0, step=1e-5)
                resolution = gr.Number(defaults.data.resolution, label="Resolution (0: model native)", precision=0,
                                       minimum=0, step=8, elem_id="resolution")
                preview_every = gr.Number(max(1, defaults.steps // 5), label="Preview every N steps", precision=0,
                                          minimum=0, info="0: no previews", elem_id="preview-every")
            with gr.Accordion("More", open=False):
                seed = gr.Number(defaults.seed, label="Seed", precision=0, info=HELP["seed"]["help"])
                flip = gr.Checkbox(defaults.data.flip, label="Flip images", info=HELP["flip"]["help"])
                reg_images = gr.Textbox("", label="Regularisation images folder (optional, on this machine)",
                                        info=HELP["regularization_images"]["help"], elem_id="reg-images")
            estimate = gr.Markdown(elem_id="estimate")
            with gr.Row():
                start_button = gr.Button("Train", variant="primary", elem_id="train-button")
                stop_button = gr.Button("Stop and save", variant="stop", elem_id="stop-button")
    gr.Markdown("### 3. Progress")
    status = gr.Markdown(RunView().summary(), elem_id="train-status")
    with gr.Row():
        curve = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss", label="Loss",
                            height=260, scale=3, elem_id="loss-curve")
        previews = gr.Gallery(label="Previews at fixed seeds", columns=2, height=260, format="png", scale=2,
                              elem_id="previews")

    settings = [preset, name, trigger, template, rank, alpha, steps, lr, resolution, preview_every, seed, flip,
                reg_images]
    queue_view.build(studio, [files, captions, *settings], lambda *values: queue_job(*values))
    progress_outputs = [status, curve, previews]

    @readable_errors
    def show_images(paths):
        images = studio.stage_upload(paths or [])
        return images, caption_table(images, buckets=studio.buckets_of(images))

    @readable_errors
    def load_example(example_name):
        paths = studio.example_files(example_name)
        images = [p for p in paths if p.suffix.lower() != ".txt"]
        # The example's folder name is the word its captions teach: it becomes the trigger word.
        name = studio.library.unique_name(example_name)
        return [str(p) for p in paths], images, caption_table(images, buckets=studio.buckets_of(images)), name, \
            example_name

    @readable_errors
    def fill_preset(kind):
        from sdlora.presets import PRESETS, preset_for

        p = preset_for(studio.base_model, kind)
        note = f"Preset **{kind if p is PRESETS.get(kind) else 'Demo'}**: {p.note}"
        return (p.rank, p.alpha, p.steps, p.learning_rate, p.resolution, max(1, p.steps // 5), note,
                p.regularization_images)

    def estimate_run(kind, *values):
        try:
            return "Estimate: " + studio.estimate(train_config(kind, studio.base_model, *values)).text
        except SdloraError as exc:
            return f"No estimate yet: {exc}"

    def queue_job(paths, table, kind, *values):
        if not paths:
            raise ConceptImagesError("Add concept images first (drop files or a .zip, or use an example).")
        return studio.start_training(train_config(kind, studio.base_model, *values), paths, captions_from_table(table))

    @readable_errors
    def start(paths, table, kind, *values):
        queue_job(paths, table, kind, *values)
        return view_outputs(studio_view(studio))

    def watch():
        view = studio_view(studio)
        yield view_outputs(view)
        seen = _progress_key(view)
        while view.active or studio.queue_busy():  # follow the queue: the next job's progress shows here too
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
    use_example.click(load_example, example, [files, thumbnails, captions, name, trigger], api_name="use_example")
    preset_outputs = [rank, alpha, steps, lr, resolution, preview_every, preset_note, reg_images]
    filled = preset.input(fill_preset, preset, preset_outputs, api_name="apply_preset")
    gr.on([steps.input, resolution.input, rank.input], estimate_run, settings, estimate, api_name="estimate",
          show_progress="hidden", trigger_mode="always_last")
    filled.success(estimate_run, settings, estimate, api_name="estimate_after_preset", show_progress="hidden")
    started = start_button.click(start, [files, captions, *settings], progress_outputs, api_name="train")
    watched = started.success(watch, None, progress_outputs, api_name="watch_training", concurrency_limit=None,
                              show_progress="hidden")
    stop_button.click(stop, None, progress_outputs, api_name="stop", concurrency_limit=None)
    return TrainTab(finished=watched, watch=watch, progress_outputs=progress_outputs,
                    on_load=(fill_preset, preset, preset_outputs), estimate=(estimate_run, settings, estimate))


def studio_view(studio: Studio) -> RunView:
    """The current (or last) run of this server as a RunView."""
    run = studio.run
    if run is None:
        return RunView()
    return view_run(run.snapshot(), studio.run_name, run.running, run.stop.requested)


def _progress_key(view: RunView) -> tuple:
    return view.state, view.step, view.previews[0][1] if view.previews else "", view.message
