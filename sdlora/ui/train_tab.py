"""The Train tab: concept images with captions, settings from a preset, a run with live progress.

Three parts, as gradio's own Blocks demos keep them: `layout` declares the widgets, `TrainHandlers`
holds plain functions over the Studio, `wire` connects the widgets' events to them. The settings
widgets are keyed by the TrainConfig field each one shows (`rank`, `trigger_word`, ...): the
handlers build the config from those names, and the API's parameters carry the same names.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import gradio as gr
import pandas as pd

from sdlora.config import (
    DataConfig,
    LoraSpec,
    TrainConfig,
    field_help,
    merge_settings,
    preview_interval,
    read_settings,
)
from sdlora.errors import ConceptImagesError, ConfigError, SdloraError
from sdlora.ui import checkpoints_view, fields, queue_view, serving
from sdlora.ui.messages import readable_errors
from sdlora.ui.run_view import RunView, view_run
from sdlora.ui.studio import Studio
from sdlora.ui.uploads import read_captions

PRESET_KINDS = ("Style", "Character", "Object")
CAPTION_HEADERS = ["image", "caption", "bucket"]  # bucket: at the model's native size, as training picks it
POLL_SECONDS = 0.5
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
# Set by the server, never by the widgets: the server's base model, its library, the uploaded images.
SERVER_FIELDS = ("base_model", "output_dir", "images")


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


@dataclass
class TrainTab:
    """What other tabs and the page wire to."""

    widgets: TrainWidgets
    handlers: TrainHandlers
    finished: gr.Dependency  # the end of the progress stream that follows a click on Train
    events: dict[str, gr.Dependency] = field(default_factory=dict)

    def on_page_load(self, demo: gr.Blocks) -> gr.Dependency:
        """Fill the preset for the server's model, then stream the run the server holds; returns the stream."""
        w, h = self.widgets, self.handlers
        chosen = demo.load(
            h.preset_choices, None, w.preset, api_name="preset_choices", show_progress="hidden"
        )
        filled = chosen.then(h.fill_preset, w.preset, preset_outputs(w), api_name="preset_on_load")
        filled.success(
            h.estimate,
            [w.captions, w.preset],
            w.estimate,
            inputs_kwargs=w.settings,
            api_name="estimate_on_load",
            show_progress="hidden",
        )
        return demo.load(
            h.watch,
            None,
            w.progress_outputs,
            api_name="progress",
            concurrency_limit=None,
            show_progress="hidden",
        )


def build(studio: Studio) -> TrainTab:
    """Lay out the Train tab inside the current Blocks and wire its events."""
    widgets = layout(studio)
    handlers = TrainHandlers(studio)
    tab = wire(widgets, handlers)
    queued = queue_view.build(
        studio, [widgets.files, widgets.captions, widgets.config], widgets.settings, handlers.queue_job
    )
    checkpoints_view.build(studio)  # compare the run's checkpoint adapters and keep one
    # Without this a page that only queued jobs would say "no training run yet" until reloaded.
    queued.added.success(
        handlers.watch,
        None,
        widgets.progress_outputs,
        api_name="watch_queued",
        concurrency_limit=None,
        show_progress="hidden",
    )
    return tab


# -- layout ---------------------------------------------------------------------------------------


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


# -- handlers -------------------------------------------------------------------------------------


def preset_in_force(base_model: str, kind: str | None) -> str:
    """The preset that choosing `kind` gives on this base model: on the demo model, always the Demo preset."""
    from sdlora.training.presets import preset_for

    return preset_for(base_model, kind if kind in PRESET_KINDS else PRESET_KINDS[-1])


def preset_radio(base_model: str) -> dict:
    """The preset radio's choices and value: only presets that can be in force here, so it shows the one that is."""
    name = preset_in_force(base_model, None)
    return {"choices": list(PRESET_KINDS) if name in PRESET_KINDS else [name], "value": name}


def preset_fields() -> tuple[str, ...]:
    """The fields some preset sets: choosing a preset sets each of them (to the preset's value or the default)."""
    from sdlora.training.presets import PRESETS, preset_settings

    names = dict.fromkeys(name for p in PRESETS for name in fields.flat(preset_settings(p)))
    return tuple(names)


def settings_object(config: dict, studio: Studio) -> dict:
    """A script's settings object, read strictly, less its base model: a server trains on its own."""
    values = read_settings(config, "settings object")
    if values.pop("base_model", studio.base_model) != studio.base_model:
        raise ConfigError(
            f"this server trains on {studio.base_model}, not {config['base_model']}; "
            "leave base_model out of the settings"
        )
    return values


