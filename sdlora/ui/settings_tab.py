"""The Settings tab: the base model and what is loaded now, device, precision and folders."""

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
    lines = [f"**Base model**: `{model['base_model'] or '(none)'}`: {model['state']}"]
    if model["state"] == "loaded":
        lines.append(f"Stable Diffusion family `{model['family']}`, native size {model['resolution']} px, "
                     f"{model['prediction']} prediction")
        lines.append(f"**Device**: `{model['device']}`, **precision**: `{model['precision']}`")
    lines.append("**Folders**\n\n"
                 f"- adapters (the library): `{studio.adapters_dir}`\n"
                 f"- example concepts: `{studio.concepts_dir}`"
                 f"{'' if studio.example_concepts() else ' (none found)'}\n"
                 f"- generated images, uploads and downloads: `{studio.work_dir}`")
    return "\n\n".join(lines)


def build(studio: Studio) -> SettingsTab:
    """Lay out the Settings tab and wire its events."""
    status = gr.Markdown(status_text(studio), elem_id="model-status")
    with gr.Row(equal_height=True):
        base_model = gr.Textbox(studio.base_model, label="Base model",
                                info="A Hugging Face hub id, a local diffusers folder, or a single .safetensors "
                                     "file. Used for training and generation.", scale=4, elem_id="base-model")
        load_button = gr.Button("Load", variant="primary", scale=1, elem_id="load-button")
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
