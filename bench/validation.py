"""Does the validation loss say when to stop? `python bench/validation.py` on the demo model.

A run long enough to overfit: the star example concept, half of its images held out for validation,
the other half trained on for many steps at a moderate rate (the demo proof's 4e-3 by default),
without the demo preset's regularisation images (so nothing holds prompts without the trigger in
place). Every checkpoint adapter is scored by the demo evaluator (sdlora.demo.checkpoint_scores):
adoption (trigger prompts that draw a star) and faithfulness (trigger-free prompts whose colour and
shape stay as asked), beside its validation loss and the training loss before it. Also the cost:
seconds per evaluation against seconds per step, and the share of a default run (ten evaluations)
that validation adds. Writes its section of docs/benchmarks.md.

On a 2-core machine, train in one process and score in another as the checkpoints appear:
`--train-only DIR` and `--score-run DIR` (same --steps, --every, --lr) halve the wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, write_section  # noqa: E402
from sdlora.assets import DEMO_MODEL  # noqa: E402
from sdlora.config import validation_interval  # noqa: E402
from sdlora.demo.checkpoint_scores import score_adapter  # noqa: E402
from sdlora.demo.learning import LESSONS, lesson_config  # noqa: E402
from sdlora.events import Step  # noqa: E402
from sdlora.generation.generate import Generator  # noqa: E402
from sdlora.library.store import AdapterLibrary  # noqa: E402
from sdlora.training import loop  # noqa: E402
from sdlora.training.checkpoint_adapters import checkpoint_adapters_folder, list_checkpoint_adapters  # noqa: E402
from sdlora.training.metrics import MetricsRow, read_metrics  # noqa: E402


def timed_validation(spent: list[float]):
    """loop.validation_loss, recording the seconds of each evaluation."""
    original = loop.validation_loss

    def measured(*args):
        start = time.perf_counter()
        loss = original(*args)
        spent.append(time.perf_counter() - start)
        return loss

    return measured


def training_loss_before(rows: list[MetricsRow], step: int, window: int) -> float:
    """The mean training loss of the `window` steps up to `step` (one step's loss is mostly noise)."""
    losses = [r.loss for r in rows if step - window < r.step <= step]
    return sum(losses) / max(1, len(losses))


def run_config(args, out: Path):
    """The star lesson without regularisation images, 4 of its 8 images held out for validation."""
    config = lesson_config(LESSONS["star"], out, steps=args.steps, learning_rate=args.lr, cpu_threads=1)
    return replace(
        config,
        data=replace(config.data, regularization_images=""),
        validation=replace(config.validation, validation_images=4, validation_every=args.every),
    )


def score_run(args, out: Path, name: str, follow: bool) -> tuple[object, list]:
    """The evaluator's figures for the base and each checkpoint, printed as they come.

    `follow`: the run goes on in another process; score each checkpoint once its file is there, until
    the last step's (on a 2-core machine, scoring beside training halves the wall time).
    """
    lesson = LESSONS["star"]
    generator = Generator(str(DEMO_MODEL), AdapterLibrary(checkpoint_adapters_folder(out, name)))
    base = score_adapter(generator, lesson, None, args.prompts, 1.0)
    print(f"base: {base}", flush=True)
    scored: dict[int, tuple] = {}
    while True:
        fresh = [c for c in list_checkpoint_adapters(out, name) if c.step not in scored]
        for checkpoint in fresh:
            time.sleep(2 if follow else 0)  # a file just listed may still be being renamed into place
            scored[checkpoint.step] = (
                checkpoint,
                score_adapter(generator, lesson, checkpoint.path.stem, args.prompts, 1.0),
            )
            print(
                f"step {checkpoint.step}: val {checkpoint.validation_loss:.4f} {scored[checkpoint.step][1]}",
                flush=True,
            )
        if not follow or args.steps in scored:
            break
        if not fresh:
            time.sleep(10)
    metrics = read_metrics(out / f"{name}.metrics.csv")
    rows = [
        (step, checkpoint.validation_loss, training_loss_before(metrics, step, args.every), score)
        for step, (checkpoint, score) in sorted(scored.items())
    ]
    return base, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument(
        "--prompts", type=int, default=12, help="evaluator prompts of each kind per checkpoint"
    )
    parser.add_argument(
        "--train-only", type=Path, help="train into this folder and stop (score it with --score-run)"
    )
    parser.add_argument(
        "--score-run",
        type=Path,
        help="score the checkpoints of a run in this folder as they appear, and report",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.score_run:
        config = run_config(args, args.score_run)
        base, rows = score_run(args, args.score_run, config.name, follow=True)
        report(args, config, rows, base, None)
        return
    spent: list[float] = []
    loop.validation_loss = timed_validation(spent)
    steps: list[Step] = []
    with tempfile.TemporaryDirectory() as scratch:
        out = args.train_only or Path(scratch)
        config = run_config(args, out)
        started = time.perf_counter()
        loop.train(config, on_event=lambda e: steps.append(e) if isinstance(e, Step) else None)
        run_seconds = time.perf_counter() - started
        cost = (spent, len(steps), run_seconds)
        print(
            f"trained {args.steps} steps in {run_seconds:.0f} s; validation {sum(spent):.1f} s in {len(spent)}",
            flush=True,
        )
        if args.train_only:
            return
        base, rows = score_run(args, out, config.name, follow=False)
    report(args, config, rows, base, cost)


def report(args, config, rows, base, cost) -> None:
    """The table (and the cost, when this process trained), printed and written to docs/benchmarks.md."""
    best = min(rows, key=lambda r: (r[1], r[0]))
    n = args.prompts
    lines = [
        "## Validation loss against the evaluator (demo model, star)",
        "",
        f"`python bench/validation.py --steps {args.steps} --every {args.every} --lr {args.lr:g} --prompts {n}` "
        f"on {machine()}: 4 of the 8 star images held out, 4 trained on for {args.steps} steps at {args.lr:g} "
        f"(batch {config.batch_size}, rank {config.lora.rank}), without the preset's regularisation images so "
        f"that overfitting shows. Adoption: trigger prompts (of {n}) drawn as a star; faithful: trigger-free "
        f"prompts (of {n}) drawn in the asked colour and shape (the base model alone: {base.faithful}/{n}). "
        f"Training loss: the mean of the {args.every} steps up to the checkpoint.",
        "",
        "| step | validation loss | training loss | adoption | faithful (no trigger) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for step, loss, train_loss, score in rows:
        mark = " (lowest)" if step == best[0] else ""
        lines.append(
            f"| {step} | {loss:.4f}{mark} | {train_loss:.4f} | {score.adopted}/{n} | {score.faithful}/{n} |"
        )
    last = rows[-1]
    verdict = (
        f"The lowest validation loss is at step {best[0]} of {last[0]}; from there to the end the "
        f"trigger-free score goes {best[3].faithful}/{n} -> {last[3].faithful}/{n} and adoption "
        f"{best[3].adopted}/{n} -> {last[3].adopted}/{n}."
    )
    lines += ["", verdict]
    if cost:
        lines += ["", cost_line(config, *cost)]
    text = "\n".join(lines)
    print(text)
    write_section("validation", text)


def cost_line(config, spent: list[float], steps: int, run_seconds: float) -> str:
    """Seconds per evaluation against seconds per step, and validation's share of a default run."""
    # the run's own seconds less validation's, per step (loading and encoding included, so the share is if
    # anything low)
    step_seconds = (run_seconds - sum(spent)) / max(1, steps)
    per_eval = sum(spent) / len(spent)
    default_evals = config.steps // validation_interval(config.steps)
    share = per_eval * default_evals / (step_seconds * config.steps)
    return (
        f"Cost: one evaluation (4 images x 4 timesteps, no_grad) takes {per_eval:.2f} s against "
        f"{step_seconds:.3f} s per training step; at the default interval (ten a run) validation adds "
        f"{share:.1%} to a {config.steps}-step run (this run: {sum(spent):.1f} s of {run_seconds:.0f} s "
        f"for {len(spent)} evaluations)."
    )


if __name__ == "__main__":
    main()