def train_config(settings: dict, config: dict | None, studio: Studio, validate: bool = True) -> TrainConfig:
    """The settings widgets (by field name), or a script's settings object instead -> TrainConfig (sdlora.settings).

    A settings object is read as a --config file is: strictly (a misspelt key is refused), with what
    it leaves out taken from the base model (the demo preset on the demo model), then the defaults.
    """
    if config:
        return studio.train_config(settings_object(config, studio), "settings object", validate)
    typed = fields.as_field_types(settings, fields.train_defaults())
    return studio.train_config(fields.nested(typed), "settings", validate)


def caption_table(images, captions=None, buckets=None) -> pd.DataFrame:
    captions = captions if captions is not None else read_captions(images)
    buckets = buckets if buckets is not None else [""] * len(images)
    return pd.DataFrame(
        {"image": [p.name for p in images], "caption": captions, "bucket": buckets}, columns=CAPTION_HEADERS
    )


def captions_from_table(table) -> dict[str, str]:
    if table is None or len(table) == 0:
        return {}
    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
    frame = frame.set_axis(CAPTION_HEADERS[: len(frame.columns)], axis=1)  # a script may send two columns
    return {str(r["image"]): "" if pd.isna(r["caption"]) else str(r["caption"]) for _, r in frame.iterrows()}


def view_outputs(view: RunView) -> tuple:
    curve = pd.DataFrame(view.chart(), columns=["step", "loss", "series"])
    return view.summary(), curve, view.previews or None


