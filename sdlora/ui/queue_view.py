"""The Train tab's queue: every job with its position, state and ETA; cancel, reorder and retry by job id."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from sdlora.jobs.queue import QueueRow
from sdlora.ui import serving
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


def build(studio: Studio, add_inputs: list, settings: dict, add: Callable[..., object]) -> QueueView:
    """Lay out the queue inside the current Blocks; `add(files, captions, config, **settings)` queues a job."""
    gr.Markdown("### 4. Queue")
    table = gr.Dataframe(
        queue_table(studio.queue_rows()),
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
    timer = gr.Timer(REFRESH_SECONDS)

    def queue_list() -> pd.DataFrame:
        return queue_table(studio.queue_rows())

    @readable_errors
    def queue_add(
        files: list[str] | None = None,
        captions=None,
        config: dict | None = None,
        request: gr.Request = None,
        **values,
    ) -> pd.DataFrame:
        add(files, captions, config, client=serving.client_of(request), **values)
        return queue_list()

    @readable_errors
    def queue_cancel(job_id: str) -> pd.DataFrame:
        studio.cancel_job(job_id)
        return queue_list()

    @readable_errors
    def queue_up(job_id: str) -> pd.DataFrame:
        studio.move_job(job_id, -1)
        return queue_list()

    @readable_errors
    def queue_down(job_id: str) -> pd.DataFrame:
        studio.move_job(job_id, 1)
        return queue_list()

    @readable_errors
    def queue_retry(job_id: str) -> pd.DataFrame:
        studio.retry_job(job_id)
        return queue_list()

    def pick_job(event: gr.SelectData) -> str:
        """A click on a row fills the job id, so the buttons act on that job."""
        return str(event.row_value[QUEUE_HEADERS.index("id")])

    # The list is cheap (one small file): the page re-reads it every second, also while idle, so jobs
    # queued by `python -m sdlora queue add` or another page show up without a click.
    timer.tick(queue_list, None, table, api_name="queue_list", concurrency_limit=None, show_progress="hidden")
    table.select(pick_job, None, job_id, api_name="pick_job", concurrency_limit=None)
    added = add_button.click(queue_add, add_inputs, table, inputs_kwargs=settings, api_name="queue_add")
    cancel.click(queue_cancel, job_id, table, api_name="queue_cancel", concurrency_limit=None)
    up.click(queue_up, job_id, table, api_name="queue_up", concurrency_limit=None)
    down.click(queue_down, job_id, table, api_name="queue_down", concurrency_limit=None)
    retry.click(queue_retry, job_id, table, api_name="queue_retry", concurrency_limit=None)
    return QueueView(table=table, refresh=queue_list, added=added)
