"""Where and how a run computes: CPU threads, processes, mixed precision, and what to change when
memory runs out."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from sdlora.config import TrainConfig
from sdlora.models.families import Family


def out_of_memory_advice(config: TrainConfig, family: Family | None = None) -> str:
    """What to change, in order of how little it costs the result; for the diffusion transformers (SD3.5,
    Flux.1), whose frozen weights are most of their memory, a quantized base first."""
    hints = []
    if family is not None and family.estimate_variants and config.quantize_base != "nf4":
        hints.append(
            "--quantize-base nf4 (the frozen base in 4 bits: about a third of its bf16 memory)"
            if config.quantize_base == "none"
            else "--quantize-base nf4 (4-bit weights: about half of int8's)"
        )
    if config.batch_size > 1:
        hints.append(
            f"--batch-size 1 --gradient-accumulation-steps {config.batch_size} (same effective batch)"
        )
    if not config.gradient_checkpointing:
        hints.append("--gradient-checkpointing (about a third of the activation memory, ~20% slower)")
    if config.mixed_precision in ("auto", "no") and torch.cuda.is_available():
        hints.append("--mixed-precision fp16 or bf16")
    if config.optimizer == "adamw":
        hints.append("--optimizer adamw8bit or adafactor (smaller optimizer state)")
    if config.data.resolution > 512:
        hints.append(
            f"--resolution {config.data.resolution * 3 // 4 // 64 * 64} (now {config.data.resolution})"
        )
    if config.lora.rank > 16:
        hints.append(f"--rank 16 (now {config.lora.rank})")
    advice = "; ".join(hints) or "a smaller base model or a machine with more memory"
    return f"out of memory while training {config.name!r}. Try: {advice}. Checkpoints already saved are kept."


def cpu_threads(requested: int, available: int) -> int:
    """Threads for CPU training: the requested count, else the caller's (torch's default: every core).

    On an idle machine more threads won for every UNet measured, the tiny test models and the
    demo model included (bench/train_speed.py); only when other work holds the cores do extra
    OpenMP threads spin and lose, and then the user (or OMP_NUM_THREADS) says so.
    """
    return requested or available


def cpu_only() -> bool:
    """Without CUDA, say so to accelerate: only then does torchrun/accelerate launch use gloo across processes."""
    return not torch.cuda.is_available()


def resolve_mixed_precision(requested: str) -> str:
    """'auto' -> bf16 or fp16 on a GPU, 'no' on a CPU; half precision on a CPU falls back to 'no'."""
    if not torch.cuda.is_available():
        # Measured on this project's CPUs: bf16 ran 4x slower and fp16 is silently ignored.
        return "no"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


def frozen_weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """Frozen denoiser weights can sit in half precision; the adapter itself always trains in float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
