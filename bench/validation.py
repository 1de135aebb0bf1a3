"""Does the validation loss say when to stop? `python bench/validation.py` on the demo model.

A run long enough to overfit: the star example concept, half of its images held out for validation,
the other half trained on at a high rate for many steps, without the demo preset's regularisation
images (so nothing holds prompts without the trigger in place). Every checkpoint adapter is then
scored by the demo evaluator: adoption (trigger prompts that draw a star) and faithfulness
(trigger-free prompts whose colour and shape stay as asked), beside its validation loss. Also the
cost: seconds per evaluation against seconds per step, and the share of a default run (ten
evaluations) that validation adds. Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, write_section  # noqa: E402
from sdlora.assets import DEMO_MODEL  # noqa: E402
from sdlora.config import AdapterWeight, GenerateConfig, validation_interval  # noqa: E402
from sdlora.demo.learning import GUIDANCE, LESSONS, faithfulness, lesson_config, shown, trigger_prompts  # noqa: E402
from sdlora.events import Step  # noqa: E402
from sdlora.generation.generate import Generator  # noqa: E402
from sdlora.library.store import AdapterLibrary  # noqa: E402
from sdlora.training import loop  # noqa: E402
from sdlora.training.checkpoint_adapters import checkpoint_adapters_folder, list_checkpoint_adapters  # noqa: E402


def timed_validation(spent: list[float]):
    """loop.validation_loss, recording the seconds of each evaluation."""
    original = loop.validation_loss

    def measured(*args):
        start = time.perf_counter()
        loss = original(*args)
        spent.append(time.perf_counter() - start)
        return loss

    return measured


def adoption_of(generator: Generator, adapter: str, count: int) -> float:
    """Share of trigger prompts whose image shows a star, with this checkpoint at weight 1."""
    lesson = LESSONS["star"]
    images = []
    for i, prompt in enumerate(trigger_prompts(lesson, count)):
        config = GenerateConfig(
            prompt=prompt, seed=1000 + i, guidance=GUIDANCE, adapters=(AdapterWeight(adapter, 1.0),)
        )
        images.append(np.asarray(generator.generate(config)[0].image))
    return shown(lesson, images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--prompts", type=int, default=12, help="evaluator prompts per checkpoint and score")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spent: list[float] = []
    loop.validation_loss = timed_validation(spent)
    steps: list[Step] = []
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        config = lesson_config(LESSONS["star"], out, steps=args.steps, learning_rate=args.lr, cpu_threads=1)
        config = replace(
            config,
            data=replace(config.data, regularization_images=""),
            validation=replace(config.validation, validation_images=4, validation_every=args.every),
        )
        started = time.perf_counter()
        loop.train(config, on_event=lambda e: steps.append(e) if isinstance(e, Step) else None)
        run_seconds = time.perf_counter() - started
        generator = Generator(str(DEMO_MODEL), AdapterLibrary(checkpoint_adapters_folder(out, config.name)))
        rows = []
        for checkpoint in list_checkpoint_adapters(out, config.name):
            name = checkpoint.path.stem
            rows.append(
                (
                    checkpoint.step,
                    checkpoint.validation_loss,
                    adoption_of(generator, name, args.prompts),
                    faithfulness(generator, name, 1.0, args.prompts),
                )
            )
        base_faithful = faithfulness(generator, None, 0.0, args.prompts)
    report(args, config, rows, base_faithful, spent, steps, run_seconds)


def report(args, config, rows, base_faithful, spent, steps, run_seconds) -> None:
    """The table and the cost, printed and written to docs/benchmarks.md."""
    best = min(rows, key=lambda r: (r[1], r[0]))
    # the run's own seconds less validation's, per step (loading and encoding included, so the share below
    # is if anything low)
    step_seconds = (run_seconds - sum(spent)) / max(1, len(steps))
    per_eval = sum(spent) / len(spent)
    default_evals = config.steps // validation_interval(config.steps)
    share = per_eval * default_evals / (step_seconds * config.steps)
    lines = [
        "## Validation loss against the evaluator (demo model, star)",
        "",
        f"`python bench/validation.py --steps {args.steps} --every {args.every} --lr {args.lr:g}` on {machine()}: "
        f"4 of the 8 star images held out, 4 trained on for {args.steps} steps at {args.lr:g} (batch "
        f"{config.batch_size}, rank {config.lora.rank}), without the preset's regularisation images so that "
        f"overfitting shows. Adoption: share of {args.prompts} trigger prompts drawn as a star; faithful: share of "
        f"{args.prompts} trigger-free prompts drawn in the asked colour and shape (the base model alone: "
        f"{base_faithful:.0%}).",
        "",
        "| step | validation loss | adoption | faithful (no trigger) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for step, loss, adopted, faithful in rows:
        mark = " (lowest)" if step == best[0] else ""
        lines.append(f"| {step} | {loss:.4f}{mark} | {adopted:.0%} | {faithful:.0%} |")
    last = rows[-1]
    verdict = (
        f"The lowest validation loss is at step {best[0]} of {rows[-1][0]}; from there to the end the "
        f"trigger-free score goes {best[3]:.0%} -> {last[3]:.0%} and adoption {best[2]:.0%} -> {last[2]:.0%}."
    )
    lines += [
        "",
        verdict,
        "",
        f"Cost: one evaluation ({4} images x 4 timesteps, no_grad) takes {per_eval:.2f} s against "
        f"{step_seconds:.3f} s per training step; at the default interval (ten a run) validation adds "
        f"{share:.1%} to a {config.steps}-step run (this run: {sum(spent):.1f} s of {run_seconds:.0f} s "
        f"for {len(spent)} evaluations).",
    ]
    text = "\n".join(lines)
    print(text)
    write_section("validation", text)


if __name__ == "__main__":
    main()
