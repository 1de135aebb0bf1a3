"""How fast a LoRA teaches the demo model an unseen concept: `python bench/learning.py`.

For a shape (star), a colour (magenta, the one tests/test_demo_learning.py also checks, there
shortened to 150 steps at lr 4e-3: `--concepts magenta --stages 150 --lr 4e-3 --prompts 20
--no-compare --no-write` measures that run) and a texture (striped), plus the heart: train with the demo preset through the engine and, after each
stage, measure adoption (trigger-prompt images that show the concept, by the evaluator) against
training time; at the end, weight 0 and 0.5, and what the adapter does to prompts without the
trigger. The same run without the preset's regularisation images shows what they buy.
With --captions: the same folders captioned by hand and by the demo captioner; exits 1 when the
demo captioner's captions teach more than 10 points worse (a check the test suite leaves here).
Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, write_section  # noqa: E402
from sdlora.assets import DEMO_MODEL  # noqa: E402
from sdlora.captioning.captions import CaptionOptions  # noqa: E402
from sdlora.config import TrainConfig  # noqa: E402
from sdlora.demo.learning import (  # noqa: E402
    CONCEPTS_DIR,
    LESSONS,
    adoption,
    captioned_copy,
    faithfulness,
    generator_for,
    lesson_config,
    train_in_stages,
)
from sdlora.training.presets import preset_settings  # noqa: E402

DEMO_PRESET = TrainConfig.from_dict(preset_settings("Demo"), source="the demo preset")


def measure(
    name: str, stages: list[int], prompts: int, out: Path, regularised: bool, lr: float | None = None
) -> tuple[list[str], str]:
    """Train in stages; returns the adoption-curve rows and the end-of-run summary row."""
    lesson = LESSONS[name]
    config = lesson_config(lesson, out, cpu_threads=1)  # the setting these figures were first measured with
    if lr is not None:
        config = replace(config, learning_rate=lr)
    if not regularised:
        config = replace(config, data=replace(config.data, regularization_images=""))
    label = "with" if regularised else "without"
    rows: list[str] = []

    def after_stage(steps: int, seconds: float) -> None:
        rate = adoption(generator_for(out), lesson, 1.0, prompts)
        rows.append(f"| {name} ({lesson.kind}) | {label} | {steps} | {seconds / 60:.1f} | {rate:.0%} |")
        print(rows[-1], flush=True)

    train_in_stages(config, stages, after_stage)
    generator = generator_for(out)
    at0, at_half = adoption(generator, lesson, 0.0, prompts), adoption(generator, lesson, 0.5, prompts)
    base_ok = faithfulness(generator, None, 0.0, prompts)
    with_adapter_ok = faithfulness(generator, name, 1.0, prompts)
    summary = f"| {name} | {label} | {at0:.0%} | {at_half:.0%} | {base_ok:.0%} | {with_adapter_ok:.0%} |"
    print(summary, flush=True)
    return rows, summary


def measure_in_tmp(
    name: str, stages: list[int], prompts: int, regularised: bool, lr: float | None = None
) -> tuple[list[str], str]:
    """One run in its own scratch folder, on one torch thread (also when run side by side)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        return measure(name, stages if regularised else stages[-1:], prompts, Path(tmp), regularised, lr)


# Who writes the captions: the shipped hand-written files, the demo captioner, or the demo captioner
# told to drop the concept's own word (so that only the trigger can carry it).
CAPTION_VARIANTS = {
    "hand": lambda concept: None,
    "demo captioner": lambda concept: CaptionOptions(),
    "demo captioner, concept word dropped": lambda concept: CaptionOptions(drop_words=(concept,)),
}


def measure_captions(name: str, variant: str, prompts: int) -> tuple[str, float]:
    """Train the demo preset on the concept folder captioned one way; one table row and the adoption."""
    torch.set_num_threads(1)
    lesson = LESSONS[name]
    with tempfile.TemporaryDirectory() as tmp:
        options = CAPTION_VARIANTS[variant](name)
        folder = (
            CONCEPTS_DIR / name if options is None else captioned_copy(lesson, Path(tmp) / "images", options)
        )
        missing = [p.name for p in folder.glob("*.png") if not p.with_suffix(".txt").is_file()]
        if missing:
            raise SystemExit(f"{variant}: no caption written for {', '.join(sorted(missing))} in {folder}")
        example = (sorted(folder.glob("*.txt"))[0]).read_text().strip()
        config = lesson_config(lesson, Path(tmp) / "out", images=folder, cpu_threads=1)
        train_in_stages(config, [config.steps], lambda steps, seconds: None)
        generator = generator_for(Path(tmp) / "out")
        rate = adoption(generator, lesson, 1.0, prompts)
        kept = faithfulness(generator, name, 1.0, prompts)
    row = f"| {name} | {variant} | `{example}` | {rate:.0%} | {kept:.0%} |"
    print(row, flush=True)
    return row, rate


def captioner_shortfalls(rates: dict[tuple[str, str], float]) -> list[str]:
    """Concepts where the demo captioner's captions teach more than 10 points worse than the hand-written."""
    return [
        f"{name}: {rates[name, 'demo captioner']:.0%} against {rates[name, 'hand']:.0%} by hand"
        for name in sorted({name for name, _ in rates})
        if rates[name, "hand"] - rates[name, "demo captioner"] > 0.10
    ]


