"""Typed progress events of a training run, the stop flag, and a run in the background.

The trainer only emits events; the CLI prints them and the UI draws them, so neither
display leaks into the loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Started:
    total_steps: int
    start_step: int
    image_count: int
    trainable_parameters: int
    total_parameters: int
    skipped_files: tuple[str, ...]  # "name: reason" for every concept image that was left out
    device: str
    mixed_precision: str
    buckets: tuple[str, ...] = ()  # "768x512: 3" per bucket, largest first
    notices: tuple[str, ...] = ()  # "name: what was done" for files used with a caveat (a Latin-1 caption)


@dataclass(frozen=True)
class Step:
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    seconds_per_step: float
    eta_seconds: float


@dataclass(frozen=True)
class Validated:
    """A validation loss: the adapter scored on held-out images at fixed noise and timesteps."""

    step: int
    validation_loss: float
    best_step: int  # the step of the lowest validation loss so far
    best_loss: float
    rises: int  # evaluations in a row above the lowest (the overfitting signal)


@dataclass(frozen=True)
class Preview:
    step: int
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    images: tuple[Image.Image, ...] = field(repr=False)
    path: str  # the grid saved on disk


@dataclass(frozen=True)
class Saved:
    step: int
    path: str
    kind: str  # "checkpoint", "checkpoint adapter" or "adapter"


@dataclass(frozen=True)
class Finished:
    step: int
    adapter_path: str  # "" when nothing was saved (stopped before the first step)
    stopped_early: bool
    message: str = (
        ""  # one line when the end was not the plain one: nothing saved, or saved under another name
    )


@dataclass(frozen=True)
class Failed:
    step: int
    message: str


Event = Started | Step | Validated | Preview | Saved | Finished | Failed
EventCallback = Callable[[Event], None]


class StopFlag:
    """A cooperative stop request: the loop checks it once per step, saves and returns."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def request(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


class Throughput:
    """Seconds per step and ETA from a moving window, so a slow first step does not skew it."""

    def __init__(self, window: int = 20) -> None:
        self._times: list[float] = []
        self._window = window

    def tick(self) -> None:
        self._times.append(time.perf_counter())
        del self._times[: -self._window - 1]

    def seconds_per_step(self) -> float:
        if len(self._times) < 2:
            return 0.0
        return (self._times[-1] - self._times[0]) / (len(self._times) - 1)


class BackgroundRun:
    """Runs a job in a thread and keeps every event it emitted, so any viewer can re-attach.

    `job` is called as job(on_event=..., stop=...). A page reload simply reads `events`
    again; closing the page does not stop the run.
    """

    def __init__(self, job: Callable[..., Any]) -> None:
        self.events: list[Event] = []
        self.stop = StopFlag()
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(job,), daemon=True)
        self._lock = threading.Lock()

    def start(self) -> BackgroundRun:
        self._thread.start()
        return self

    def _record(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def _run(self, job: Callable[..., Any]) -> None:
        try:
            self.result = job(on_event=self._record, stop=self.stop)
        except BaseException as exc:  # noqa: BLE001 - reported to the viewer, never lost in a thread
            self.error = exc
            if not (self.events and isinstance(self.events[-1], Failed)):  # the job may have said it already
                self._record(Failed(step=-1, message=str(exc) or type(exc).__name__))

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends; True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)
