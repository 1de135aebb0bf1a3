"""The Generate tab: prompt and sampler settings, adapters at weights, a gallery with parameters."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from sdlora.config import MAX_BLOCK_WEIGHTS_CHARS, AdapterWeight, GenerateConfig, field_help
from sdlora.models.families.base import SamplingDefaults
from sdlora.ui import fields
from sdlora.ui.messages import readable_errors
from sdlora.ui.studio import Studio

ADAPTER_SLOTS = 4
WEIGHT_RANGE = (-1.0, 2.0)


@dataclass
class GenerateWidgets:
    """Every component of the tab; `settings` maps GenerateConfig field names (and adapter_N, weight_N) to widgets."""

    settings: dict[str, gr.components.Component]
    adapter_pickers: list[gr.Dropdown]
    comparison_grid: gr.Checkbox
    button: gr.Button
    gallery: gr.Gallery
    grid_image: gr.Image
    parameters: gr.Textbox


@dataclass
class GenerateTab:
    adapter_pickers: list[gr.Dropdown]
    widgets: GenerateWidgets
    handlers: GenerateHandlers

    def on_page_load(self, demo: gr.Blocks) -> gr.Dependency:
        """Steps, guidance and sampler as the server's model (known once loaded) draws best."""
        w = self.widgets
        return demo.load(
            self.handlers.model_settings,
            None,
            model_setting_widgets(w),
            api_name="generate_settings_on_load",
            show_progress="hidden",
        )


def generate_config(settings: dict) -> GenerateConfig:
    """Widget values by field name -> GenerateConfig; adapter_N/weight_N/block_weights_N with an empty name
    are skipped."""
    values = dict(settings)
    slots = [
        (
            values.pop(f"adapter_{i}", None),
            values.pop(f"weight_{i}", 1.0),
            values.pop(f"block_weights_{i}", ""),
        )
        for i in range(1, ADAPTER_SLOTS + 1)
    ]
    adapters = tuple(AdapterWeight(str(n), float(w), str(b or "").strip()) for n, w, b in slots if n)
    defaults = {name: info["default"] for name, info in field_help(GenerateConfig).items()}
    return GenerateConfig(**fields.as_field_types(values, defaults), adapters=adapters)


def adapter_slot(i: int, settings: dict) -> gr.Dropdown:
    """One adapter picker with its weight slider and block weights, as settings adapter_i, weight_i and
    block_weights_i; returns the picker."""
    with gr.Row(equal_height=True):
        picker = settings[f"adapter_{i}"] = gr.Dropdown(
            [], value=None, label=f"Adapter {i}", allow_custom_value=True, scale=2, elem_id=f"adapter-{i}"
        )
        settings[f"weight_{i}"] = gr.Slider(
            *WEIGHT_RANGE, 1.0, step=0.05, label="Weight", scale=3, elem_id=f"weight-{i}"
        )
        settings[f"block_weights_{i}"] = gr.Textbox(
            "",
            label="Block weights",
            placeholder="all blocks; or OUTALL, 1,0,0,...",
            scale=2,
            max_length=MAX_BLOCK_WEIGHTS_CHARS,
            elem_id=f"block-weights-{i}",
        )
    return picker


def build(studio: Studio) -> GenerateTab:
    """Lay out the Generate tab and wire its events."""
    model_words, defaults = studio.sampling_defaults()
    widgets = layout(defaults, model_words)
    handlers = GenerateHandlers(studio)
    wire(widgets, handlers)
    return GenerateTab(adapter_pickers=widgets.adapter_pickers, widgets=widgets, handlers=handlers)


def model_setting_widgets(w: GenerateWidgets) -> list[gr.components.Component]:
    """The widgets whose values and visibility follow the base model."""
    return [w.settings[name] for name in ("steps", "guidance", "scheduler", "negative_prompt")]


def guidance_help(defaults: SamplingDefaults, model_words: str) -> str:
    """The guidance field's help: classifier-free for most models, a distilled input for Flux.1 dev."""
    if defaults.negative_prompt_used:
        return field_help(GenerateConfig)["guidance"]["help"]
    return f"How closely the image follows the prompt: {model_words}'s distilled guidance input (no negative prompt)."


def model_setting_updates(defaults: SamplingDefaults, model_words: str) -> list[dict]:
    """Values, choices and visibility of `model_setting_widgets` for a model with these defaults."""
    own = len(defaults.samplers) == 1
    return [
        gr.update(value=defaults.steps),
        gr.update(
            value=defaults.guidance, visible=defaults.guidance_used, info=guidance_help(defaults, model_words)
        ),
        gr.update(
            choices=list(defaults.samplers),
            value=defaults.samplers[0],
            interactive=not own,
            info=f"{model_words}'s own flow-matching sampler" if own else None,
        ),
        gr.update(visible=defaults.negative_prompt_used),
    ]


