"""A run's checkpoint adapters side by side: columns are checkpoints, rows weights x prompts x seeds.

Each row is one generation call where batching allows: every cell of a row is the same prompt, seed
and weight with another checkpoint, and peft runs each row of the batch with its own adapter. Under
each column its validation loss; the lowest is marked, the step a person most likely wants to keep.
On the demo model, for an adapter that teaches one of its lessons, the demo evaluator's figures go
under the loss too (sdlora.demo.checkpoint_scores): trigger prompts drawn as the concept, and
trigger-free prompts still drawn right. Anywhere else there is no evaluator and nothing is shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sdlora.config import AdapterWeight, GenerateConfig
from sdlora.errors import SdloraError
from sdlora.training.checkpoint_adapters import (
    CheckpointAdapter,
    best_checkpoint,
    checkpoint_adapters_folder,
    list_checkpoint_adapters,
)

FOOTER = 40  # pixels under the grid for each column's validation loss
FIGURE_LINE = 20  # pixels for each line of the evaluator's figures below it


@dataclass(frozen=True)
class Comparison:
    """What to draw each checkpoint with."""

    weights: tuple[float, ...] = (1.0,)
    prompts: tuple[str, ...] = ()  # default: the adapter's trigger word alone
    seeds: tuple[int, ...] = (1,)
    steps: int = 20
    guidance: float = 7.5
    evaluator_prompts: int = 6  # demo evaluator prompts of each kind per checkpoint (demo model only)


@dataclass(frozen=True)
class ComparedCheckpoints:
    """The grid, and the demo evaluator's figures per checkpoint where there is an evaluator."""

    image: Image.Image
    checkpoints: list[CheckpointAdapter]
    lesson: str = ""  # the demo lesson the adapter teaches; empty: no figures
    scores: list = field(default_factory=list)  # a DemoScore per checkpoint

    def summary(self) -> list[str]:
        """One line per checkpoint: step, validation loss, and the figures when there are some."""
        best = best_checkpoint(self.checkpoints)
        lines = []
        for i, checkpoint in enumerate(self.checkpoints):
            line = f"step {checkpoint.step}: {column_label(checkpoint, best)}"
            if self.scores:
                score = self.scores[i]
                line += (
                    f"; {score.adopted}/{score.trigger_prompts} trigger prompts drawn as {self.lesson}, "
                    f"{score.faithful}/{score.plain_prompts} trigger-free prompts drawn right"
                )
            lines.append(line)
        return lines


def column_label(checkpoint: CheckpointAdapter, best: CheckpointAdapter | None) -> str:
    """`step N`, its validation loss under it, and the best one marked."""
    loss = "-" if checkpoint.validation_loss is None else f"{checkpoint.validation_loss:.4f}"
    mark = " best" if best is not None and checkpoint.step == best.step else ""
    return f"val {loss}{mark}"


def compare_checkpoints(
    base_model: str, output_dir: str | Path, name: str, comparison: Comparison, generator=None
) -> ComparedCheckpoints:
    """The grid of `name`'s checkpoint adapters; `generator` may pass in a loaded Generator over their folder."""
    from sdlora.generation.generate import Generator
    from sdlora.library.store import AdapterLibrary

    checkpoints = list_checkpoint_adapters(output_dir, name)
    if not checkpoints:
        raise SdloraError(
            f"{name!r} has no checkpoint adapters to compare; train with --adapter-every N or validation"
        )
    if generator is None:
        folder = checkpoint_adapters_folder(output_dir, name)
        generator = Generator(
            base_model, AdapterLibrary(folder), max_resident=len(checkpoints), fuse_mixes=False
        )
    prompts = comparison.prompts or (_trigger(checkpoints[0]),)
    columns: list[list[Image.Image]] = [[] for _ in checkpoints]
    row_labels = []
    for weight in comparison.weights:
        for prompt in prompts:
            configs = [
                GenerateConfig(
                    prompt=prompt,
                    seed=comparison.seeds[0],
                    count=1,
                    steps=comparison.steps,
                    guidance=comparison.guidance,
                    adapters=(AdapterWeight(c.path.stem, weight),),
                )
                for c in checkpoints
            ]
            for seed in comparison.seeds:  # one call per row: every checkpoint at this seed together
                row = generator.generate_batch([_at(config, seed) for config in configs])
                for column, images in zip(columns, row, strict=True):
                    column.append(images[0].image)
                row_labels.append(f"{weight:g} · {_short(prompt)} · seed {seed}")
    lesson, scores = _figures(base_model, checkpoints, generator, comparison.evaluator_prompts)
    image = _with_footer(checkpoints, columns, row_labels, lesson, scores)
    return ComparedCheckpoints(image, checkpoints, lesson, scores)


def _figures(base_model: str, checkpoints: list[CheckpointAdapter], generator, prompts: int):
    """The demo lesson's name and each checkpoint's evaluator figures, or ("", []) without an evaluator."""
    from sdlora.demo.checkpoint_scores import demo_lesson, score_adapters

    lesson = demo_lesson(base_model, checkpoints[0].path) if prompts > 0 else None
    if lesson is None:
        return "", []
    return lesson.name, score_adapters(generator, lesson, [c.path.stem for c in checkpoints], prompts)


def _at(config: GenerateConfig, seed: int) -> GenerateConfig:
    from dataclasses import replace

    return replace(config, seed=seed)


def _trigger(checkpoint: CheckpointAdapter) -> str:
    from sdlora.library.formats.files import read_metadata

    return read_metadata(checkpoint.path).get("sdlora.trigger_word") or "a picture"


def _short(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _with_footer(
    checkpoints: list[CheckpointAdapter],
    columns: list[list[Image.Image]],
    row_labels: list[str],
    lesson: str = "",
    scores: list | None = None,
) -> Image.Image:
    """The labelled grid with each checkpoint's validation loss (and evaluator figures) under its column."""
    from sdlora.generation.grid import labelled_grid

    best = best_checkpoint(checkpoints)
    grid = labelled_grid(columns, [f"step {c.step}" for c in checkpoints], row_labels)
    cell_w = columns[0][0].width * max(1, -(-128 // min(columns[0][0].size)))  # as labelled_grid scales
    margin = grid.width - cell_w * len(columns)
    figure_lines = 2 if scores else 0
    out = Image.new("RGB", (grid.width, grid.height + FOOTER + figure_lines * FIGURE_LINE), "white")
    out.paste(grid, (0, 0))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=14)
    for i, checkpoint in enumerate(checkpoints):
        colour = "darkgreen" if best is not None and checkpoint.step == best.step else "black"
        draw.text(
            (margin + i * cell_w + 4, grid.height + 10),
            column_label(checkpoint, best),
            fill=colour,
            font=font,
        )
    if scores:
        top = grid.height + FOOTER - 6
        draw.text((4, top), "trigger:", fill="black", font=font)
        draw.text((4, top + FIGURE_LINE), "no trigger:", fill="black", font=font)
        for i, score in enumerate(scores):
            x = margin + i * cell_w + 4
            draw.text((x, top), f"{score.adopted}/{score.trigger_prompts} {lesson}", fill="black", font=font)
            draw.text(
                (x, top + FIGURE_LINE),
                f"{score.faithful}/{score.plain_prompts} right",
                fill="black",
                font=font,
            )
    return out
