"""The Train tab's checkpoint adapters: a grid of checkpoints x weights with each validation loss under its
column (and, on the demo model, the demo evaluator's figures, also listed under the grid), and "Keep this
one", which makes the chosen checkpoint the adapter. Gradio only: the engine's checkpoint_grid and
checkpoint_adapters do the work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import gradio as gr

from sdlora.errors import SdloraError
from sdlora.generation.checkpoint_grid import Comparison, column_label, compare_checkpoints
from sdlora.training.checkpoint_adapters import best_checkpoint, keep_checkpoint, list_checkpoint_adapters

if TYPE_CHECKING:
    from sdlora.ui.studio import Studio


@dataclass
class CheckpointWidgets:
    name: gr.Textbox
    checkpoint: gr.Dropdown
    weights: gr.Textbox
    prompt: gr.Textbox
    grid: gr.Image
    figures: gr.Markdown
    message: gr.Markdown


class CheckpointHandlers:
    """List, compare and keep the checkpoint adapters of a run (the last one unless named)."""

    def __init__(self, studio: Studio) -> None:
        self.studio = studio

    def _name(self, name: str) -> str:
        name = (name or "").strip() or self.studio.run_name
        if not name:
            raise gr.Error("Name an adapter, or train one first.")
        return name

    def choices(self, name: str = ""):
        """The checkpoints as dropdown choices, the lowest validation loss chosen."""
        name = self._name(name)
        saved = list_checkpoint_adapters(self.studio.adapters_dir, name)
        best = best_checkpoint(saved)
        options = [(f"step {c.step} · {column_label(c, best)}", str(c.step)) for c in saved]
        chosen = str((best or saved[-1]).step) if saved else None
        return gr.Dropdown(choices=options, value=chosen), name

    def compare(self, name: str = "", weights: str = "1.0", prompt: str = ""):
        """The grid of checkpoints x weights at two fixed seeds, and the evaluator's figures where there are some."""
        name = self._name(name)
        try:
            values = tuple(float(w) for w in str(weights).split(",") if w.strip()) or (1.0,)
        except ValueError:
            raise gr.Error(f"weights {weights!r}: numbers separated by commas, e.g. 0.5,1.0") from None
        comparison = Comparison(
            weights=values, prompts=(prompt.strip(),) if prompt.strip() else (), seeds=(1, 2)
        )
        try:
            compared = compare_checkpoints(self.studio.base_model, self.studio.adapters_dir, name, comparison)
        except SdloraError as exc:
            raise gr.Error(str(exc)) from None
        figures = "\n".join(f"- {line}" for line in compared.summary()) if compared.scores else ""
        return compared.image, figures

    def keep(self, name: str = "", step: str | None = None) -> str:
        """Make the chosen checkpoint the adapter."""
        name = self._name(name)
        if not step:
            raise gr.Error("Choose a checkpoint first.")
        try:
            keep_checkpoint(self.studio.adapters_dir, name, int(step))
        except SdloraError as exc:
            raise gr.Error(str(exc)) from None
        self.studio.forget_adapter(name)
        return (
            f"**{name}** is now the adapter of step {step}; the other checkpoints stay until it is deleted."
        )


def build(studio: Studio) -> CheckpointWidgets:
    """Lay out the checkpoint section and wire its events (each with an api_name)."""
    handlers = CheckpointHandlers(studio)
    with gr.Accordion("Checkpoints: compare and keep one", open=False, elem_id="checkpoints"):
        with gr.Row():
            name = gr.Textbox(label="Adapter", placeholder="the last run", elem_id="checkpoint-adapter")
            checkpoint = gr.Dropdown(label="Checkpoint", choices=[], elem_id="checkpoint-step")
            weights = gr.Textbox("0.5,1.0", label="Weights", elem_id="checkpoint-weights")
            prompt = gr.Textbox(label="Prompt", placeholder="the trigger word", elem_id="checkpoint-prompt")
        with gr.Row():
            compare = gr.Button("Compare checkpoints", elem_id="compare-checkpoints")
            keep = gr.Button("Keep this one", variant="primary", elem_id="keep-checkpoint")
        message = gr.Markdown(elem_id="checkpoint-message")
        grid = gr.Image(label="Checkpoints x weights", type="pil", format="png", elem_id="checkpoint-grid")
        figures = gr.Markdown(elem_id="checkpoint-figures")
    compare.click(handlers.choices, name, [checkpoint, name], api_name="checkpoints").then(
        handlers.compare, [name, weights, prompt], [grid, figures], api_name="compare_checkpoints"
    )
    keep.click(handlers.keep, [name, checkpoint], message, api_name="keep_checkpoint")
    return CheckpointWidgets(name, checkpoint, weights, prompt, grid, figures, message)
