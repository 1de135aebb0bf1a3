"""The Library tab: the adapters on disk, with preview, rename, delete, import and export."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from sdlora.library.formats import FORMATS, TOOLS
from sdlora.library.formats.files import file_size
from sdlora.ui import library_bake, library_blocks, library_reshape
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
    rows = [
        [
            a.name,
            Path(a.base_model).name or a.base_model,
            a.rank or "",
            a.steps or "",
            ", ".join(a.trigger_words),
            file_size(a.size_bytes),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(a.modified)),
        ]
        for a in adapters
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def details(info) -> str:
    lines = [
        f"**{info.title or info.name}**",
        f"file: `{info.path.name}` ({info.kind}), family {info.family or 'unknown'}, "
        f"rank {info.rank}, alpha {info.alpha if info.alpha is not None else 'unknown'}",
    ]
    lines += [
        f"{label}: {value}"
        for label, value in (
            ("author", info.author),
            ("license", info.license),
            ("tags", ", ".join(info.tags)),
        )
        if value
    ]
    if info.description:
        lines.append(info.description)
    return "\n\n".join(lines)


@dataclass
class LibraryWidgets:
    """Every component of the tab."""

    table: gr.Dataframe
    problems: gr.Markdown
    refresh_button: gr.Button
    upload: gr.File
    import_name: gr.Textbox
    import_button: gr.Button
    name: gr.Textbox
    preview: gr.Image
    about: gr.Markdown
    new_name: gr.Textbox
    rename_button: gr.Button
    fmt: gr.Radio
    download: gr.DownloadButton  # holds the file in the chosen format, written when the adapter is picked
    delete_button: gr.Button
    confirm_row: gr.Row
    confirm_button: gr.Button
    keep_button: gr.Button


def build(studio: Studio) -> LibraryTab:
    """Lay out the Library tab and wire its events."""
    widgets, handlers = layout(), LibraryHandlers(studio)
    wire(widgets, handlers)
    listing = [widgets.table, widgets.problems]  # the tools' new adapters appear in these
    library_reshape.build(studio, widgets.table, listing, handlers.refresh, widgets.name)
    library_blocks.build(studio, widgets.name, listing, handlers.refresh)
    library_bake.build(studio, listing, handlers.refresh)
    return LibraryTab(table=widgets.table, problems=widgets.problems, refresh=handlers.refresh)


def layout() -> LibraryWidgets:
    """Declare the tab's components."""
    with gr.Row():
        with gr.Column(scale=3):
            table = gr.Dataframe(
                pd.DataFrame(columns=COLUMNS),
                label="Adapters (click a row)",
                interactive=False,
                max_height=420,
                wrap=True,
                elem_id="adapters-table",
            )
            problems = gr.Markdown()
            refresh_button = gr.Button("Refresh", size="sm")
            with gr.Accordion(
                "Import a .safetensors LoRA (kohya, LyCORIS LoHa/LoKr, ComfyUI, diffusers or PEFT)", open=True
            ):
                upload = gr.File(
                    file_types=[".safetensors"], label="LoRA file", height=150, elem_id="import-file"
                )
                import_name = gr.Textbox(label="Name in the library (empty: from the file name)")
                import_button = gr.Button("Import", elem_id="import-button")
        with gr.Column(scale=2):
            name = gr.Textbox(label="Selected adapter", interactive=True, elem_id="selected-adapter")
            preview = gr.Image(
                label="Preview", type="filepath", height=240, interactive=False, elem_id="adapter-preview"
            )
            about = gr.Markdown()
            with gr.Row(equal_height=True):
                new_name = gr.Textbox(label="New name", scale=3)
                rename_button = gr.Button("Rename", scale=1, interactive=False, elem_id="rename-button")
            fmt = gr.Radio(
                list(FORMATS), value=FORMATS[0], label="Download format", elem_id="download-format"
            )
            gr.Markdown(" · ".join(f"**{fmt}**: {TOOLS[fmt]}" for fmt in FORMATS), elem_id="format-note")
            download = gr.DownloadButton(**download_button(None), elem_id="download")
            # Red and clickable only when there is something to delete.
            delete_button = gr.Button(
                "Delete adapter", variant="stop", interactive=False, elem_id="delete-button"
            )
            with gr.Row(visible=False) as confirm_row:
                confirm_button = gr.Button("Yes, delete it", variant="stop")
                keep_button = gr.Button("Keep it")
    return LibraryWidgets(
        table=table,
        problems=problems,
        refresh_button=refresh_button,
        upload=upload,
        import_name=import_name,
        import_button=import_button,
        name=name,
        preview=preview,
        about=about,
        new_name=new_name,
        rename_button=rename_button,
        fmt=fmt,
        download=download,
        delete_button=delete_button,
        confirm_row=confirm_row,
        confirm_button=confirm_button,
        keep_button=keep_button,
    )