class TrainHandlers:
    """The tab's event handlers: widget values in, one Studio call, widget values out."""

    def __init__(self, studio: Studio) -> None:
        self.studio = studio
        self._view_key: tuple = ()
        self._view_outputs: tuple = ()
        self._view_time = 0.0

    @readable_errors
    def show_images(self, files: list[str] | None):
        """Uploaded files -> thumbnails of the usable images and the caption table; unusable ones named at once."""
        from sdlora.training.data import image_problem

        images = self.studio.stage_upload(files or [])
        problems = {path: image_problem(path) for path in images}
        unusable = [f"{path.name}: {why}" for path, why in problems.items() if why]
        if unusable:
            gr.Warning("Training will skip " + "; ".join(unusable))
        usable = [path for path, why in problems.items() if not why]
        return usable, caption_table(images, buckets=self.studio.buckets_of(images))

    @readable_errors
    def load_example(self, example: str):
        """An example concept folder -> files, thumbnails, captions and a free adapter name.

        The trigger word stays the page's (TRIGGER_WORD in sdlora.config): one convention for every concept.
        """
        paths = self.studio.example_files(example)
        images = [p for p in paths if p.suffix.lower() != ".txt"]
        name = self.studio.library.unique_name(example)
        return (
            [str(p) for p in paths],
            images,
            caption_table(images, buckets=self.studio.buckets_of(images)),
            name,
        )

    @staticmethod
    def loaded_summary(captions=None) -> str:
        """How many images the caption table holds and how many have a caption: the file box shows only a few."""
        typed = captions_from_table(captions)
        if not typed:
            return ""
        written = sum(bool(text.strip()) for text in typed.values())
        images = f"{len(typed)} image{'s' * (len(typed) != 1)}"
        return f"**{images} loaded**, {written} with a caption. Edit the captions in the table below."

    @readable_errors
    def caption_images(
        self,
        images: list[str] | None,
        captions=None,
        prefix: str = "",
        overwrite: bool = False,
        trigger_word: str = "",
        progress=gr.Progress(),  # noqa: B008 - gradio finds it by default
    ):
        """Fill the caption table with the captioner's words; the user edits them before training."""
        from sdlora.captioning.captions import CaptionOptions

        if not images:
            raise ConceptImagesError("Add concept images first (drop files or a .zip, or use an example).")
        staged = self.studio.stage_upload(images)
        typed = captions_from_table(captions)
        options = CaptionOptions(prefix=(prefix or trigger_word or "").strip(), overwrite=bool(overwrite))
        result = self.studio.captioning.caption(
            staged, typed, options, on_caption=lambda c: progress((c.done, c.total), desc="Captioning")
        )
        words = [result.captions.get(p, typed.get(p.name, "")) for p in staged]
        summary = (
            f"Captions by **{self.studio.captioning.name()}**: {result.summary()}. Edit them in the table."
        )
        return caption_table(staged, words, self.studio.buckets_of(staged)), summary

    @readable_errors
    def fill_preset(self, kind: str) -> tuple:
        """The preset for this kind on the server's model -> the preset fields' widgets, preview interval, note."""
        from sdlora.training.presets import NOTES, preset_settings

        name = self.preset_in_force(kind)
        values = {**fields.train_defaults(), **fields.flat(preset_settings(name))}
        note = f"Preset **{name}**: {NOTES[name]}"
        shown = [list(v) if isinstance(v, tuple) else v for v in (values[n] for n in preset_fields())]
        return (*shown, preview_interval(values["steps"]), note)

    def preset_in_force(self, kind: str | None) -> str:
        """The preset that a choice of `kind` gives on the server's model."""
        return preset_in_force(self.studio.base_model, kind)

    def preset_choices(self) -> gr.Radio:
        """The preset radio for the server's model (its model may have changed since the page was built)."""
        return gr.Radio(**preset_radio(self.studio.base_model))

    def estimate(self, captions=None, preset: str | None = None, **settings) -> str:
        """Settings by field name (and the caption table: its empty rows are captioning time) -> one line,
        with a warning when the run is too short to show anything."""
        from sdlora.training.presets import short_run_warning

        uncaptioned = sum(not text.strip() for text in captions_from_table(captions).values())
        try:
            config = train_config(settings, None, self.studio, validate=False)
            text = "Estimate: " + self.studio.estimate(config, uncaptioned).text + "."
        except SdloraError as exc:
            return f"No estimate yet: {exc}"
        warnings = [short_run_warning(self.preset_in_force(preset), config.steps)]
        if config.preview_every > config.steps:
            warnings.append(
                f"Previews every {config.preview_every} steps: none will appear in {config.steps}."
            )
        return "\n\n".join([text, *(f"⚠ {w}" for w in warnings if w)])

    @readable_errors
    def start(
        self,
        files: list[str] | None = None,
        captions=None,
        config: dict | None = None,
        request: gr.Request = None,
        **settings,
    ):
        """Queue a job on the uploaded files (it starts at once when the queue is idle); returns the first view."""
        self.queue_job(files, captions, config, client=serving.client_of(request), **settings)
        return self._outputs()

    def queue_job(
        self,
        files: list[str] | None = None,
        captions=None,
        config: dict | None = None,
        client: str = "",
        **settings,
    ):
        """Add a training job on the uploaded files (or a settings object's server folder) to the queue, for `client`."""
        given = settings_object(config, studio=self.studio) if config else {}
        files = list(files or [])
        if not files and given.get("data", {}).get("images"):  # a concept folder on the server
            files = self.studio.concept_folder_files(given["data"]["images"])
        if not files:
            raise ConceptImagesError("Add concept images first (drop files or a .zip, or use an example).")
        # The job trains on its own copy of the files, which the studio stages: until then "(uploaded)".
        uploaded = {"data": {"images": "(uploaded)"}}
        placed = merge_settings(given, uploaded) if config else None
        run_config = train_config({**settings, "images": "(uploaded)"}, placed, self.studio)
        return self.studio.queue_training(run_config, files, captions_from_table(captions), client)

    async def watch(self):
        """Stream the server's run until it ends; awaits between polls, so an open page holds no thread."""
        shown = None
        while True:
            running = self._active  # read first: once it is False, the outputs below hold the run's end
            outputs = self._outputs()
            if outputs is not shown:
                shown = outputs
                yield outputs
            if not running:
                return
            await asyncio.sleep(POLL_SECONDS)

    async def stop(self):
        """Ask the run to save and stop after its current step; on the event loop, so it never waits for a thread."""
        if not self.studio.stop_training():
            gr.Warning("No training run is in progress.")
        return self._outputs()

    def controls(self) -> tuple:
        """Stop is clickable only while a run goes; the loss chart shows once there is a loss to draw."""
        _, curve, _ = self._outputs()
        return gr.Button(interactive=self._active), gr.LinePlot(visible=len(curve) > 0)

    @property
    def _active(self) -> bool:
        """A job runs, or the queue holds one that is about to: the stream follows the queue's next job too."""
        run = self.studio.run
        return (run is not None and run.running) or self.studio.queue.pending()

    def _outputs(self) -> tuple:
        """The run's view as widget values, built once per change however many pages watch it."""
        run = self.studio.run
        key = (id(run), len(run.events), run.running, run.stop.requested) if run is not None else ()
        # A running job adds an event every step: fold them at most twice per poll, not once per page.
        fresh = (
            time.monotonic() - self._view_time < POLL_SECONDS / 2
            and key[:1] == self._view_key[:1]
            and key[2:] == self._view_key[2:]
        )
        if self._view_outputs and (key == self._view_key or fresh):
            return self._view_outputs
        self._view_key, self._view_time = key, time.monotonic()
        self._view_outputs = view_outputs(studio_view(self.studio))
        return self._view_outputs


