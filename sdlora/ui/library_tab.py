"""The Library tab: the adapters on disk, with preview, rename, delete, import and export."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from sdlora.formats import FORMATS, TOOLS
from sdlora.ui.messages import readable_errors
from sdlora.ui.studio import Studio

COLUMNS = ["name", "base model", "rank", "steps", "trigger word", "size", "date"]


@dataclass
class LibraryTab:
    table: gr.Dataframe
    problems: gr.Markdown
    refresh: object  # handler: () -> (table, problems)


def adapter_rows(adapters) -> pd.DataFrame:
    """AdapterInfo list -> the table the tab shows."""
    rows = [[a.name, Path(a.base_model).name or a.base_model, a.rank or "", a.steps or "",
             ", ".join(a.trigger_words), _size(a.size_bytes), time.strftime("%Y-%m-%d %H:%M", time.localtime(a.modified))]
            for a in adapters]
    return pd.DataFrame(rows, columns=COLUMNS)


def details(info) -> str:
    lines = [f"**{info.title or info.name}**", f"file: `{info.path.name}` ({info.kind}), family {info.family or 'unknown'}, "
             f"rank {info.rank}, alpha {info.alpha if info.alpha is not None else 'unknown'}"]
    lines += [f"{label}: {value}" for label, value in (("author", info.author), ("license", info.license),
                                                       ("tags", ", ".join(info.tags))) if value]
    if info.description:
        lines.append(info.description)
    return "\n\n".join(lines)


def build(studio: Studio) -> LibraryTab:
    """Lay out the Library tab and wire its events."""
    with gr.Row():
        with gr.Column(scale=3):
            table = gr.Dataframe(pd.DataFrame(columns=COLUMNS), label="Adapters (click a row)", interactive=False,
                                 max_height=420, wrap=True, elem_id="adapters-table")
            problems = gr.Markdown()
            refresh_button = gr.Button("Refresh", size="sm")
            with gr.Accordion("Import a .safetensors LoRA (kohya, LyCORIS LoHa/LoKr, ComfyUI, diffusers or PEFT)",
                              open=True):
                upload = gr.File(file_types=[".safetensors"], label="LoRA file", height=150, elem_id="import-file")
                import_name = gr.Textbox(label="Name in the library (empty: from the file name)")
                import_button = gr.Button("Import", elem_id="import-button")
        with gr.Column(scale=2):
            name = gr.Textbox(label="Selected adapter", interactive=True, elem_id="selected-adapter")
            preview = gr.Image(label="Preview", type="filepath", height=240, interactive=False,
                               elem_id="adapter-preview")
            about = gr.Markdown()
            with gr.Row(equal_height=True):
                new_name = gr.Textbox(label="New name", scale=3)
                rename_button = gr.Button("Rename", scale=1)
            with gr.Row(equal_height=True):
                fmt = gr.Radio(list(FORMATS), value=FORMATS[0], label="Download format", scale=3,
                               elem_id="download-format")
                export_button = gr.Button("Prepare download", scale=1, elem_id="export-button")
            gr.Markdown(" · ".join(f"**{fmt}**: {TOOLS[fmt]}" for fmt in FORMATS), elem_id="format-note")
            download = gr.File(label="Download", interactive=False, height=80, elem_id="download")
            delete_button = gr.Button("Delete adapter", variant="stop")
            with gr.Row(visible=False) as confirm_row:
                confirm_button = gr.Button("Yes, delete it", variant="stop")
                keep_button = gr.Button("Keep it")

    @readable_errors
    def refresh():
        listing = studio.library.list()
        notes = "\n".join(f"- skipped: {p}" for p in listing.problems)
        return adapter_rows(listing.adapters), notes

    @readable_errors
    def select(adapter_name):
        if not adapter_name:
            return None, ""
        info = studio.library.get(adapter_name)
        return (str(info.preview) if info.preview else None), details(info)

    def pick_row(table_value, event: gr.SelectData):
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        return str(table_value.iloc[row]["name"]) if len(table_value) > row else ""

    @readable_errors
    def rename(adapter_name, new_name):
        info = studio.library.rename(adapter_name, new_name)
        studio.forget_adapter(adapter_name)
        gr.Info(f"Renamed {adapter_name} to {info.name}.")
        return *refresh(), info.name, ""

    @readable_errors
    def delete(adapter_name):
        studio.library.delete(adapter_name)
        studio.forget_adapter(adapter_name)
        gr.Info(f"Deleted {adapter_name}.")
        return *refresh(), "", gr.Row(visible=False)

    @readable_errors
    def import_adapter(file, name):
        if not file:
            raise gr.Error("Choose a .safetensors file to import first.")
        info = studio.library.import_file(file, name.strip() or Path(file).stem)
        gr.Info(f"Imported {info.name}.")
        return *refresh(), info.name, None

    @readable_errors
    def export(adapter_name, format_name):
        folder = tempfile.mkdtemp(prefix=f"export-{format_name}-", dir=studio.work_dir)
        return str(studio.library.export(adapter_name, format_name, folder))

    refresh_button.click(refresh, None, [table, problems], api_name="list_adapters")
    table.select(pick_row, table, name, api_name="pick_adapter")
    name.change(select, name, [preview, about], api_name="adapter_details")
    rename_button.click(rename, [name, new_name], [table, problems, name, new_name], api_name="rename_adapter")
    delete_button.click(lambda: gr.Row(visible=True), None, confirm_row, api_name="ask_delete")
    keep_button.click(lambda: gr.Row(visible=False), None, confirm_row, api_name="keep_adapter")
    confirm_button.click(delete, name, [table, problems, name, confirm_row], api_name="delete_adapter")
    import_button.click(import_adapter, [upload, import_name], [table, problems, name, upload],
                        api_name="import_adapter")
    export_button.click(export, [name, fmt], download, api_name="export_adapter")
    return LibraryTab(table=table, problems=problems, refresh=refresh)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"
