"""The Library tab's "Block weights" panel: save the picked adapter with a weight per block applied."""

from __future__ import annotations

import gradio as gr

from sdlora.config import MAX_BLOCK_WEIGHTS_CHARS
from sdlora.ui.messages import readable_errors
from sdlora.ui.studio import Studio

HELP = (
    "A weight per block, as the LoRA Block Weight extension writes it: a preset (INS, IND, INALL, MIDD, "
    "OUTD, OUTS, OUTALL, ALL, NONE) or the weights themselves, 17 for SD 1.x/2.x "
    "(BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00 the middle block, OUT03-OUT11), 12 for SDXL. "
    "In a prompt: `<lora:name:0.8:lbw=OUTALL>`."
)


class BlockWeightsHandlers:
    """The panel's handler over the Studio's adapter library."""

    def __init__(self, studio: Studio, refresh) -> None:
        self.studio = studio
        self.refresh = refresh

    @readable_errors
    def save(self, adapter_name: str, block_weights: str, new_name: str):
        """Save `adapter_name` with `block_weights` applied as the new adapter `new_name`; picks it."""
        from sdlora.library.tools.block_weights import save_with_block_weights

        if not (adapter_name or "").strip():
            raise gr.Error("Pick an adapter in the table first.", print_exception=False)
        text = (block_weights or "").strip()
        wanted = (new_name or "").strip() or f"{adapter_name}-{'blocks' if ',' in text else text.lower()}"
        info = save_with_block_weights(self.studio.library, adapter_name, block_weights or "", wanted)
        gr.Info(f"Saved {info.name} with block weights {text}.")
        return *self.refresh(), info.name


def build(studio: Studio, name: gr.Textbox, listing: list, refresh) -> None:
    """The "Block weights" accordion under the tab, acting on the picked adapter (`name`)."""
    with gr.Accordion("Block weights", open=False, elem_id="block-weights-panel"):
        gr.Markdown(HELP)
        with gr.Row(equal_height=True):
            weights = gr.Textbox(
                label="Block weights",
                placeholder="OUTALL, or 1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
                max_length=MAX_BLOCK_WEIGHTS_CHARS,
                scale=3,
                elem_id="block-weights-text",
            )
            new_name = gr.Textbox(label="Save as (empty: name-preset)", scale=2, elem_id="block-weights-name")
            button = gr.Button("Save with block weights", scale=1, elem_id="block-weights-save")
    handlers = BlockWeightsHandlers(studio, refresh)
    button.click(handlers.save, [name, weights, new_name], [*listing, name], api_name="save_block_weights")
