"""The training queue through the web app's API: jobs queued by a script run in order, one at a time; a queued
job can be cancelled, moved and retried; the running one stopped (and saved)."""

from __future__ import annotations

import time

import pytest
from app_server import serving
from tiny_models import IMAGE_SIZE

pytest.importorskip("sdlora.training.presets", reason="the app needs sdlora.training.presets")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from sdlora.library.formats import read_metadata  # noqa: E402
from sdlora.ui.studio import Studio  # noqa: E402


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """A server of its own (its queue holds only these tests' jobs), shared by them: each ends idle."""
    root = tmp_path_factory.mktemp("queue-app")
    studio = Studio(str(tiny_model), root / "adapters", root / "concepts", work_dir=root / "work")
    with serving(studio) as server:
        yield studio, Client(server.url, verbose=False)
        studio.stop_training()


@pytest.fixture()
def uploaded(served, concept_dir):
    _, client = served
    files = [handle_file(str(p)) for p in sorted(concept_dir.iterdir())]
    _, captions = client.predict(files, api_name="/upload_images")
    return files, captions


def queue_add(client, uploaded, name: str, steps: int = 4) -> list[list]:
    files, captions = uploaded
    table = client.predict(
        files=files,
        captions=captions,
        name=name,
        trigger_word="sks",
        caption_template="{trigger}, a circle",
        rank=4,
        alpha=4,
        steps=steps,
        learning_rate=1e-3,
        resolution=IMAGE_SIZE,
        preview_every=0,
        seed=7,
        flip=False,
        regularization_images="",
        api_name="/queue_add",
    )
    return table["data"]


def listed(client) -> dict[str, list]:
    """The queue table by job name: [id, position, name, state, ETA, message]."""
    return {row[2]: row for row in client.predict(api_name="/queue_list")["data"]}


def wait_for_idle(client, timeout: float = 240) -> dict[str, list]:
    deadline = time.monotonic() + timeout
    rows = listed(client)
    while any(row[3] in ("queued", "running") for row in rows.values()):
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)
        rows = listed(client)
    return rows


def test_three_jobs_queued_through_the_api_run_in_order_and_each_writes_its_adapter(served, uploaded):
    studio, client = served
    for name in ("first", "second", "third"):
        queue_add(client, uploaded, name)
    rows = wait_for_idle(client)
    assert [rows[n][3] for n in ("first", "second", "third")] == ["done", "done", "done"]
    jobs = {job.name: job for job in studio.queue.jobs()}
    assert (
        jobs["first"].finished <= jobs["second"].started and jobs["second"].finished <= jobs["third"].started
    )
    for name in ("first", "second", "third"):
        assert read_metadata(studio.adapters_dir / f"{name}.safetensors")["ss_steps"] == "4"
        assert rows[name][5].endswith(f"{name}.safetensors at step 4")


def test_cancelled_job_never_runs_moved_job_runs_first_and_retry_runs_it_later(served, uploaded):
    studio, client = served
    queue_add(client, uploaded, "long", steps=100_000)
    for name in ("cancel-me", "later", "sooner"):
        queue_add(client, uploaded, name)
    ids = {name: row[0] for name, row in listed(client).items()}
    client.predict(job_id=ids["sooner"], api_name="/queue_up")
    client.predict(job_id=ids["cancel-me"], api_name="/queue_cancel")
    rows = listed(client)
    assert [(rows[n][1], rows[n][3]) for n in ("long", "sooner", "later", "cancel-me")] == [
        ("1", "running"),
        ("2", "queued"),
        ("3", "queued"),
        ("", "cancelled"),
    ]
    with pytest.raises(AppError, match="only queued jobs can be moved"):
        client.predict(job_id=ids["long"], api_name="/queue_down")
    client.predict(job_id=ids["long"], api_name="/queue_cancel")  # the running job stops and saves
    rows = wait_for_idle(client)
    assert [rows[n][3] for n in ("long", "sooner", "later", "cancel-me")] == [
        "stopped",
        "done",
        "done",
        "cancelled",
    ]
    jobs = {job.name: job for job in studio.queue.jobs()}
    assert jobs["sooner"].finished <= jobs["later"].started
    assert (studio.adapters_dir / "long.safetensors").is_file()
    assert not (studio.adapters_dir / "cancel-me.safetensors").exists() and jobs["cancel-me"].started == 0

    client.predict(job_id=ids["cancel-me"], api_name="/queue_retry")
    assert wait_for_idle(client)["cancel-me"][3] == "done"
    assert (studio.adapters_dir / "cancel-me.safetensors").is_file()
