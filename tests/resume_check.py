"""Stop a run, resume it, and compare with the run that was never stopped: for every family's resume test."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sdlora.config import TrainConfig
from sdlora.events import Started, Step, StopFlag
from sdlora.training.loop import train


def straight_and_resumed(
    config: TrainConfig, folder: Path, stop_at: int = 3
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The adapter of `config` trained straight through, and the one stopped after `stop_at` steps, then resumed."""
    straight = train(config.replace(output_dir=str(folder / "straight")))
    interrupted = config.replace(output_dir=str(folder / "interrupted"))
    stop = StopFlag()
    first = train(
        interrupted,
        stop=stop,
        on_event=lambda e: stop.request() if isinstance(e, Step) and e.step == stop_at else None,
    )
    assert first.stopped_early and first.steps == stop_at
    starts = []
    resumed = train(
        interrupted, resume="latest", on_event=lambda e: starts.append(e) if isinstance(e, Started) else 0
    )
    assert starts[0].start_step == stop_at and resumed.steps == config.steps
    return load_file(str(straight.adapter_path)), load_file(str(resumed.adapter_path))
