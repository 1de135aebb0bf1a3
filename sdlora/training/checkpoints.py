"""Resumable checkpoints: LoRA weights, optimizer, schedule and RNG, saved through accelerate.

Only the adapter's tensors are written (not the multi-GB frozen UNet), and a checkpoint
directory appears under its final name only when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from sdlora.config import TrainConfig
from sdlora.errors import CheckpointError

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
    from safetensors.torch import load_file, save_file

    from sdlora.training.lora import (  # peft: only a training run needs it
        load_lora_state_dict,
        lora_state_dict,
    )

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


def partial_folder(folder: Path, step: int) -> Path:
    """Where step-N is written before it is complete (a kill leaves it; remove_stale_partials clears it)."""
    return folder / f".{PREFIX}{step:06d}.partial"


def remove_stale_partials(runs: Path, max_age_s: float) -> list[Path]:
    """Delete checkpoints that a killed run left half-written under <library>/.runs, if older than max_age_s."""
    runs, removed = Path(runs), []
    if not runs.is_dir():
        return removed
    cutoff = time.time() - max_age_s
    for path in runs.glob(f"*/checkpoints/.{PREFIX}*.partial"):
        try:
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path)
                removed.append(path)
        except OSError:
            continue
    return removed


def save_checkpoint(accelerator, config: TrainConfig, step: int) -> Path:
    """Write step-N atomically (all processes take part) and prune old ones; returns its path."""
    folder = checkpoint_folder(config)
    final = folder / f"{PREFIX}{step:06d}"
    partial = partial_folder(folder, step)
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


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a file, or None: tells whether it was replaced or rewritten since."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def free_adapter_path(config: TrainConfig, replaceable: tuple | None) -> tuple[Path, str]:
    """Where the finished adapter goes, and a one-line notice when that is not <name>.safetensors:
    a file that took the name during the run (an import) is never overwritten."""
    path = adapter_path(config)
    if file_identity(path) == replaceable:
        return path, ""
    n = 2
    while any(
        path.with_name(f"{config.name}-{n}{suffix}").exists()
        for suffix in (".safetensors", ".config.json", ".preview.png")
    ):
        n += 1
    free = path.with_name(f"{config.name}-{n}.safetensors")
    return free, (
        f"another adapter took the name {config.name!r} during the run and was kept; "
        f"this run's adapter is saved as {free.name}"
    )


def claim_name(config: TrainConfig, overwrite: bool) -> None:
    """Before a fresh run: refuse to mix with an earlier run of the same name, or clear it when asked."""
    adapter = adapter_path(config)
    old = list_checkpoints(checkpoint_folder(config))
    if not (adapter.exists() or old):
        return
    if not overwrite:
        what = f"an adapter {adapter}" if adapter.exists() else f"checkpoints up to step {old[-1].name}"
        raise CheckpointError(
            f"{config.name!r} already has {what}; continue it with --resume latest, "
            "pick another --name, or pass --overwrite to start over"
        )
    shutil.rmtree(checkpoint_folder(config), ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve_resume(config: TrainConfig, resume: str) -> Path:
    """'latest' or a path -> an existing, complete checkpoint that fits this run's adapter."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_folder(config))
        if not found:
            raise CheckpointError(
                f"--resume latest: no checkpoint of {config.name!r} in {checkpoint_folder(config)}; "
                "nothing to resume (start without --resume)"
            )
        path = found[-1]
    else:
        path = Path(resume)
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(
            f"--resume {resume}: {path} is not a complete sdlora checkpoint (no {STATE_FILE})"
        )
    saved = json.loads(state_path.read_text(encoding="utf-8"))
    changed = changed_settings(TrainConfig.from_dict(saved["config"], source=str(state_path)), config)
    if changed:
        why = (
            "the adapter shapes must match to resume"
            if any(c.startswith("lora.") for c in changed)
            else ("a resumed run must train as the checkpoint did")
        )
        raise CheckpointError(
            f"--resume: {path.name} of {config.name!r} was trained with other settings: "
            f"{_short(', '.join(changed))}; {why} (only steps and the checkpoint, preview and "
            "thread settings may change)"
        )
    return path


# What may differ on resume: how long to go on and what to save or show along the way, and how the
# machine runs it; everything else decides the adapter's weights.
RESUMABLE_CHANGES = (
    "steps",
    "output_dir",
    "checkpoint_every",
    "checkpoints_to_keep",
    "preview_every",
    "preview_prompts",
    "preview_seeds",
    "preview_inference_steps",
    "final_preview",
    "cpu_threads",
    "gradient_checkpointing",
    # scoring a folder, how often, what to save and where to log leave the trained weights as they are
    # (holding concept images out does not: validation_images changes what trains)
    "validation.validation_folder",
    "validation.validation_every",
    "validation.stop_when_validation_rises",
    "validation.adapter_every",
    "validation.adapter_every_epochs",
    "validation.log_with",
)


def changed_settings(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """'name old -> new' for every setting of `wanted` that differs from `saved` and may not change on resume."""
    old, new = _flat(saved.to_dict()), _flat(wanted.to_dict())
    changed = [key for key in new if key not in RESUMABLE_CHANGES and old.get(key) != new[key]]
    # Values are shown where short (a learning rate, a seed); a changed folder is named only.
    return [
        f"{key} {old.get(key)!r} -> {new[key]!r}"
        if len(repr(old.get(key)) + repr(new[key])) <= 30
        else f"{key} (changed)"
        for key in changed
    ]


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def _short(text: str, limit: int = 140) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def checkpoint_step(path: Path) -> int:
    return int(json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["step"])
