"""Progress shown on a terminal: training's events (a tqdm bar plus one line per notable event) and the
adapter tools' (done, total) reports, both on stderr so that stdout keeps only the results scripts read."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from sdlora.events import Event, Failed, Finished, Preview, Saved, Started, Step, Validated


class ConsoleProgress:
    """An event callback for the CLI."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: tqdm | None = None
        self.seconds_per_step = 0.0  # the training loop's own measure, over its last steps
        self._validation: Validated | None = None  # the latest, shown beside the loss

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
            self._bar.set_postfix(self._postfix(event.loss, event.learning_rate))
        elif isinstance(event, Validated):
            self._validation = event
            if event.rises and self._bar is not None:
                tqdm.write(
                    f"validation loss {event.validation_loss:.4f} at step {event.step}: above the lowest "
                    f"({event.best_loss:.4f}, step {event.best_step}) for {event.rises} evaluation(s)"
                )
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

    def _postfix(self, loss: float, learning_rate: float) -> dict[str, str]:
        """The progress line's figures: loss, the latest validation loss and its best step, learning rate."""
        figures = {"loss": f"{loss:.4f}"}
        if self._validation is not None:
            figures["val"] = f"{self._validation.validation_loss:.4f}"
            figures["best"] = f"step {self._validation.best_step}"
        figures["lr"] = f"{learning_rate:.2e}"
        return figures

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ToolProgress:
    """An adapter tool's progress for the CLI: a bar over its layers, or a line per stage (bake)."""

    def __init__(self, words: str, enabled: bool = True) -> None:
        self.words, self.enabled = words, enabled
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int, stage: str | None = None) -> None:
        if not self.enabled:
            return
        if stage is not None:  # few, long stages (bake): a line each, which a log keeps
            print(f"{self.words} [{done}/{total}] {stage}", file=sys.stderr, flush=True)
            return
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.words, unit="layer", file=sys.stderr, dynamic_ncols=True)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