def layout(defaults: SamplingDefaults, model_words: str = "") -> GenerateWidgets:
    """Declare the tab's components; steps, guidance and sampler as the base model draws best, every
    other default and help line from GenerateConfig."""
    d = {name: info["default"] for name, info in field_help(GenerateConfig).items()}
    info = {name: meta["help"] for name, meta in field_help(GenerateConfig).items()}
    s: dict[str, gr.components.Component] = {}
    with gr.Row():
        with gr.Column(scale=2):
            s["prompt"] = gr.Textbox(
                label="Prompt",
                lines=2,
                elem_id="prompt",
                placeholder="a photo of sks; tags like <lora:name:0.8> work too",
            )
            s["negative_prompt"] = gr.Textbox(
                d["negative_prompt"],
                label="Negative prompt",
                info=info["negative_prompt"],
                visible=defaults.negative_prompt_used,
                elem_id="negative-prompt",
            )
            with gr.Row():
                # No precision=0 on these: gradio's rounding turns NaN into an error no client
                # sees; as floats they reach GenerateConfig, whose check names the field.
                s["seed"] = gr.Number(d["seed"], label="Seed (-1: random)", minimum=-1, elem_id="seed")
                s["count"] = gr.Slider(1, 8, d["count"], step=1, label="Images", info=info["count"])
            with gr.Row():
                s["steps"] = gr.Slider(
                    1,
                    100,
                    defaults.steps,
                    step=1,
                    label="Steps",
                    info=info["steps"],
                    elem_id="generate-steps",
                )
                s["guidance"] = gr.Slider(
                    0,
                    20,
                    defaults.guidance,
                    step=0.5,
                    label="Guidance",
                    info=guidance_help(defaults, model_words),
                    visible=defaults.guidance_used,
                    elem_id="generate-guidance",
                )
            with gr.Row():
                s["width"] = gr.Number(
                    d["width"], label="Width (0: model native)", minimum=0, step=8, elem_id="generate-width"
                )
                s["height"] = gr.Number(
                    d["height"],
                    label="Height (0: model native)",
                    minimum=0,
                    step=8,
                    elem_id="generate-height",
                )
                own = len(defaults.samplers) == 1
                s["scheduler"] = gr.Dropdown(
                    list(defaults.samplers),
                    value=defaults.samplers[0],
                    label="Scheduler",
                    interactive=not own,
                    info=f"{model_words}'s own flow-matching sampler" if own else None,
                    elem_id="scheduler",
                )
            gr.Markdown("**Adapters** from the library, each at its own weight")
            with gr.Group():
                pickers = [adapter_slot(i, s) for i in (1, 2)]
            with gr.Accordion("More adapters", open=False), gr.Group():
                pickers += [adapter_slot(i, s) for i in range(3, ADAPTER_SLOTS + 1)]
            grid = gr.Checkbox(
                False,
                label="Also a comparison grid",
                elem_id="comparison-grid",
                info="one adapter: at weights 0, 0.5 and 1; several: the base beside each",
            )
            button = gr.Button("Generate", variant="primary", elem_id="generate-button")
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Results",
                columns=3,
                height=300,
                format="png",
                object_fit="contain",
                fit_columns=False,
                elem_id="results",
            )
            grid_image = gr.Image(
                label="Comparison grid", type="filepath", interactive=False, elem_id="comparison", height=440
            )  # a grid holds a dozen images: it gets the room, so each cell stays readable
            parameters = gr.Textbox(
                label="Parameters of the selected image", lines=3, buttons=["copy"], elem_id="parameters"
            )
    return GenerateWidgets(
        settings=s,
        adapter_pickers=pickers,
        comparison_grid=grid,
        button=button,
        gallery=gallery,
        grid_image=grid_image,
        parameters=parameters,
    )


class GenerateHandlers:
    """The tab's event handlers over the Studio."""

    def __init__(self, studio: Studio) -> None:
        self.studio = studio

    @readable_errors
    def generate(
        self,
        comparison_grid: bool = False,
        adapter_1: str | None = None,
        adapter_2: str | None = None,
        adapter_3: str | None = None,
        adapter_4: str | None = None,
        **settings,
    ):
        """Settings by name (GenerateConfig's fields, adapter_N, weight_N, block_weights_N) -> images,
        parameters, optional grid.

        An adapter slot left out (None) is empty; the names default to None so scripts may leave them out.
        """
        slots = {
            "adapter_1": adapter_1,
            "adapter_2": adapter_2,
            "adapter_3": adapter_3,
            "adapter_4": adapter_4,
        }
        config = generate_config({**settings, **slots})
        images = self.studio.generate(config)
        grid = self.studio.comparison_grid(config) if comparison_grid else None
        return [(str(i.path), i.parameters) for i in images], images[0].parameters, grid and str(grid.path)

    def model_settings(self) -> list[dict]:
        """Steps, guidance, sampler and negative prompt as the server's model draws best."""
        model_words, defaults = self.studio.sampling_defaults()
        return model_setting_updates(defaults, model_words)

    @staticmethod
    def show_parameters(event: gr.SelectData) -> str:
        """The parameters of the image picked in the gallery."""
        return (event.value or {}).get("caption") or ""


def wire(w: GenerateWidgets, h: GenerateHandlers) -> None:
    """Connect the tab's events to its handlers; every event has an api_name."""
    gr.on(
        [w.button.click, w.settings["prompt"].submit],
        h.generate,
        w.comparison_grid,
        [w.gallery, w.parameters, w.grid_image],
        inputs_kwargs=w.settings,
        api_name="generate",
        concurrency_limit=32,
    )  # many at once: the studio draws concurrent requests together in shared calls
    w.gallery.select(h.show_parameters, None, w.parameters, api_name="show_parameters")
