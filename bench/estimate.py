"""How far the Train tab's first estimate is from the run: `python bench/estimate.py [--steps N]`.

The first estimate a new user reads has no measurement of this machine yet: it is the formula of
sdlora.training.estimate (the model's size, its layer calls, the previews). Here three runs on the demo
model, each timed from its first step to its end (previews, checkpoint and saving included), are set
beside what the formula said before them:
- A: the demo preset as the app starts it (previews every steps/4, the final preview);
- B: the same without previews;
- C: attention layers only, batch 1, no regularisation images, no previews.
Each run writes to a folder of its own, so that no run's measured speed stands in for the formula.
B and C are the two runs SECONDS_PER_CALL's CPU figures were fitted on; A checks the preview term.
Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdlora import runtime  # noqa: E402

runtime.prepare()  # the threading every entry point gets

from bench.report import machine, write_section  # noqa: E402
from sdlora.assets import DEMO_MODEL, EXAMPLE_CONCEPTS  # noqa: E402
from sdlora.config import ATTENTION_PROJECTIONS, preview_interval  # noqa: E402
from sdlora.events import Finished, Started  # noqa: E402
from sdlora.models.families import family_of_pipeline  # noqa: E402
from sdlora.models.loading import load_pipeline  # noqa: E402
from sdlora.settings import train_config_from  # noqa: E402
from sdlora.training import estimate  # noqa: E402
from sdlora.training.loop import train  # noqa: E402
from sdlora.training.lora import layer_counts  # noqa: E402


def timed(config) -> float:
    """Seconds from the run's start event to its end event."""
    stamps = {}
    train(config, on_event=lambda e: stamps.setdefault(type(e), time.perf_counter()))
    return stamps[Finished] - stamps[Started]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    pipeline = load_pipeline(str(DEMO_MODEL))
    family = family_of_pipeline(pipeline)
    denoiser = getattr(pipeline, family.denoiser)
    parameters = sum(p.numel() for p in denoiser.parameters())
    out = Path(tempfile.mkdtemp(prefix="sdlora-estimate-"))
    preset = train_config_from(
        {"data.images": str(EXAMPLE_CONCEPTS / "star"), "data.trigger_word": "sks", "output_dir": str(out)},
        base_model=str(DEMO_MODEL),
        preset="Demo",
    )
    steps = args.steps
    runs = {
        "A: demo preset, previews": replace(
            preset, name="a", steps=steps, preview_every=preview_interval(steps)
        ),
        "B: demo preset, no previews": replace(preset, name="b", steps=steps, final_preview=False),
        "C: attention only, batch 1, no regularisation": replace(
            preset,
            name="c",
            steps=steps,
            final_preview=False,
            batch_size=1,
            lora=replace(preset.lora, target_modules=ATTENTION_PROJECTIONS, extra_target_modules=()),
            data=replace(preset.data, regularization_images=""),
        ),
    }
    rows = []
    for label, config in runs.items():
        config = replace(config, output_dir=str(out / config.name))
        layers = layer_counts(denoiser, config.lora, family.lora_targets)
        said = estimate.estimate_training(config, parameters, None, "cpu", layers=layers)
        took = timed(config)
        rows.append(
            f"| {label} | {layers[0]} / {layers[1]} | {said.seconds:.0f} s | {took:.0f} s | {took / said.seconds:.2f} |"
        )
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            "## The first estimate against the run (`bench/estimate.py`)",
            "",
            f"{machine()}. The demo model, {steps} steps of the star example each; 'said' is the Train tab's",
            "estimate before any run here (the formula: the model's size, its layer calls, the previews),",
            "'took' the run from its first step to its end. Ratio = took / said (1.0: exact).",
            "",
            "| run | modules / LoRA layers | said | took | ratio |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "SECONDS_PER_CALL['cpu'] (seconds per layer call, and per call and image) was fitted on runs B and C",
            f"of an earlier run of this script: {estimate.SECONDS_PER_CALL['cpu']}; A's previews were not fitted.",
        ]
    )
    print(text)
    write_section("estimate", text)


if __name__ == "__main__":
    main()