# -- wiring ---------------------------------------------------------------------------------------


def preset_outputs(w: TrainWidgets) -> list:
    return [*(w.settings[name] for name in preset_fields()), w.settings["preview_every"], w.preset_note]


def wire(w: TrainWidgets, h: TrainHandlers) -> TrainTab:
    """Connect the tab's events to its handlers; every event has an api_name."""
    s = w.settings
    events = {
        "upload_images": w.files.upload(
            h.show_images, w.files, [w.thumbnails, w.captions], api_name="upload_images"
        ),
        "steps": s["steps"].input(
            lambda steps: preview_interval(int(steps or 0)),
            s["steps"],
            s["preview_every"],
            api_name="preview_interval",
            show_progress="hidden",
            trigger_mode="always_last",
        ),
        "clear_images": w.files.clear(
            lambda: ([], caption_table([])), None, [w.thumbnails, w.captions], api_name="clear_images"
        ),
        "use_example": w.use_example.click(
            h.load_example,
            w.example,
            [w.files, w.thumbnails, w.captions, s["name"]],
            api_name="use_example",
        ),
        "caption_images": w.caption_button.click(
            h.caption_images,
            [w.files, w.captions, w.caption_prefix, w.caption_overwrite, s["trigger_word"]],
            [w.captions, w.caption_summary],
            api_name="caption_images",
        ),
        "apply_preset": w.preset.input(h.fill_preset, w.preset, preset_outputs(w), api_name="apply_preset"),
        "estimate": gr.on(
            [
                s["preview_every"].input,
                s["resolution"].input,
                s["rank"].input,
                s["batch_size"].input,
                w.captions.change,
            ],
            h.estimate,
            [w.captions, w.preset],
            w.estimate,
            inputs_kwargs=s,
            api_name="estimate",
            show_progress="hidden",
            trigger_mode="always_last",
        ),
        "stop": w.stop_button.click(
            h.stop, None, w.progress_outputs, api_name="stop", concurrency_limit=None
        ),
    }
    for loaded in ("use_example", "upload_images"):  # the file box shows a few files: say how many there are
        events[loaded].success(
            h.loaded_summary,
            w.captions,
            w.caption_summary,
            api_name=f"{loaded}_summary",
            show_progress="hidden",
        )
    w.status.change(
        h.controls, None, [w.stop_button, w.curve], api_name="run_controls", show_progress="hidden"
    )
    events["steps"].then(
        h.estimate,
        [w.captions, w.preset],
        w.estimate,
        inputs_kwargs=s,
        api_name="estimate_after_steps",
        show_progress="hidden",
    )
    events["apply_preset"].success(
        h.estimate,
        [w.captions, w.preset],
        w.estimate,
        inputs_kwargs=s,
        api_name="estimate_after_preset",
        show_progress="hidden",
    )
    events["train"] = w.start_button.click(
        h.start, [w.files, w.captions, w.config], w.progress_outputs, inputs_kwargs=s, api_name="train"
    )
    watched = events["train"].success(
        h.watch,
        None,
        w.progress_outputs,
        api_name="watch_training",
        concurrency_limit=None,
        show_progress="hidden",
    )
    # The run measured this machine's speed: the estimate for the same settings now uses it.
    watched.then(
        h.estimate,
        [w.captions, w.preset],
        w.estimate,
        inputs_kwargs=s,
        api_name="estimate_after_run",
        show_progress="hidden",
    )
    return TrainTab(widgets=w, handlers=h, finished=watched, events=events)


def studio_view(studio: Studio) -> RunView:
    """The current (or last) run of this server as a RunView."""
    run = studio.run
    if run is None:
        return RunView()
    return view_run(run.snapshot(), studio.run_name, run.running, run.stop.requested)
