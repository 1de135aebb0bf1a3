"""The Train tab's queue: every job with its position, state and ETA; cancel, reorder and retry by job id.

Three parts, like the tabs: `layout` declares the widgets, `QueueHandlers` holds plain functions
over the Studio, `wire` connects the widgets' events to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from sdlora.jobs.queue import QueueRow
from sdlora.ui.messages import readable_errors
from sdlora.ui.run_view import _duration
from sdlora.ui.studio import Studio

QUEUE_HEADERS = ["id", "position", "name", "state", "ETA", "message"]
REFRESH_SECONDS = 1.0


@dataclass
class QueueView:
    """Components other parts of the page wire to."""

    table: gr.Dataframe
    refresh: Callable[[], pd.DataFrame]
    added: gr.Dependency  # a job went into the queue: the page's progress view follows it from here


@dataclass
class QueueWidgets:
    """Every component of the queue."""

    table: gr.Dataframe
    add_button: gr.Button
    job_id: gr.Textbox
    cancel: gr.Button
    up: gr.Button
    down: gr.Button
    retry: gr.Button
    timer: gr.Timer


def build(studio: Studio, add_inputs: list, settings: dict, add: Callable[..., object]) -> QueueView:
    """Lay out the queue inside the current Blocks; `add(files, captions, config, **settings)` queues a job."""
    handlers = QueueHandlers(studio, add)
    return wire(layout(handlers.queue_list()), handlers, add_inputs, settings)


def queue_table(rows: list[QueueRow]) -> pd.DataFrame:
    """Queue rows -> the table's cells (all text: an ended job has no position and no ETA)."""
    return pd.DataFrame(
        [
            [
                r.id,
                str(r.position) if r.position else "",
                r.name,
                r.state,
                f"about {_duration(r.eta_seconds)}" if r.eta_seconds is not None else "",
                r.message,
            ]
            for r in rows
        ],
        columns=QUEUE_HEADERS,
    )


# -- layout ---------------------------------------------------------------------------------------


def layout(rows: pd.DataFrame) -> QueueWidgets:
    """Declare the queue's components, the table showing `rows` at first."""
    gr.Markdown("### 4. Queue")
    table = gr.Dataframe(
        rows,
        headers=QUEUE_HEADERS,
        interactive=False,
        label="Training jobs, run one at a time in this order",
        wrap=True,
        elem_id="queue-table",
    )
    with gr.Row():
        add_button = gr.Button("Add to queue", elem_id="queue-add")
        job_id = gr.Textbox(label="Job id", info="or click a row", scale=1, elem_id="queue-job-id")
        cancel = gr.Button("Cancel / stop", elem_id="queue-cancel")
        up = gr.Button("Up", elem_id="queue-up")
        down = gr.Button("Down", elem_id="queue-down")
        retry = gr.Button("Retry", elem_id="queue-retry")
    return QueueWidgets(table, add_button, job_id, cancel, up, down, retry, gr.Timer(REFRESH_SECONDS))


# -- handlers -------------------------------------------------------------------------------------


class QueueHandlers:
    """The queue's event handlers: a job id in, one Studio call, the refreshed table out."""

    def __init__(self, studio: Studio, add: Callable[..., object]) -> None:
        self.studio = studio
        self._add = add

    def queue_list(self) -> pd.DataFrame:
        return queue_table(self.studio.queue.rows())

    @readable_errors
    def queue_add(
        self, files: list[str] | None = None, captions=None, config: dict | None = None, **values
    ) -> pd.DataFrame:
        self._add(files, captions, config, **values)
        return self.queue_list()

    @readable_errors
    def queue_cancel(self, job_id: str) -> pd.DataFrame:
        self.studio.cancel_job(job_id)
        return self.queue_list()

    @readable_errors
    def queue_up(self, job_id: str) -> pd.DataFrame:
        self.studio.queue.move(job_id, -1)
        return self.queue_list()

    @readable_errors
    def queue_down(self, job_id: str) -> pd.DataFrame:
        self.studio.queue.move(job_id, 1)
        return self.queue_list()

    @readable_errors
    def queue_retry(self, job_id: str) -> pd.DataFrame:
        self.studio.retry_job(job_id)
        return self.queue_list()

    @staticmethod
    def pick_job(event: gr.SelectData) -> str:
        """A click on a row fills the job id, so the buttons act on that job."""
        return str(event.row_value[QUEUE_HEADERS.index("id")])


# -- wiring ---------------------------------------------------------------------------------------


def wire(w: QueueWidgets, h: QueueHandlers, add_inputs: list, settings: dict) -> QueueView:
    """Connect the queue's events to its handlers; every event has an api_name."""
    # The list is cheap (one small file): the page re-reads it every second, also while idle, so jobs
    # queued by `python -m sdlora queue add` or another page show up without a click.
    w.timer.tick(
        h.queue_list, None, w.table, api_name="queue_list", concurrency_limit=None, show_progress="hidden"
    )
    w.table.select(h.pick_job, None, w.job_id, api_name="pick_job", concurrency_limit=None)
    added = w.add_button.click(h.queue_add, add_inputs, w.table, inputs_kwargs=settings, api_name="queue_add")
    for button, handler, name in (
        (w.cancel, h.queue_cancel, "queue_cancel"),
        (w.up, h.queue_up, "queue_up"),
        (w.down, h.queue_down, "queue_down"),
        (w.retry, h.queue_retry, "queue_retry"),
    ):
        button.click(handler, w.job_id, w.table, api_name=name, concurrency_limit=None)
    return QueueView(table=w.table, refresh=h.queue_list, added=added)
