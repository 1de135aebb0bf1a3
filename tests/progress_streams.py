"""100 open progress streams, then Stop and a generation: run by test_app_api in a fresh process.

In one process with the rest of the suite, servers and threads that earlier tests leave behind
share the GIL with this server and these clients and starve the streams; a server has a process
of its own in use, so this check gets one too.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path

import httpx
from app_server import serving
from gradio_client import Client, handle_file

from sdlora.ui.studio import Studio

REPO = Path(__file__).resolve().parents[1]
STREAMS = 100


class ProgressStreams:
    """Many pages' progress streams over raw SSE, as browsers hold them, read on one asyncio loop."""

    def __init__(self, url: str, fn_index: int, count: int) -> None:
        self.url, self.fn_index, self.count = url, fn_index, count
        self.started, self.completed, self.last = 0, 0, {}
        self.all_started, self.all_completed = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        # No keep-alive: a pooled connection idle past uvicorn's keep-alive timeout (5 s, easily reached while
        # this process's training and 100 clients share one GIL) is closed by the server as the next request
        # goes out on it, and httpx, unlike a browser, does not retry. Each request gets its own connection.
        limits = httpx.Limits(max_connections=self.count * 2, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=None) as http:
            await asyncio.gather(*(self._one(http) for _ in range(self.count)))

    async def _one(self, http: httpx.AsyncClient) -> None:
        session = uuid.uuid4().hex
        await http.post(
            "gradio_api/queue/join",
            json={
                "data": [],
                "event_data": None,
                "fn_index": self.fn_index,
                "trigger_id": None,
                "session_hash": session,
            },
        )
        seen_output = False
        async with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("msg") in ("process_generating", "process_completed") and not seen_output:
                    seen_output = True
                    self.started += 1
                    if self.started == self.count:
                        self.all_started.set()
                if message.get("msg") in ("process_generating", "process_completed") and message.get(
                    "output"
                ):
                    data = message["output"].get("data") or []
                    if data and isinstance(data[0], str):
                        self.last[session] = data[0]
                if message.get("msg") == "process_completed":
                    self.completed += 1
                    if self.completed == self.count:
                        self.all_completed.set()
                    return


def timed_generation(client) -> float:
    start = time.perf_counter()
    client.submit(prompt="sks", seed=1, steps=2, api_name="/generate").result(timeout=300)
    return time.perf_counter() - start


def test_a_hundred_open_progress_streams_leave_stop_and_generation_working(tiny_model, tmp_path):
    studio = Studio(
        str(tiny_model), tmp_path / "adapters", REPO / "assets" / "concepts", work_dir=tmp_path / "work"
    )
    with serving(studio) as served:
        check_streams(Client(served.url, verbose=False), served)


def check_streams(client: Client, served) -> None:
    images = sorted(str(p) for p in (REPO / "assets" / "concepts" / "star").glob("*.png"))[:2]
    client.predict(
        files=[handle_file(p) for p in images],
        name="long-watched",
        steps=100_000,
        rank=2,
        alpha=2,
        resolution=32,
        preview_every=0,
        api_name="/train",
    )
    run = served.studio.run
    timed_generation(client)  # the first generation also loads what the pipeline caches
    unloaded = max(timed_generation(client), timed_generation(client))

    config = client.config
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "progress")
    streams = ProgressStreams(served.url, fn_index, STREAMS)
    streams.thread.start()
    assert streams.all_started.wait(120), (
        f"only {streams.started} of {STREAMS} progress streams got an answer"
    )
    loaded = timed_generation(client)
    # A stall detector: a blocked server takes minutes. On a loaded 2-core machine 100 streams cost a
    # generation several times its idle time (8.7 s against 1.5 s, seen), so the bound is loose.
    assert loaded < 10 * unloaded + 5, (loaded, unloaded)

    client.predict(api_name="/stop")
    steps_at_stop = max((e.step for e in run.snapshot() if type(e).__name__ == "Step"), default=0)
    assert run.wait(60), "Stop did not end the run"
    finished = run.snapshot()[-1]
    assert type(finished).__name__ == "Finished" and finished.stopped_early
    assert finished.step <= steps_at_stop + 1, (finished.step, steps_at_stop)
    assert streams.all_completed.wait(60), f"only {streams.completed} of {STREAMS} streams ended with the run"
    assert all("**long-watched**: stopped" in text for text in streams.last.values()), set(
        streams.last.values()
    )
