"""The Generate tab: prompt and sampler settings, adapters at weights, a gallery with parameters."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from sdlora.config import SCHEDULERS, AdapterWeight, GenerateConfig
from sdlora.ui.messages import readable_errors
from sdlora.ui.studio import Studio

ADAPTER_SLOTS = 4
WEIGHT_RANGE = (-1.0, 2.0)


@dataclass
class GenerateTab:
    adapter_pickers: list[gr.Dropdown]


def generate_config(prompt: str, negative: str, seed: float, steps: float, guidance: float, width: float,
                    height: float, scheduler: str, count: float, *slots):
    """Widget values -> GenerateConfig; `slots` alternate adapter name and weight, empty names skipped."""
    pairs = zip(slots[0::2], slots[1::2], strict=True)
    adapters = tuple(AdapterWeight(str(n), float(w)) for n, w in pairs if n)
    return GenerateConfig(prompt=prompt, negative_prompt=negative or "", seed=int(seed), steps=int(steps),
                          guidance=float(guidance), width=int(width or 0), height=int(height or 0),
                          scheduler=scheduler, adapters=adapters, count=int(count))


def adapter_slot(i: int, pickers: list) -> list:
    """One adapter picker with its weight slider; returns both as event inputs."""
    with gr.Row(equal_height=True):
        picker = gr.Dropdown([], value=None, label=f"Adapter {i + 1}", allow_custom_value=True, scale=2,
                             elem_id=f"adapter-{i + 1}")
        weight = gr.Slider(*WEIGHT_RANGE, 1.0, step=0.05, label="Weight", scale=3, elem_id=f"weight-{i + 1}")
    pickers.append(picker)
    return [picker, weight]


def build(studio: Studio) -> GenerateTab:
    """Lay out the Generate tab and wire its events; the widgets start from GenerateConfig's defaults."""
    defaults = GenerateConfig(prompt="")
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                placeholder="a photo of sks; tags like <lora:name:0.8> work too")
            negative = gr.Textbox(defaults.negative_prompt, label="Negative prompt")
            with gr.Row():
                seed = gr.Number(defaults.seed, label="Seed (-1: random)", precision=0, minimum=-1,
                                 elem_id="seed")
                count = gr.Slider(1, 8, defaults.count, step=1, label="Images")
            with gr.Row():
                steps = gr.Slider(1, 100, defaults.steps, step=1, label="Steps")
                guidance = gr.Slider(0, 20, defaults.guidance, step=0.5, label="Guidance")
            with gr.Row():
                width = gr.Number(defaults.width, label="Width (0: model native)", precision=0, minimum=0, step=8)
                height = gr.Number(defaults.height, label="Height (0: model native)", precision=0, minimum=0,
                                   step=8)
                scheduler = gr.Dropdown(list(SCHEDULERS), value=defaults.scheduler, label="Scheduler")
            gr.Markdown("**Adapters** from the library, each at its own weight")
            slots, pickers = [], []
            with gr.Group():
                for i in range(2):
                    slots += adapter_slot(i, pickers)
            with gr.Accordion("More adapters", open=False), gr.Group():
                for i in range(2, ADAPTER_SLOTS):
                    slots += adapter_slot(i, pickers)
            grid_wanted = gr.Checkbox(False, label="Also a comparison grid", elem_id="comparison-grid",
                                      info="one adapter: at weights 0, 0.5 and 1; several: the base beside each")
            button = gr.Button("Generate", variant="primary", elem_id="generate-button")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Results", columns=2, height=400, format="png", object_fit="contain",
                                 fit_columns=False, elem_id="results")
            grid_image = gr.Image(label="Comparison grid", type="filepath", interactive=False, elem_id="comparison",
                                  height=300)
            parameters = gr.Textbox(label="Parameters of the selected image", lines=3, buttons=["copy"],
                                    elem_id="parameters")

    @readable_errors
    def generate(*values):
        *settings, with_grid = values
        config = generate_config(*settings)
        images = studio.generate(config)
        grid = studio.comparison_grid(config) if with_grid else None
        return [(str(i.path), i.parameters) for i in images], images[0].parameters, grid and str(grid.path)

    def show_parameters(event: gr.SelectData):
        return (event.value or {}).get("caption") or ""

    inputs = [prompt, negative, seed, steps, guidance, width, height, scheduler, count, *slots, grid_wanted]
    # Many at once: the studio draws concurrent requests together in shared pipeline calls.
    gr.on([button.click, prompt.submit], generate, inputs, [gallery, parameters, grid_image], api_name="generate",
          concurrency_limit=32)
    gallery.select(show_parameters, None, parameters, api_name="show_parameters")
    return GenerateTab(adapter_pickers=pickers)
