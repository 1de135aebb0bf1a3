"""Requests from many threads drawn together: one pipeline call per group instead of one per request.

A web server's handlers call `Batcher.generate` at the same time. A burst is gathered until
no request has arrived for `window` seconds (at most `max_wait`, since threads of a busy
server start late); then every waiting request is grouped by what one
pipeline call must share (`batch_key`) and by mix, and groups whose mixes are one adapter
each (or none) merge, since peft can run each row with its own adapter. Requests that
arrive while a group is drawing wait for the next round, so a busy server batches by itself.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from sdlora.config import GenerateConfig
from sdlora.generation.generate import GeneratedImage, Generator, batch_key, mix_key, resolve_mix


@dataclass
class _Request:
    config: GenerateConfig
    done: threading.Event = field(default_factory=threading.Event)
    images: list[GeneratedImage] = field(default_factory=list)
    error: BaseException | None = None


def group_requests(configs: list[GenerateConfig], max_adapters: int) -> list[list[int]]:
    """Indices of requests that can share pipeline calls, in the order the first of each arrived."""
    groups: list[tuple[tuple, set, list[int]]] = []  # batch key, the mixes in the group, its requests
    for i, config in enumerate(configs):
        key, mix = batch_key(config), mix_key(resolve_mix(config)[1])
        group = next((g for g in groups if g[0] == key and can_join(g[1], mix, max_adapters)), None)
        if group is None:
            groups.append((key, {mix}, [i]))
        else:
            group[1].add(mix)
            group[2].append(i)
    return [members for *_, members in groups]


def can_join(mixes: set, mix: tuple, max_adapters: int) -> bool:
    """A mix joins a group of the same mix, or of one-adapter rows that agree on each adapter's weight."""
    if mixes == {mix}:
        return True
    together = mixes | {mix}
    if any(len(m) > 1 for m in together):
        return False
    weights: dict[str, float] = {}
    if any(weights.setdefault(name, weight) != weight for m in together for name, weight in m):
        return False
    return len(weights) <= max_adapters


class Batcher:
    """Collects concurrent `generate` calls for one Generator and draws them in shared pipeline calls."""

    def __init__(self, generator: Generator, window: float = 0.05, max_wait: float = 0.5) -> None:
        self.generator = generator
        self.window = window  # a burst is over when no request came for this many seconds
        self.max_wait = max_wait  # the first request of a burst waits at most this long for the rest
        self._pending: list[_Request] = []
        self._last_arrival = 0.0
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def generate(self, config: GenerateConfig) -> list[GeneratedImage]:
        """Images for one request, drawn together with whatever other requests arrive meanwhile."""
        config.validate()
        for adapter in resolve_mix(config)[1]:
            self.generator.library.get(adapter.name)  # an unknown name fails this request, not its group
        request = _Request(config)
        with self._lock:
            self._pending.append(request)
            self._last_arrival = time.monotonic()
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="sdlora-batcher", daemon=True)
                self._worker.start()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.images

    def _work(self) -> None:
        while True:
            self._gather()
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._worker = None
                    return
            for members in group_requests([r.config for r in batch], self.generator.max_resident):
                self._draw([batch[i] for i in members])

    def _gather(self) -> None:
        """Wait until the burst of requests is over: `window` seconds without a new one, or `max_wait`."""
        deadline = time.monotonic() + self.max_wait
        while True:
            now = time.monotonic()
            with self._lock:
                quiet = now - self._last_arrival
            if quiet >= self.window or now >= deadline:
                return
            time.sleep(min(self.window - quiet, deadline - now))

    def _draw(self, requests: list[_Request]) -> None:
        try:
            results = self.generator.generate_batch([r.config for r in requests])
        except Exception as exc:  # noqa: BLE001 - handed to the waiting caller, who raises it
            if len(requests) > 1:
                # One request's failure is its own (a damaged adapter file, say): draw each alone, so
                # the others get their images and only the one that caused it gets the error.
                for request in requests:
                    self._draw([request])
                return
            requests[0].error = exc
            requests[0].done.set()
            return
        for request, images in zip(requests, results, strict=True):
            request.images = images
            request.done.set()
