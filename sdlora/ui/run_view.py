"""A training run's events folded into what a page shows: state, step, loss curve, speed, previews.

Built from the full event list each time, so a reloaded page shows the same as one that
watched from the start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from sdlora.events import Event, Failed, Finished, Preview, Started, Step, Validated

MAX_CURVE_POINTS = 500
SMOOTHING = 0.9  # the training curve's exponential smoothing (TensorBoard's slider at 0.9): the raw loss is mostly noise
TRAINING, VALIDATION, LOWEST = "training (smoothed)", "validation", "lowest validation"


@dataclass
class RunView:
    state: str = "idle"  # idle, starting, running, stopping, finished, stopped, failed
    name: str = ""
    step: int = 0
    total_steps: int = 0
    seconds_per_step: float = 0.0
    eta_seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    previews: list[tuple[Image.Image, str]] = field(default_factory=list)
    message: str = ""
    adapter_path: str = ""
    skipped_files: tuple[str, ...] = ()
    notices: tuple[str, ...] = ()  # files used with a caveat (a caption read as Windows-1252)
    device: str = ""
    validations: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    best_loss: float = 0.0
    rises: int = 0  # evaluations in a row above the lowest

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "stopping")

    def curve(self) -> list[tuple[int, float]]:
        """The loss curve thinned to at most MAX_CURVE_POINTS points, keeping the last one."""
        return _thinned(self.losses)

    def chart(self) -> list[tuple[int, float, str]]:
        """(step, loss, series) rows of one plot: the smoothed training curve, the validation points, and a
        vertical line at the step of the lowest validation loss."""
        rows = [(step, loss, TRAINING) for step, loss in _thinned(_smoothed(self.losses))]
        rows += [(step, loss, VALIDATION) for step, loss in self.validations]
        if self.validations:
            values = [loss for _, loss, _ in rows]
            rows += [(self.best_step, min(values), LOWEST), (self.best_step, max(values), LOWEST)]
        return rows

    def summary(self) -> str:
        """One or two lines of Markdown: where the run is and how fast it goes."""
        if self.state == "idle":
            return "No training run yet on this server."
        head = f"**{self.name}**: {self.state}"
        if self.total_steps:
            head += f", step {self.step}/{self.total_steps}"
        if self.state in ("running", "stopping") and self.seconds_per_step:
            head += f", {self.seconds_per_step:.2f} s/step, about {_duration(self.eta_seconds)} left"
        elif self.seconds_per_step:  # what the run measured: the next estimate for these settings uses it
            head += f", {self.seconds_per_step:.2f} s/step"
        if self.losses:
            head += f", loss {self.losses[-1][1]:.4f}"
        if self.validations:
            head += f", validation {self.validations[-1][1]:.4f} (lowest {self.best_loss:.4f} at step {self.best_step})"
        lines = [head]
        if self.rises:
            lines.append(
                f"The validation loss has stayed above its lowest for {self.rises} evaluation(s): "
                f"the adapter may be overfitting; step {self.best_step} is the one to keep."
            )
        if self.message:
            lines.append(self.message)
        if self.skipped_files:
            lines.append("Skipped: " + "; ".join(self.skipped_files))
        if self.notices:
            lines.append("Note: " + "; ".join(self.notices))
        return "\n\n".join(lines)


def view_run(events: list[Event], name: str, running: bool, stop_requested: bool) -> RunView:
    """Fold the events of one run (in order) into a RunView."""
    view = RunView(state="starting" if running else "stopped", name=name)
    for event in events:
        if isinstance(event, Started):
            view.state, view.total_steps, view.step = "running", event.total_steps, event.start_step
            view.skipped_files, view.notices, view.device = event.skipped_files, event.notices, event.device
        elif isinstance(event, Step):
            view.step, view.total_steps = event.step, event.total_steps
            view.seconds_per_step, view.eta_seconds = event.seconds_per_step, event.eta_seconds
            view.losses.append((event.step, event.loss))
        elif isinstance(event, Validated):
            view.validations.append((event.step, event.validation_loss))
            view.best_step, view.best_loss, view.rises = event.best_step, event.best_loss, event.rises
        elif isinstance(event, Preview):
            labels = [f"{p} · seed {s} · step {event.step}" for p in event.prompts for s in event.seeds]
            view.previews = list(zip(event.images, labels, strict=False))
        elif isinstance(event, Finished):
            view.state = "stopped" if event.stopped_early else "finished"
            view.adapter_path = event.adapter_path
            saved = f"Saved {event.adapter_path} at step {event.step}; it is in the library now."
            # The engine's own line says what was unusual: nothing saved, or saved under another name.
            view.message = (
                event.message if not event.adapter_path else " ".join(filter(None, [saved, event.message]))
            )
        elif isinstance(event, Failed):
            view.state, view.message = "failed", event.message
    if running and stop_requested and view.state == "running":
        view.state = "stopping"
        view.message = "Stopping after this step; the adapter will be saved."
    return view


def _smoothed(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """An exponential moving average, debiased so the first steps are not pulled towards zero."""
    out, average = [], 0.0
    for i, (step, loss) in enumerate(points):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        out.append((step, average / (1 - SMOOTHING ** (i + 1))))
    return out


def _thinned(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """At most MAX_CURVE_POINTS points, keeping the last one."""
    stride = max(1, len(points) // MAX_CURVE_POINTS)
    kept = points[::stride]
    if points and kept[-1] != points[-1]:
        kept.append(points[-1])
    return kept


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
