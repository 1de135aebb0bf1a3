"""The Train tab: concept images with captions, settings from a preset, a run with live progress.

Three parts, as gradio's own Blocks demos keep them: `train_layout.layout` declares the widgets,
`train_handlers.TrainHandlers` holds plain functions over the Studio, and `wire` here connects the
widgets' events to them; every event has an api_name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from sdlora.config import preview_interval
from sdlora.ui import checkpoints_view, queue_view
from sdlora.ui.studio import Studio
from sdlora.ui.train_handlers import TrainHandlers, caption_table, preset_fields
from sdlora.ui.train_layout import TrainWidgets, layout


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


def preset_outputs(w: TrainWidgets) -> list:
    return [*(w.settings[name] for name in preset_fields()), w.settings["preview_every"], w.preset_note]


def wire(w: TrainWidgets, h: TrainHandlers) -> TrainTab:
    """Connect the tab's events to its handlers; every event has an api_name."""
    s = w.settings
    events = {
        "upload_images": w.files.upload(
            h.show_images, [w.files, s["resolution"]], [w.thumbnails, w.captions], api_name="upload_images"
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
