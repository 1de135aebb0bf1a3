"""The Library tab's "Resize" and "Merge" panels: a new adapter from library adapters, with the tool's report."""

from __future__ import annotations

import math
from dataclasses import dataclass

import gradio as gr

from sdlora.ui.messages import readable_errors
from sdlora.ui.studio import Studio

MERGE_ROWS = 4
RULES = {  # what the user picks -> the resize keyword it sets
    "Rank": "rank",
    "Kept fraction of the norm": "keep",
    "Singular values above a ratio of the largest": "ratio",
}


@dataclass
class ReshapeWidgets:
    """The two panels' components."""

    source: gr.Dropdown
    rule: gr.Radio
    rank: gr.Number
    fraction: gr.Slider
    resize_name: gr.Textbox
    resize_button: gr.Button
    resize_report: gr.Textbox
    inputs: list[gr.Dropdown]
    weights: list[gr.Number]
    merge_rank: gr.Number
    merge_name: gr.Textbox
    merge_button: gr.Button
    merge_report: gr.Textbox


def build(studio: Studio, table: gr.Dataframe, listing: list, refresh, selected: gr.Textbox) -> None:
    """Lay out the two panels under the tab and wire them: a new adapter refreshes `listing` (through
    `refresh`) and becomes the `selected` one; the dropdowns follow the `table` of adapters."""
    w, h = layout(), ReshapeHandlers(studio, refresh)
    dropdowns = [w.source, *w.inputs]
    table.change(
        lambda t: [gr.Dropdown(choices=names(t)) for _ in dropdowns],
        table,
        dropdowns,
        api_name="reshape_choices",
    )
    selected.change(lambda n: gr.Dropdown(value=n or None), selected, w.source, api_name="resize_source")
    w.rule.change(h.rule_fields, w.rule, [w.rank, w.fraction], api_name="resize_rule_fields")
    w.resize_button.click(
        h.resize,
        [w.source, w.rule, w.rank, w.fraction, w.resize_name],
        [*listing, selected, w.resize_report],
        api_name="resize_adapter",
    )
    w.merge_button.click(
        h.merge,
        [*w.inputs, *w.weights, w.merge_rank, w.merge_name],
        [*listing, selected, w.merge_report],
        api_name="merge_adapters",
    )


def names(table) -> list[str]:
    """The adapter names in the tab's table."""
    return [] if table is None or "name" not in table else [str(n) for n in table["name"]]


def layout() -> ReshapeWidgets:
    """Declare the Resize and Merge accordions."""
    with gr.Accordion("Resize: the same adapter at a lower rank, in a smaller file", open=False):
        with gr.Row():
            source = gr.Dropdown([], label="Adapter", elem_id="resize-source")
            rule = gr.Radio(list(RULES), value="Rank", label="Keep", elem_id="resize-rule")
        with gr.Row():
            rank = gr.Number(8, precision=0, minimum=1, label="New rank", elem_id="resize-rank")
            fraction = gr.Slider(
                0.01, 1.0, value=0.95, step=0.01, label="Fraction", visible=False, elem_id="resize-fraction"
            )
            resize_name = gr.Textbox(label="New adapter name", elem_id="resize-name")
        resize_button = gr.Button("Resize", variant="primary", elem_id="resize-button")
        resize_report = gr.Textbox(label="Report", lines=6, max_lines=14, elem_id="resize-report")
    with gr.Accordion("Merge: several adapters with weights, as one new adapter", open=False):
        inputs, weights = [], []
        for i in range(MERGE_ROWS):
            with gr.Row():
                inputs.append(
                    gr.Dropdown([], label=f"Adapter {i + 1}", scale=3, elem_id=f"merge-adapter-{i + 1}")
                )
                weights.append(gr.Number(1.0, label="Weight", scale=1, elem_id=f"merge-weight-{i + 1}"))
        with gr.Row():
            merge_rank = gr.Number(
                0, precision=0, minimum=0, label="Rank (0: exact, ranks add up)", elem_id="merge-rank"
            )
            merge_name = gr.Textbox(label="New adapter name", elem_id="merge-name")
        merge_button = gr.Button("Merge", variant="primary", elem_id="merge-button")
        merge_report = gr.Textbox(label="Report", lines=6, max_lines=14, elem_id="merge-report")
    return ReshapeWidgets(
        source, rule, rank, fraction, resize_name, resize_button, resize_report,
        inputs, weights, merge_rank, merge_name, merge_button, merge_report,
    )  # fmt: skip


class ReshapeHandlers:
    """Widget values -> one library tool call -> the refreshed table, the new adapter and the report."""

    def __init__(self, studio: Studio, refresh) -> None:
        self.studio = studio
        self.refresh = refresh

    @staticmethod
    def rule_fields(rule: str) -> tuple:
        """The rank field for a fixed rank, the fraction slider for the two rules."""
        by_rank = RULES.get(rule) == "rank"
        return gr.Number(visible=by_rank), gr.Slider(visible=not by_rank)

    @readable_errors
    def resize(
        self,
        source: str,
        rule: str,
        rank: float | None,
        fraction: float,
        new_name: str,
        progress=gr.Progress(),  # noqa: B008 - gradio finds it by default
    ):
        """Resize `source` into a new adapter by the chosen rule."""
        from sdlora.library.tools.resize import resize_in_library

        if not source:
            raise gr.Error("Pick the adapter to resize.", print_exception=False)
        setting = {RULES.get(rule, "rank"): _whole(rank) if RULES.get(rule) == "rank" else fraction}
        report = resize_in_library(
            self.studio.library,
            source,
            _name(new_name),
            **setting,
            on_progress=_tracker(progress, "Resizing"),
        )
        gr.Info(f"Saved {report.saved.stem}.")
        return *self.refresh(), report.saved.stem, "\n".join(report.lines())

    @readable_errors
    def merge(
        self,
        a1: str, a2: str, a3: str, a4: str,
        w1: float, w2: float, w3: float, w4: float,
        rank: float | None,
        new_name: str,
        progress=gr.Progress(),  # noqa: B008 - gradio finds it by default
    ):  # fmt: skip
        """Merge the picked adapters at their weights into a new adapter (exact, or to a rank)."""
        from sdlora.library.tools.merge import merge_in_library

        picked, weights = (a1, a2, a3, a4), (w1, w2, w3, w4)  # the MERGE_ROWS rows
        weighted = [
            (n, float(w) if w is not None else float("nan"))
            for n, w in zip(picked, weights, strict=True)
            if n
        ]
        if not weighted:
            raise gr.Error("Pick at least one adapter to merge.", print_exception=False)
        report = merge_in_library(
            self.studio.library,
            weighted,
            _name(new_name),
            rank=_whole(rank) or None,
            on_progress=_tracker(progress, "Merging"),
        )
        gr.Info(f"Saved {report.saved.stem}.")
        return *self.refresh(), report.saved.stem, "\n".join(report.lines())


def _name(text: str) -> str:
    if not (text or "").strip():
        raise gr.Error("Give the new adapter a name.", print_exception=False)
    return text.strip()


def _whole(value) -> int | None:
    """A rank typed in a number field (None when empty)."""
    if value is None:
        return None
    if not math.isfinite(value):
        raise gr.Error(f"The rank must be a whole number, not {value!r}.", print_exception=False)
    return int(value)


def _tracker(progress, words: str):
    return lambda done, total: progress(done / total, desc=f"{words} layer {done}/{total}")