def captions_main(args, where: str) -> None:
    """The captions comparison: the same folders, captioned by hand and by the demo captioner."""
    runs = [
        (name, variant)
        for name in args.concepts
        for variant in CAPTION_VARIANTS
        if not (variant.endswith("dropped") and name not in args.drop_for)
    ]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = [
            r.result()
            for r in [pool.submit(measure_captions, name, variant, args.prompts) for name, variant in runs]
        ]
    rows = [row for row, _ in results]
    shortfalls = captioner_shortfalls({run: rate for run, (_, rate) in zip(runs, results, strict=True)})
    text = "\n".join(
        [
            "## Captions: by hand and by the demo captioner (`python bench/learning.py --captions`)",
            "",
            f"{where}; training on one thread, {args.jobs} run(s) side by side; the demo preset's "
            f"{DEMO_PRESET.steps} steps on the concept's 8 example images, trigger `sks`; {args.prompts} images "
            "per measurement, 20 steps, guidance 6.",
            "",
            "| concept | captions | first caption | adoption at weight 1 | plain prompts right with the adapter |",
            "| --- | --- | --- | --- | --- |",
            *rows,
            "",
            "Goal: the demo captioner within 10 points of the hand-written captions: "
            + ("met." if not shortfalls else "missed for " + "; ".join(shortfalls) + "."),
        ]
    )
    print(text)
    if not args.no_write:
        print(f"written to {write_section('learning_captions', text)}")
    if shortfalls:
        raise SystemExit(1)  # the check tests/test_demo_learning.py leaves to this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--concepts", nargs="*", default=["star", "magenta", "striped", "heart"], choices=list(LESSONS)
    )
    parser.add_argument(
        "--stages",
        nargs="*",
        type=int,
        help="step counts to measure at (default: thirds of the demo preset's steps)",
    )
    parser.add_argument("--prompts", type=int, default=24, help="images per measurement")
    parser.add_argument("--lr", type=float, help="learning rate instead of the demo preset's")
    parser.add_argument(
        "--no-compare", action="store_true", help="skip the runs without regularisation images"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs side by side, one thread each (2 on a 2-core machine halves the wall time)",
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--captions",
        action="store_true",
        help="instead: compare hand-written captions with the demo captioner's",
    )
    parser.add_argument(
        "--drop-for",
        nargs="*",
        default=["striped"],
        help="with --captions: concepts also trained with their own word dropped from the captions",
    )
    args = parser.parse_args()
    if not (DEMO_MODEL / "model_index.json").exists():
        parser.error(f"no demo model at {DEMO_MODEL}; build it with python -m sdlora.demo.build")
    preset = DEMO_PRESET
    stages = args.stages or [preset.steps * k // 3 for k in range(1, 4)]
    where = machine()  # the load before these runs add their own
    if args.captions:
        return captions_main(args, where)
    runs = [
        (name, regularised)
        for name in args.concepts
        for regularised in (True, False)[: 1 if args.no_compare else 2]
    ]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = [
            pool.submit(measure_in_tmp, name, stages, args.prompts, regularised, args.lr)
            for name, regularised in runs
        ]
        curve, summaries = [], []
        for result in results:  # in submission order, whatever finishes first
            rows, summary = result.result()
            curve += rows
            summaries.append(summary)
    reg = Path(preset.data.regularization_images)
    text = "\n".join(
        [
            "## Learning on the demo model (`python bench/learning.py`)",
            "",
            f"{where}; training on one thread (`cpu_threads=1`; two are faster on an idle machine, "
            f"see the training loop section), {args.jobs} run(s) side by side. Demo preset: rank "
            f"{preset.lora.rank}, alpha {preset.lora.alpha:g}, lr {args.lr or preset.learning_rate:g}, batch {preset.batch_size}, "
            f"{preset.data.resolution} px, targets: attention projections + {', '.join(preset.lora.extra_target_modules)}; "
            f"regularisation images: {len(list(reg.glob('*.png')))} base-model scenes ({reg.parent.name}/{reg.name}) "
            f"with loss weight {preset.prior_loss_weight:g}, as many per step as concept images; "
            f"8 example images per concept (assets/concepts), "
            f"trigger `sks`; {args.prompts} images per measurement, 20 steps, guidance 6.",
            "",
            "Adoption (trigger-prompt images in which the evaluator sees the concept) against training time, with "
            "and without the regularisation images:",
            "",
            "| concept | reg images | steps | training min | adoption at weight 1 |",
            "| --- | --- | --- | --- | --- |",
            *curve,
            "",
            "At the end: adoption at weight 0 and 0.5, and prompts without the trigger (`a red circle`, ...) drawn "
            "with the asked colour and shape, by the base alone and with the adapter at weight 1:",
            "",
            "| concept | reg images | weight 0 | weight 0.5 | base: plain prompts right | with adapter: plain prompts right |",
            "| --- | --- | --- | --- | --- | --- |",
            *summaries,
            "",
            "Goal: >= 90% adoption within 3 minutes for each concept, plain prompts left as they were.",
        ]
    )
    print(text)
    if not args.no_write:
        print(f"written to {write_section('learning', text)}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
