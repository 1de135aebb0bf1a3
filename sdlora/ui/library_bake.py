"""The Library tab's Extract and Bake panels: widgets -> one engine call -> the report and the file."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from sdlora.errors import ConfigError
from sdlora.models.hub import looks_like_path
from sdlora.ui.messages import readable_errors
from sdlora.ui.studio import Studio

LAYOUTS = {
    "single .safetensors file": ".safetensors",
    "diffusers folder (kept on the server)": "",
}
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class BakeWidgets:
    """Every component of the two panels."""

    tuned: gr.Textbox
    base: gr.Textbox
    rank: gr.Number
    keep: gr.Number
    extract_name: gr.Textbox
    extract_button: gr.Button
    extract_report: gr.Textbox
    mix: gr.Textbox
    baked_name: gr.Textbox
    layout: gr.Radio
    precision: gr.Radio
    bake_button: gr.Button
    bake_report: gr.Textbox
    download: gr.File


def build(studio: Studio, listing: list, refresh) -> None:
    """Lay out the Extract and Bake accordions under the library and wire them; `refresh` relists it."""
    widgets, handlers = layout(studio), BakeHandlers(studio, refresh)
    w, h = widgets, handlers
    w.extract_button.click(
        h.extract,
        [w.tuned, w.base, w.rank, w.keep, w.extract_name],
        [*listing, w.extract_report],
        api_name="extract_adapter",
    )
    w.bake_button.click(
        h.bake,
        [w.mix, w.baked_name, w.layout, w.precision],
        [w.bake_report, w.download],
        api_name="bake_model",
    )


def layout(studio: Studio) -> BakeWidgets:
    """Declare the panels' components."""
    with gr.Accordion(
        "Extract: a LoRA from a fine-tuned model and its base", open=False, elem_id="extract-panel"
    ):
        with gr.Row():
            tuned = gr.Textbox(
                label="Fine-tuned model (hub id, diffusers folder or .safetensors)", elem_id="extract-tuned"
            )
            base = gr.Textbox(studio.base_model, label="Its base model", elem_id="extract-base")
        with gr.Row():
            rank = gr.Number(16, label="Rank", minimum=1, elem_id="extract-rank")
            keep = gr.Number(
                0,
                label="Or keep this fraction of each layer's change (0: use the rank)",
                elem_id="extract-keep",
            )
            extract_name = gr.Textbox(label="Name in the library", elem_id="extract-name")
        extract_button = gr.Button("Extract", elem_id="extract-button")
        extract_report = gr.Textbox(
            label="Report", lines=4, max_lines=12, interactive=False, elem_id="extract-report"
        )
    with gr.Accordion(
        "Bake: a mix merged into the base model, saved as a full model", open=False, elem_id="bake-panel"
    ):
        mix = gr.Textbox(
            label="Adapters and weights", placeholder="my-star:0.8, stripes:0.5", elem_id="bake-mix"
        )
        with gr.Row():
            baked_name = gr.Textbox("baked", label="Model name", elem_id="bake-name")
            layout_ = gr.Radio(
                list(LAYOUTS),
                value=next(iter(LAYOUTS)),
                label="Save as",
                info="the single file loads in AUTOMATIC1111, Forge and ComfyUI (Flux.1: as diffusion model)",
                elem_id="bake-layout",
            )
            precision = gr.Radio(list(PRECISIONS), value="fp16", label="Precision", elem_id="bake-precision")
        bake_button = gr.Button("Bake", elem_id="bake-button")
        bake_report = gr.Textbox(
            label="Report", lines=3, max_lines=8, interactive=False, elem_id="bake-report"
        )
        download = gr.File(label="Baked model", interactive=False, elem_id="bake-download")
    return BakeWidgets(
        tuned, base, rank, keep, extract_name, extract_button, extract_report,
        mix, baked_name, layout_, precision, bake_button, bake_report, download,
    )  # fmt: skip


class BakeHandlers:
    """Extract into the Studio's library; bake the Studio's base model with a mix of its adapters."""

    def __init__(self, studio: Studio, refresh) -> None:
        self.studio, self.refresh = studio, refresh

    def _model(self, source: str, what: str) -> str:
        """A model a client names: a hub id, or a path under the folders this server lets clients read."""
        source = (source or "").strip()
        if not source:
            raise ConfigError(f"Extract: give {what}")
        return str(self.studio.access.check_folder(source, what)) if looks_like_path(source) else source

    @readable_errors
    def extract(
        self,
        tuned: str,
        base: str,
        rank: float | None,
        keep: float | None,
        name: str,
        progress=gr.Progress(),  # noqa: B008 - gradio finds it by default
    ):
        """Extract a LoRA from the named pair into the library; the relisted library and the report."""
        from sdlora.library.tools.extract import extract_into_library

        if not (name or "").strip():
            raise ConfigError("Extract: give the new adapter a name")
        rule = {"keep": float(keep)} if keep else {"rank": whole(rank, "rank")}
        info, report = extract_into_library(
            self.studio.library,
            name.strip(),
            self._model(base, "the base model"),
            self._model(tuned, "the fine-tuned model"),
            progress=lambda done, total: progress(done / max(total, 1), desc="extracting layers"),
            **rule,
        )
        gr.Info(f"Extracted {info.name}.")
        lines = report.lines()
        return *self.refresh(), "\n".join([lines[-1], *lines[:-1]])

    @readable_errors
    def bake(
        self,
        mix: str,
        name: str,
        layout: str,
        precision: str,
        progress=gr.Progress(),  # noqa: B008 - gradio finds it by default
    ):
        """Bake the mix into the server's base model; the report and, for a single file, the file."""
        from sdlora.library.store import safe_name
        from sdlora.library.tools.bake import bake, parse_mix

        pairs = parse_mix(mix or "")
        weighted = [(self.studio.library.read(n), w) for n, w in pairs]
        folder = Path(tempfile.mkdtemp(prefix="bake-", dir=self.studio.work_dir))
        out = folder / (safe_name(name or "baked") + LAYOUTS.get(layout, ".safetensors"))
        dtype = None if precision == "fp32" else precision
        report = bake(
            self.studio.base_model,
            weighted,
            out,
            dtype,
            names=[n for n, _ in pairs],
            on_progress=lambda done, total, stage: progress(done / total, desc=stage),
        )
        gr.Info(f"Baked {out.name}.")
        return "\n".join(report.lines()), (str(out) if out.is_file() else None)


def whole(value: float | None, field: str) -> int:
    """A whole number from a number field (a client may send NaN or a fraction); refused in one line."""
    if value is None or not math.isfinite(value) or value != int(value):
        raise ConfigError(f"Extract: {field} must be a whole number, not {value!r}")
    return int(value)
