"""A run's events folded into what the Train tab shows, the same on every (re)load."""

from __future__ import annotations

from PIL import Image

from sdlora.events import Failed, Finished, Preview, Started, Step
from sdlora.ui.run_view import MAX_CURVE_POINTS, RunView, view_run


def started(total=10):
    return Started(
        total_steps=total,
        start_step=0,
        image_count=3,
        trainable_parameters=10,
        total_parameters=100,
        skipped_files=("bad.png: not a readable image",),
        device="cpu",
        mixed_precision="no",
    )


def step(n, total=10):
    return Step(
        step=n,
        total_steps=total,
        loss=1.0 / n,
        learning_rate=1e-4,
        seconds_per_step=0.5,
        eta_seconds=0.5 * (total - n),
    )


def test_running_view_shows_step_speed_eta_and_skipped_files():
    view = view_run([started(), step(1), step(2)], "mine", running=True, stop_requested=False)
    assert view.state == "running" and view.active
    assert "step 2/10" in view.summary() and "0.50 s/step" in view.summary() and "4 s left" in view.summary()
    assert "bad.png" in view.summary()
    assert view.curve() == [(1, 1.0), (2, 0.5)]


def test_previews_keep_the_latest_with_prompt_seed_and_step():
    image = Image.new("RGB", (8, 8))
    events = [
        started(),
        Preview(2, ("sks",), (1, 2), (image, image), "p2.png"),
        Preview(4, ("sks",), (1, 2), (image, image), "p4.png"),
    ]
    view = view_run(events, "mine", running=True, stop_requested=False)
    assert [label for _, label in view.previews] == ["sks · seed 1 · step 4", "sks · seed 2 · step 4"]


def test_stop_request_then_early_finish():
    events = [started(), step(1)]
    assert view_run(events, "m", running=True, stop_requested=True).state == "stopping"
    done = view_run([*events, Finished(1, "lib/m.safetensors", stopped_early=True)], "m", False, True)
    assert done.state == "stopped" and not done.active and "lib/m.safetensors" in done.summary()


def test_failure_message_is_shown():
    view = view_run([started(), Failed(3, "loss became nan")], "m", running=False, stop_requested=False)
    assert view.state == "failed" and "loss became nan" in view.summary()


def test_long_curves_are_thinned_but_keep_the_last_point():
    view = RunView(losses=[(i, float(i)) for i in range(1, 5001)])
    curve = view.curve()
    assert len(curve) <= MAX_CURVE_POINTS + 1 and curve[-1] == (5000, 5000.0) and curve[0] == (1, 1.0)


def test_idle_server_says_so():
    assert "No training run" in RunView().summary()


def test_a_stop_before_the_first_step_says_nothing_was_saved():
    message = "stopped before the first step; no adapter was saved"
    view = view_run([started(), Finished(0, "", stopped_early=True, message=message)], "m", False, True)
    assert view.state == "stopped" and message in view.summary() and "Saved" not in view.summary()


def test_a_run_saved_under_another_name_says_so_and_notices_are_shown():
    from dataclasses import replace

    notice = "notes.png: caption not UTF-8; read as Windows-1252 (Latin-1): 'café'"
    moved = "m was imported meanwhile; this run saved as m-2"
    events = [
        replace(started(), notices=(notice,)),
        step(1),
        Finished(1, "lib/m-2.safetensors", False, moved),
    ]
    summary = view_run(events, "m", running=False, stop_requested=False).summary()
    assert "lib/m-2.safetensors" in summary and moved in summary and "Note: " + notice in summary


def test_a_finished_run_keeps_the_speed_it_measured():
    """The next estimate uses this figure: the page shows it after the run too, without an ETA."""
    done = view_run(
        [started(), step(1), step(2), Finished(2, "m.safetensors", stopped_early=False)], "m", False, False
    )
    assert done.state == "finished" and "0.50 s/step" in done.summary() and "left" not in done.summary()
