"""A run in the background keeps its events for any viewer and reports failures exactly once."""

from __future__ import annotations

from sdlora.errors import ConfigError
from sdlora.events import BackgroundRun, Failed, Step


def test_events_are_kept_and_stop_is_honoured():
    def job(on_event, stop):
        step = 0
        while not stop.requested and step < 10_000:
            step += 1
            on_event(Step(step, 10_000, 1.0, 1e-4, 0.0, 0.0))
            if step == 3:
                stop.request()
        return step

    run = BackgroundRun(job).start()
    assert run.wait(10)
    assert run.result == 3 and [e.step for e in run.snapshot()] == [1, 2, 3]


def test_failure_is_reported_once_with_its_message():
    def job(on_event, stop):
        on_event(Failed(0, "no base model given"))
        raise ConfigError("no base model given")

    run = BackgroundRun(job).start()
    run.wait(10)
    assert [e for e in run.snapshot() if isinstance(e, Failed)] == [Failed(0, "no base model given")]

    crashed = BackgroundRun(lambda on_event, stop: 1 / 0).start()
    crashed.wait(10)
    assert isinstance(crashed.error, ZeroDivisionError)
    assert crashed.snapshot()[-1].message == "division by zero"
