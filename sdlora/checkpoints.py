"""Resumable checkpoints: LoRA weights, optimizer, schedule and RNG, saved through accelerate.

Only the adapter's tensors are written (not the multi-GB frozen UNet), and a checkpoint
directory appears under its final name only when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from sdlora.config import TrainConfig
from sdlora.errors import CheckpointError
from sdlora.lora import load_lora_state_dict, lora_state_dict

LORA_FILE = "lora.safetensors"
STATE_FILE = "sdlora_state.json"
PREFIX = "step-"


def run_folder(config: TrainConfig) -> Path:
    """Checkpoints and previews of a run live here, hidden from the adapter library's listing."""
    return Path(config.output_dir) / ".runs" / config.name


def checkpoint_folder(config: TrainConfig) -> Path:
    return run_folder(config) / "checkpoints"


def register_lora_only_hooks(accelerator) -> None:
    """Make accelerate's save_state/load_state store just the adapter, not the whole UNet."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_file(lora_state_dict(accelerator.unwrap_model(models[0])), str(Path(output_dir) / LORA_FILE))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        unet = accelerator.unwrap_model(models.pop())
        path = Path(input_dir) / LORA_FILE
        if not path.is_file():
            raise CheckpointError(f"checkpoint {input_dir} has no {LORA_FILE}; it is incomplete")
        load_lora_state_dict(unet, load_file(str(path)))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, config: TrainConfig, step: int) -> Path:
    """Write step-N atomically (all processes take part) and prune old ones; returns its path."""
    folder = checkpoint_folder(config)
    final = folder / f"{PREFIX}{step:06d}"
    partial = folder / f".{PREFIX}{step:06d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "config": config.to_dict()}
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in list_checkpoints(folder)[: -config.checkpoints_to_keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def adapter_path(config: TrainConfig) -> Path:
    """Where a run's finished adapter goes: <output>/<name>.safetensors."""
    return Path(config.output_dir) / f"{config.name}.safetensors"


def claim_name(config: TrainConfig, overwrite: bool) -> None:
    """Before a fresh run: refuse to mix with an earlier run of the same name, or clear it when asked."""
    adapter = adapter_path(config)
    old = list_checkpoints(checkpoint_folder(config))
    if not (adapter.exists() or old):
        return
    if not overwrite:
        what = f"an adapter {adapter}" if adapter.exists() else f"checkpoints up to step {old[-1].name}"
        raise CheckpointError(f"{config.name!r} already has {what}; continue it with --resume latest, "
                              "pick another --name, or pass --overwrite to start over")
    shutil.rmtree(checkpoint_folder(config), ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(config: TrainConfig, resume: str) -> Path:
    """'latest' or a path -> an existing, complete checkpoint that fits this run's adapter."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_folder(config))
        if not found:
            raise CheckpointError(f"--resume latest: no checkpoint of {config.name!r} in {checkpoint_folder(config)}; "
                                  "nothing to resume (start without --resume)")
        path = found[-1]
    else:
        path = Path(resume)
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"--resume {resume}: {path} is not a complete sdlora checkpoint (no {STATE_FILE})")
    saved = json.loads(state_path.read_text(encoding="utf-8"))
    saved_lora = TrainConfig.from_dict(saved["config"]).lora
    if saved_lora != config.lora:
        raise CheckpointError(f"checkpoint {path} was trained with {saved_lora}, this run asks for {config.lora}; "
                              "the adapter shapes must match to resume")
    return path


def checkpoint_step(path: Path) -> int:
    return int(json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["step"])
