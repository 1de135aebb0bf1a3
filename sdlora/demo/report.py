"""Measure the exported demo model: `python -m sdlora.demo.report`.

Generates every base colour x shape pair with new seeds, reads each image back with
the evaluator, times generation, and writes docs/demo-grid.png plus a figures block
in docs/demo-model.md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sdlora.assets import DEMO_MARKER, DEMO_MODEL
from sdlora.demo.evaluate import classify
from sdlora.demo.shapes import BACKGROUNDS, BASE_COLOURS, BASE_SHAPES

START, END = "<!-- report:start -->", "<!-- report:end -->"
DOC = Path("docs/demo-model.md")


@dataclass
class Report:
    """Per-prompt outcomes of one evaluation run."""

    rows: list[dict] = field(default_factory=list)  # prompt, colour, shape, read colour/shape, seconds
    images: list[Image.Image] = field(default_factory=list)

    def accuracy(self, attribute: str, rows: list[dict] | None = None) -> float:
        """Share of images whose read attribute matches the prompt."""
        rows = self.rows if rows is None else rows
        return float(np.mean([r[attribute] == r["read_" + attribute] for r in rows]))


def prompts(per_pair: int) -> list[tuple[str, str, str]]:
    """(prompt, colour, shape), alternating short and long forms with varied backgrounds."""
    out = []
    backgrounds = sorted(BACKGROUNDS)
    for k in range(per_pair):
        for colour in BASE_COLOURS:
            for shape in BASE_SHAPES:
                text = f"a {colour} {shape}"
                if k % 2:
                    text += f" on a {backgrounds[(k // 2) % len(backgrounds)]} background"
                out.append((text, colour, shape))
    return out


def run(model: Path, per_pair: int, steps: int, guidance: float, seed: int) -> Report:
    """Generate and score every prompt, one image at a time (so the timing is per image)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    report = Report()
    for index, (text, colour, shape) in enumerate(prompts(per_pair)):
        gen = torch.Generator().manual_seed(seed + index)
        tic = time.perf_counter()
        image = pipe(text, num_inference_steps=steps, guidance_scale=guidance, generator=gen).images[0]
        seconds = time.perf_counter() - tic
        reading = classify(np.asarray(image))
        report.rows.append(
            {
                "prompt": text,
                "colour": colour,
                "shape": shape,
                "seconds": seconds,
                "read_colour": reading.colour,
                "read_shape": reading.shape,
            }
        )
        report.images.append(image)
    return report


def grid(report: Report, columns: int, scale: int = 1) -> Image.Image:
    """Images laid out one colour x shape pair per row, with a label column."""
    pairs = [(c, s) for c in BASE_COLOURS for s in BASE_SHAPES]
    cell, label = 64 * scale, 110
    sheet = Image.new("RGB", (label + columns * cell, len(pairs) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (colour, shape) in enumerate(pairs):
        draw.text((6, row * cell + cell // 2 - 6), f"{colour} {shape}", fill="black")
        chosen = [
            im
            for r, im in zip(report.rows, report.images, strict=True)
            if (r["colour"], r["shape"]) == (colour, shape)
        ]
        for col, image in enumerate(chosen[:columns]):
            sheet.paste(
                image.resize((cell, cell), Image.Resampling.NEAREST), (label + col * cell, row * cell)
            )
    return sheet


def _steps_text(info: dict) -> str:
    return ", ".join(f"{stage} {steps}" for stage, steps in info.get("steps", {}).items()) or "?"


def summary(report: Report, model: Path, steps: int, guidance: float) -> str:
    """Markdown block with overall and per-pair figures."""
    info_path = model / DEMO_MARKER
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    seconds = [r["seconds"] for r in report.rows]
    lines = [
        START,
        "## Latest report",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on `{model}` "
        f"(build steps {_steps_text(info)}), {len(report.rows)} prompts, "
        f"{steps} steps, guidance {guidance}, new seeds, CPU with {torch.get_num_threads()} threads.",
        "",
        f"- colour accuracy: **{report.accuracy('colour'):.1%}** (target >= 90%)",
        f"- shape accuracy: **{report.accuracy('shape'):.1%}** (target >= 80%)",
        f"- seconds per 64px image: median {np.median(seconds):.2f}, max {max(seconds):.2f} (target <= 1)",
        "",
        "![grid](demo-grid.png)",
        "",
        "| pair | colour | shape |",
        "| --- | --- | --- |",
    ]
    for colour in BASE_COLOURS:
        for shape in BASE_SHAPES:
            rows = [r for r in report.rows if (r["colour"], r["shape"]) == (colour, shape)]
            lines.append(
                f"| {colour} {shape} | {report.accuracy('colour', rows):.0%} | {report.accuracy('shape', rows):.0%} |"
            )
    return "\n".join(lines + ["", END, ""])


def write_summary(block: str) -> None:
    """Replace the report block in docs/demo-model.md, keeping the build log after it."""
    text = DOC.read_text() if DOC.exists() else "# The embedded demo model\n\n"
    if START in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    elif "## Build log" in text:
        head, rest = text.split("## Build log", 1)
        text = head + block + "\n## Build log" + rest
    else:
        text += "\n" + block
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> str:
    """Command line entry point; returns the markdown block it wrote."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--per-pair", type=int, default=9, help="images per colour x shape pair")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=900_000, help="first seed; far from any used in training")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run(args.model, args.per_pair, args.steps, args.guidance, args.seed)
    grid(report, args.per_pair).save(DOC.parent / "demo-grid.png", optimize=True)
    block = summary(report, args.model, args.steps, args.guidance)
    write_summary(block)
    record_in_model(report, args.model, args.steps, args.guidance)
    print(block)
    return block


def record_in_model(report: Report, model: Path, steps: int, guidance: float) -> None:
    """Note the figures beside the weights they measure; the next export replaces both."""
    info_path = model / DEMO_MARKER
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["report"] = {
        "unet_step": info.get("steps", {}).get("unet"),
        "build_steps": info.get("steps", {}),  # every stage: a new decoder needs a new report too
        "colour": round(report.accuracy("colour"), 4),
        "shape": round(report.accuracy("shape"), 4),
        "prompts": len(report.rows),
        "steps": steps,
        "guidance": guidance,
        "seconds_per_image": round(float(np.median([r["seconds"] for r in report.rows])), 3),
    }
    info_path.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
