"""Training events shown on a terminal: a tqdm bar plus one line per notable event."""

from __future__ import annotations

from tqdm.auto import tqdm

from sdlora.events import Event, Failed, Finished, Preview, Saved, Started, Step


class ConsoleProgress:
    """An event callback for the CLI."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: tqdm | None = None
        self.seconds_per_step = 0.0  # the training loop's own measure, over its last steps

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        if isinstance(event, Started):
            for problem in event.skipped_files:
                tqdm.write(f"skipped {problem}")
            for notice in event.notices:
                tqdm.write(f"note: {notice}")
            tqdm.write(
                f"training {event.trainable_parameters:,} of {event.total_parameters:,} parameters "
                f"on {event.image_count} images, device {event.device}, precision {event.mixed_precision}"
                + (f", resuming at step {event.start_step}" if event.start_step else "")
            )
            if event.buckets:
                tqdm.write("buckets (width x height: images): " + ", ".join(event.buckets))
            self._bar = tqdm(
                total=event.total_steps, initial=event.start_step, unit="step", dynamic_ncols=True
            )
        elif isinstance(event, Step) and self._bar is not None:
            self._bar.update(event.step - self._bar.n)
            self.seconds_per_step = event.seconds_per_step
            self._bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.learning_rate:.2e}")
        elif isinstance(event, Saved):
            tqdm.write(f"saved {event.kind} at step {event.step}: {event.path}")
        elif isinstance(event, Preview):
            tqdm.write(f"preview at step {event.step}: {event.path}")
        elif isinstance(event, Failed):
            self.close()  # the error itself is raised to the caller, who prints it once
        elif isinstance(event, Finished):
            self.close()
            if event.message:
                tqdm.write(event.message)
            if self.seconds_per_step:
                tqdm.write(f"speed: {self.seconds_per_step:.3f} s/step over the last steps")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