class LibraryHandlers:
    """The tab's event handlers over the Studio's adapter library."""

    def __init__(self, studio: Studio) -> None:
        self.studio = studio

    @readable_errors
    def refresh(self):
        """The library's adapters as a table, and the entries it skipped."""
        listing = self.studio.library.list()
        notes = "\n".join(f"- skipped: {p}" for p in listing.problems)
        return adapter_rows(listing.adapters), notes

    @readable_errors
    def select(self, adapter_name: str):
        """An adapter's preview image and facts."""
        if not adapter_name:
            return None, ""
        info = self.studio.library.get(adapter_name)
        return (str(info.preview) if info.preview else None), details(info)

    @staticmethod
    def pick_row(table_value, event: gr.SelectData) -> str:
        """The adapter name of the clicked row."""
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        return str(table_value.iloc[row]["name"]) if len(table_value) > row else ""

    @readable_errors
    def rename(self, adapter_name: str, new_name: str):
        """Rename an adapter (files and the name inside); returns the table and the new name."""
        info = self.studio.library.rename(adapter_name, new_name)
        self.studio.forget_adapter(adapter_name)
        gr.Info(f"Renamed {adapter_name} to {info.name}.")
        return *self.refresh(), info.name, ""

    @readable_errors
    def delete(self, adapter_name: str):
        """Delete an adapter and its side files."""
        self.studio.library.delete(adapter_name)
        self.studio.forget_adapter(adapter_name)
        gr.Info(f"Deleted {adapter_name}.")
        return *self.refresh(), "", gr.Row(visible=False)

    @readable_errors
    def import_adapter(self, file: str | None, name: str):
        """Check a LoRA file and bring it into the library under `name` (empty: the file's name)."""
        if not file:
            raise gr.Error("Choose a .safetensors file to import first.")
        info = self.studio.library.import_file(file, name.strip() or Path(file).stem)
        gr.Info(f"Imported {info.name}.")
        return *self.refresh(), info.name, None

    @readable_errors
    def export(self, adapter_name: str, format_name: str) -> str:
        """Write an adapter in a format (kohya or diffusers) for download."""
        if not (adapter_name or "").strip():
            raise gr.Error("Pick an adapter in the table first.", print_exception=False)
        folder = tempfile.mkdtemp(prefix=f"export-{format_name}-", dir=self.studio.work_dir)
        return str(self.studio.library.export(adapter_name, format_name, folder))

    def prepare_download(self, adapter_name: str, format_name: str):
        """The download button holding the picked adapter in the chosen format: one click gives the file."""
        path = self.export(adapter_name, format_name) if (adapter_name or "").strip() else None
        return gr.DownloadButton(**download_button(path))

    @staticmethod
    def selection_controls(adapter_name: str) -> tuple:
        """Rename and Delete act on the picked adapter: clickable only while one is picked."""
        picked = bool((adapter_name or "").strip())
        return gr.Button(interactive=picked), gr.Button(interactive=picked)


def download_button(path: str | None) -> dict:
    """The download button's label, file and state: named after the file it gives, idle without one."""
    if not path:
        return {"label": "Download (pick an adapter first)", "value": None, "interactive": False}
    return {"label": f"Download {Path(path).name}", "value": path, "interactive": True}


def wire(w: LibraryWidgets, h: LibraryHandlers) -> None:
    """Connect the tab's events to its handlers; every event has an api_name."""
    listing = [w.table, w.problems]
    w.refresh_button.click(h.refresh, None, listing, api_name="list_adapters")
    w.table.select(h.pick_row, w.table, w.name, api_name="pick_adapter")
    w.name.change(h.select, w.name, [w.preview, w.about], api_name="adapter_details")
    w.name.change(
        h.selection_controls, w.name, [w.rename_button, w.delete_button], api_name="selection_controls"
    )
    gr.on(
        [w.name.change, w.fmt.change],
        h.prepare_download,
        [w.name, w.fmt],
        w.download,
        api_name="prepare_download",
        trigger_mode="always_last",
    )
    w.rename_button.click(
        h.rename, [w.name, w.new_name], [*listing, w.name, w.new_name], api_name="rename_adapter"
    )
    w.delete_button.click(lambda: gr.Row(visible=True), None, w.confirm_row, api_name="ask_delete")
    w.keep_button.click(lambda: gr.Row(visible=False), None, w.confirm_row, api_name="keep_adapter")
    w.confirm_button.click(h.delete, w.name, [*listing, w.name, w.confirm_row], api_name="delete_adapter")
    w.import_button.click(
        h.import_adapter, [w.upload, w.import_name], [*listing, w.name, w.upload], api_name="import_adapter"
    )
    gr.api(h.export, api_name="export_adapter")  # for scripts: the file path in a format, by adapter name
