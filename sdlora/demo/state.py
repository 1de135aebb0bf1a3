"""Everything a demo build needs to stop and carry on: models, optimisers, EMA, step, records."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from sdlora.demo.components import BUILD_INFO, make_text_encoder, make_unet, make_vae
from sdlora.library.formats.files import atomic_write

STAGES = ("vae1", "vae2", "decoder", "cache", "unet", "done")


@dataclass
class BuildState:
    """Live training state; `save`/`load` round-trip it through one checkpoint file."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    ema_text_encoder: CLIPTextModel
    ema_unet: UNet2DConditionModel
    stage: str = "vae1"
    steps: dict[str, int] = field(default_factory=dict)  # steps done per stage
    seconds: dict[str, float] = field(default_factory=dict)  # training wall time per stage
    vae_opt: torch.optim.Optimizer | None = None
    unet_opt: torch.optim.Optimizer | None = None
    # Optimiser states read from a checkpoint, applied once the stage builds its optimiser.
    pending_opt: dict[str, dict | None] = field(default_factory=dict)
    # Set when a stage added to the recipe later is caught up on an older build: where to go back to.
    return_to: str | None = None

    def next_stage(self) -> None:
        """Move to the following stage, dropping optimiser state that is no longer needed."""
        self.stage = self.return_to or STAGES[STAGES.index(self.stage) + 1]
        self.return_to = None
        self.vae_opt = None

    def save(self, path: Path) -> None:
        """Write atomically, so a kill during saving leaves the previous checkpoint intact."""
        blob = {
            "stage": self.stage,
            "steps": self.steps,
            "seconds": self.seconds,
            "scaling_factor": self.vae.config.scaling_factor,
            "vae": self.vae.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "unet": self.unet.state_dict(),
            "ema_text_encoder": self.ema_text_encoder.state_dict(),
            "ema_unet": self.ema_unet.state_dict(),
            "vae_opt": self.vae_opt.state_dict() if self.vae_opt else None,
            "unet_opt": self.unet_opt.state_dict() if self.unet_opt else None,
        }
        atomic_write(path, lambda tmp: torch.save(blob, tmp))


def fresh_state(tokenizer: CLIPTokenizer, seed: int) -> BuildState:
    """Newly initialised models, seeded so a rebuild starts from the same weights."""
    torch.manual_seed(seed)
    vae, text_encoder, unet = make_vae(), make_text_encoder(tokenizer), make_unet()
    return BuildState(vae, text_encoder, unet, copy.deepcopy(text_encoder), copy.deepcopy(unet))


def load_checkpoint(path: Path, tokenizer: CLIPTokenizer) -> BuildState:
    """Rebuild the state saved by `BuildState.save` (optimisers are restored by the stage that uses them)."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    state = fresh_state(tokenizer, seed=0)
    for name in ("vae", "text_encoder", "unet", "ema_text_encoder", "ema_unet"):
        getattr(state, name).load_state_dict(blob[name])
    state.vae.register_to_config(scaling_factor=blob["scaling_factor"])
    state.stage, state.steps, state.seconds = blob["stage"], blob["steps"], blob["seconds"]
    state.pending_opt = {"vae": blob["vae_opt"], "unet": blob["unet_opt"]}
    return state


def load_exported(folder: Path, tokenizer: CLIPTokenizer) -> BuildState:
    """Continue from an exported model folder when the full checkpoint is gone (fresh optimiser)."""
    info = json.loads((folder / BUILD_INFO).read_text())
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    state = BuildState(vae, text_encoder, unet, copy.deepcopy(text_encoder), copy.deepcopy(unet))
    state.stage, state.steps, state.seconds = "cache", dict(info["steps"]), dict(info["seconds"])
    return state


class Ema:
    """Exponential moving average of a model's weights, warmed up so early steps count."""

    def __init__(self, target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
        self.target, self.source, self.decay = target, source, decay
        self.targets = [p for p in target.parameters()]
        self.sources = [p for p in source.parameters()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Blend the source's current weights into the average."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.targets, self.sources, 1 - decay)
