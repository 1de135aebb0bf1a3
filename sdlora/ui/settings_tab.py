"""The Settings tab: the base model and what is loaded now, device, precision, folders and captioners."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from sdlora.ui.messages import readable_errors
from sdlora.ui.studio import Studio


@dataclass
class SettingsTab:
    status: gr.Markdown
    show: object  # handler: () -> status Markdown


def status_text(studio: Studio) -> str:
    """Markdown: the base model's state, the device and precision, and the folders in use."""
    model = studio.model_status()
    rows = [("Base model", f"`{model['base_model'] or '(none)'}`"), ("State", model["state"])]
    if model["state"] == "loaded":
        rows += [
            (
                "Family",
                f"{model['family']}, native size {model['resolution']} px, {model['prediction']} prediction",
            ),
            ("Device", f"`{model['device']}`"),
            ("Precision", f"`{model['precision']}`"),
        ]
    examples = ", ".join(studio.example_concepts()) or "none found"
    rows += [
        ("Adapter library", f"`{studio.adapters_dir}`"),
        ("Example concepts", f"`{studio.concepts_dir}` ({examples})"),
        ("Images, uploads, downloads", f"`{studio.work_dir}`"),
    ]
    rows += captioner_rows(studio)
    lines = [f"| {k} | {v} |" for k, v in rows]
    return "\n".join([lines[0], "| --- | --- |", *lines[1:]])


def captioner_rows(studio: Studio) -> list[tuple[str, str]]:
    """One row per captioner: present here or missing (and how to fetch it), the one "Caption images" uses."""
    from sdlora.captioning.captioners import CAPTIONERS, NOT_OFFERED, default_captioner, is_present
    from sdlora.models.hub import fetch_command

    default = default_captioner(studio.base_model)
    rows = []
    for spec in CAPTIONERS.values():
        if not spec.model_class:
            state = "present (built in)"
        elif is_present(spec):
            state = f"present: `{spec.source}` in the Hugging Face cache"
        else:
            state = f"missing: `{spec.source}`; fetch it once online with `{fetch_command(spec.source)}`"
        used = ", used by Caption images" if spec.name == default else ""
        rows.append((f"Captioner {spec.name}{used}", f"{state}; writes {spec.writes}"))
    return [*rows, ("Captioner not offered", NOT_OFFERED)]


def build(studio: Studio) -> SettingsTab:
    """Lay out the Settings tab and wire its events."""
    status, base_model, load_button, refresh_button = layout(studio)
    handlers = SettingsHandlers(studio)
    load_button.click(handlers.load, base_model, status, api_name="load_base_model")
    refresh_button.click(handlers.show, None, status, api_name="settings")
    return SettingsTab(status=status, show=handlers.show)


def layout(studio: Studio) -> tuple[gr.Markdown, gr.Textbox, gr.Button, gr.Button]:
    """The status table, the base model box and its buttons; a shared server shows its model read-only."""
    status = gr.Markdown(status_text(studio), elem_id="model-status")
    switchable = studio.access.model_switch
    info = (
        "A Hugging Face hub id, a local diffusers folder, or a single .safetensors file. Used for training "
        "and generation."
        if switchable
        else "Set by the server (--base-model): this server is shared, and its one model serves everyone."
    )
    with gr.Row(equal_height=True):
        base_model = gr.Textbox(
            studio.base_model,
            label="Base model",
            info=info,
            scale=4,
            elem_id="base-model",
            interactive=switchable,
        )
        with gr.Column(scale=1, min_width=120):
            load_button = gr.Button("Load", variant="primary", elem_id="load-button", visible=switchable)
            refresh_button = gr.Button("Refresh", size="sm")
    return status, base_model, load_button, refresh_button


class SettingsHandlers:
    """The tab's event handlers over the Studio."""

    def __init__(self, studio: Studio) -> None:
        self.studio = studio

    @readable_errors
    def load(self, source: str) -> str:
        """Switch the base model (where this server allows it) and load it now."""
        self.studio.set_base_model(source)
        gr.Info(f"Loaded {source}.")
        return status_text(self.studio)

    def show(self) -> str:
        """The status table as it is now."""
        return status_text(self.studio)
