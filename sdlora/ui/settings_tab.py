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
        rows += [("Family", f"{model['family']}, native size {model['resolution']} px, {model['prediction']} prediction"),
                 ("Device", f"`{model['device']}`"), ("Precision", f"`{model['precision']}`")]
    examples = ", ".join(studio.example_concepts()) or "none found"
    rows += [("Adapter library", f"`{studio.adapters_dir}`"),
             ("Example concepts", f"`{studio.concepts_dir}` ({examples})"),
             ("Images, uploads, downloads", f"`{studio.work_dir}`")]
    rows += captioner_rows(studio)
    lines = [f"| {k} | {v} |" for k, v in rows]
    return "\n".join([lines[0], "| --- | --- |", *lines[1:]])


def captioner_rows(studio: Studio) -> list[tuple[str, str]]:
    """One row per captioner: present here or missing (and how to fetch it), the one "Caption images" uses."""
    from sdlora.captioners import CAPTIONERS, NOT_OFFERED, default_captioner, is_present
    from sdlora.hub import fetch_command

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
    status = gr.Markdown(status_text(studio), elem_id="model-status")
    with gr.Row(equal_height=True):
        base_model = gr.Textbox(studio.base_model, label="Base model",
                                info="A Hugging Face hub id, a local diffusers folder, or a single .safetensors "
                                     "file. Used for training and generation.", scale=4, elem_id="base-model")
        with gr.Column(scale=1, min_width=120):
            load_button = gr.Button("Load", variant="primary", elem_id="load-button")
            refresh_button = gr.Button("Refresh", size="sm")

    @readable_errors
    def load(source):
        studio.set_base_model(source)
        gr.Info(f"Loaded {source}.")
        return status_text(studio)

    def show():
        return status_text(studio)

    load_button.click(load, base_model, status, api_name="load_base_model")
    refresh_button.click(show, None, status, api_name="settings")
    return SettingsTab(status=status, show=show)
