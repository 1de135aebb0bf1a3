"""The Train tab's handlers: plain functions over the Studio, widget values in and out."""

from __future__ import annotations

import asyncio
import time

import gradio as gr
import pandas as pd

from sdlora.config import TrainConfig, merge_settings, preview_interval, read_settings
from sdlora.errors import ConceptImagesError, ConfigError, SdloraError
from sdlora.ui import fields, serving
from sdlora.ui.messages import readable_errors
from sdlora.ui.run_view import RunView, view_run
from sdlora.ui.studio import Studio
from sdlora.ui.train_layout import CAPTION_HEADERS, preset_in_force, preset_radio
from sdlora.ui.uploads import read_captions

POLL_SECONDS = 0.5


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
    def show_images(self, files: list[str] | None, resolution: float | None = None):
        """Uploaded files -> thumbnails of the usable images and the caption table; unusable ones named at once."""
        from sdlora.training.data import image_problem

        images = self.studio.stage_upload(files or [])
        problems = {path: image_problem(path) for path in images}
        unusable = [f"{path.name}: {why}" for path, why in problems.items() if why]
        if unusable:
            gr.Warning("Training will skip " + "; ".join(unusable))
        usable = [path for path, why in problems.items() if not why]
        return usable, caption_table(images, buckets=self.studio.buckets_of(images, resolution))

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


def studio_view(studio: Studio) -> RunView:
    """The current (or last) run of this server as a RunView."""
    run = studio.run
    if run is None:
        return RunView()
    return view_run(run.snapshot(), studio.run_name, run.running, run.stop.requested)
