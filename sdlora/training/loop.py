"""The training loop: prepare, encode-and-cache, step, log, preview, checkpoint, save.

`train()` reads top to bottom. It reports only through events and honours a stop flag;
the CLI and the UI decide how to show progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr

from sdlora.config import TrainConfig, check_image_size
from sdlora.errors import ConfigError, OutOfMemory, SdloraError, TrainingDiverged
from sdlora.events import EventCallback, Failed, Finished, Saved, Started, Step, StopFlag, Throughput
from sdlora.library.formats import Adapter, atomic_write, atomic_write_text, training_metadata, write_adapter
from sdlora.library.formats.names import UNetBlocks
from sdlora.models.loading import inspect_pipeline, load_pipeline
from sdlora.training import checkpoints
from sdlora.training.buckets import bucket_step
from sdlora.training.checkpoints import adapter_path
from sdlora.training.data import bucket_counts, load_concept_images, load_regularization_images, tag_frequency
from sdlora.training.encode import Batch, EncodedConcepts, encode_concepts, frozen_parts_to
from sdlora.training.lora import add_lora, lora_state_dict, parameter_counts, trainable_parameters
from sdlora.training.optimizers import check_available, make_optimizer
from sdlora.training.preview import render_previews


@dataclass(frozen=True)
class TrainResult:
    adapter_path: Path | None  # None when stopped before the first step: nothing was saved
    config_path: Path | None
    steps: int
    stopped_early: bool
    final_loss: float
    skipped_files: tuple[str, ...]
    message: str = ""  # as Finished.message


def train(
    config: TrainConfig,
    *,
    on_event: EventCallback | None = None,
    stop: StopFlag | None = None,
    resume: str | None = None,
    files: list[str] | None = None,
    pipeline=None,
    overwrite: bool = False,
) -> TrainResult:
    """Train one adapter; `resume` is a checkpoint folder or 'latest'. Raises SdloraError on bad input.

    A fresh run refuses a name that already has an adapter or checkpoints in the output
    folder unless `overwrite` (then the old checkpoints go; the old adapter is replaced at
    the end). `pipeline` may pass in an already loaded base model (it is then trained in
    place and keeps the adapter attached); by default `config.base_model` is loaded.
    """
    emit = on_event or (lambda event: None)
    threads = torch.get_num_threads()
    try:
        if not resume:
            checkpoints.claim_name(config, overwrite)
        # What may be replaced at the end: the adapter there now (an earlier state of this run, or one
        # --overwrite gave up). A file that appears or changes meanwhile (an import) is someone else's.
        replaceable = checkpoints.file_identity(adapter_path(config))
        return _train(config, emit, stop or StopFlag(), resume, files, pipeline, threads, replaceable)
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        error = OutOfMemory(out_of_memory_advice(config))
        emit(Failed(step=0, message=str(error)))
        raise error from exc
    except SdloraError as exc:
        emit(Failed(step=getattr(exc, "step", 0), message=str(exc)))
        raise
    finally:
        torch.set_num_threads(threads)


def out_of_memory_advice(config: TrainConfig) -> str:
    """What to change, in order of how little it costs the result."""
    hints = []
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


def _train(
    config: TrainConfig,
    emit: EventCallback,
    stop: StopFlag,
    resume: str | None,
    files: list[str] | None,
    pipeline,
    threads: int,
    replaceable: tuple | None = None,
) -> TrainResult:
    # 1. Prepare: settings, devices, base model, concept images.
    config.validate()
    check_available(config)
    resume_path = checkpoints.resolve_resume(config, resume) if resume else None
    accelerator = Accelerator(
        cpu=cpu_only(),
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
    )
    set_seed(config.seed)
    pipeline = pipeline if pipeline is not None else load_pipeline(config.base_model)
    info = inspect_pipeline(pipeline)
    check_image_size(config.data.resolution, config.data.resolution, info.resolution, "training resolution")
    step_px = bucket_step(pipeline.vae_scale_factor)
    concepts = load_concept_images(config.data, files, bucket_step=step_px)
    regularization = load_regularization_images(config.data, bucket_step=step_px)
    skipped = tuple(str(p) for p in concepts.problems + (regularization.problems if regularization else []))

    # 2. Encode once: the VAE (always float32: a half-precision VAE overflows into NaN)
    #    and the frozen text encoder are not trained, so their outputs are cached.
    encoded = encode_concepts(pipeline, concepts.images, config.data.flip, accelerator.device)
    encoded_prior = (
        encode_concepts(pipeline, regularization.images, config.data.flip, accelerator.device)
        if regularization
        else None
    )

    if accelerator.device.type == "cuda":
        frozen_parts_to(pipeline, torch.device("cpu"))

    # 3. Adapter, optimizer, schedule.
    unet = pipeline.unet
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(config.cpu_threads, threads))
    if unet.dtype != frozen_weight_dtype(accelerator):
        unet.to(dtype=frozen_weight_dtype(accelerator))
    unet.to(accelerator.device)
    add_lora(unet, config.lora, seed=config.seed)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable, total = parameter_counts(unet)
    optimizer = make_optimizer(config, trainable_parameters(unet))
    lr_schedule = get_scheduler(
        "constant_with_warmup" if config.lr_schedule == "constant" else "cosine",
        optimizer=optimizer,
        num_warmup_steps=config.warmup_steps * accelerator.num_processes,
        num_training_steps=config.steps * accelerator.num_processes,
    )
    unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)
    checkpoints.register_lora_only_hooks(accelerator)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)

    start = 0
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        start = checkpoints.checkpoint_step(resume_path)
    emit(
        Started(
            total_steps=config.steps,
            start_step=start,
            image_count=len(concepts.images),
            trainable_parameters=trainable,
            total_parameters=total,
            skipped_files=skipped,
            device=str(accelerator.device),
            mixed_precision=accelerator.mixed_precision,
            buckets=tuple(f"{bucket}: {count}" for bucket, count in bucket_counts(concepts.images).items()),
            notices=tuple(
                str(n) for n in concepts.notices + (regularization.notices if regularization else [])
            ),
        )
    )

    # 4. The loop.
    # Default preview: a caption the adapter was trained on (with the trigger), so the previews
    # show the concept as it was taught rather than a bare trigger word the base cannot draw.
    preview_prompts = config.preview_prompts or (concepts.images[0].caption,)
    throughput, loss_value, step = Throughput(), float("nan"), start
    throughput.tick()
    unet.train()
    while step < config.steps and not stop.requested:
        loss_value = _optimizer_step(
            config,
            accelerator,
            unet,
            optimizer,
            lr_schedule,
            noise_scheduler,
            encoded,
            encoded_prior,
            info.prediction_type,
            step,
        )
        if not math.isfinite(loss_value):
            last = checkpoints.list_checkpoints(checkpoints.checkpoint_folder(config))
            error = TrainingDiverged(
                f"loss became {loss_value} at step {step + 1}; training stopped. "
                + (
                    f"The last good checkpoint is {last[-1]} (resume with --resume latest and a lower --lr)."
                    if last
                    else "No checkpoint was saved yet; lower --lr, or use --mixed-precision no/bf16."
                )
            )
            error.step = step + 1
            raise error
        step += 1
        throughput.tick()
        sps = throughput.seconds_per_step()
        emit(
            Step(
                step=step,
                total_steps=config.steps,
                loss=loss_value,
                learning_rate=lr_schedule.get_last_lr()[0],
                seconds_per_step=sps,
                eta_seconds=sps * (config.steps - step),
            )
        )
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            emit(Saved(step, str(checkpoints.save_checkpoint(accelerator, config, step)), "checkpoint"))
        if config.preview_every and step % config.preview_every == 0 and accelerator.is_main_process:
            emit(render_previews(pipeline, accelerator, unet, config, preview_prompts, step))
            unet.train()

    # 5. Save: a checkpoint to resume from, and the adapter with its metadata and config.
    if step == 0:  # stopped before the first step: an untrained adapter is all zeros, worth no file
        message = "stopped before the first step; no adapter was saved"
        emit(Finished(step=0, adapter_path="", stopped_early=True, message=message))
        accelerator.end_training()
        return TrainResult(None, None, 0, True, loss_value, skipped, message)
    emit(Saved(step, str(checkpoints.save_checkpoint(accelerator, config, step)), "checkpoint"))
    path, message = checkpoints.free_adapter_path(config, replaceable)
    config_path = path.with_name(path.name.removesuffix(".safetensors") + ".config.json")
    if accelerator.is_main_process:
        captions = [c.caption for c in concepts.images]
        metadata = training_metadata(
            config,
            info,
            step,
            captions,
            tag_frequency(captions),
            processes=accelerator.num_processes,
            regularization_images=len(regularization.images) if regularization else 0,
        )
        trained = accelerator.unwrap_model(unet)
        adapter = Adapter.from_peft(lora_state_dict(trained), config.lora.alpha)
        write_adapter(
            path,
            adapter,
            "kohya",
            family=info.family,
            blocks=UNetBlocks.of(trained.config),
            metadata=metadata,
        )
        atomic_write_text(config_path, config.to_json() + "\n")
        emit(Saved(step, str(path), "adapter"))
        if config.final_preview:
            preview = render_previews(pipeline, accelerator, unet, config, preview_prompts, step)
            atomic_write(
                path.with_name(path.name.removesuffix(".safetensors") + ".preview.png"),
                lambda tmp: preview.images[0].save(tmp, format="PNG"),
            )
            emit(preview)
    accelerator.wait_for_everyone()
    stopped = step < config.steps
    emit(Finished(step=step, adapter_path=str(path), stopped_early=stopped, message=message))
    accelerator.end_training()
    return TrainResult(path, config_path, step, stopped, loss_value, skipped, message)


def _optimizer_step(
    config: TrainConfig,
    accelerator: Accelerator,
    unet,
    optimizer,
    lr_schedule,
    noise_scheduler,
    encoded: EncodedConcepts,
    encoded_prior: EncodedConcepts | None,
    prediction_type: str,
    step: int,
) -> float:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the mean loss.

    With regularisation images, each micro-batch also holds as many of them as concept
    images (DreamBooth's prior preservation), weighted by `prior_loss_weight`.
    """
    losses = []
    for micro in range(config.gradient_accumulation_steps):
        # Noise, timesteps and image order are a pure function of (seed, step, process):
        # a resumed run draws exactly what an uninterrupted one would.
        generator = torch.Generator().manual_seed(
            ((config.seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + accelerator.process_index
        )
        index = encoded.batch_indices(
            config.seed,
            step * config.gradient_accumulation_steps + micro,
            config.batch_size,
            accelerator.process_index,
            accelerator.num_processes,
        )
        batch = encoded.batch(index, accelerator.device)
        prior = None
        if encoded_prior is not None:
            prior_index = encoded_prior.batch_indices(
                config.seed + 1,
                step * config.gradient_accumulation_steps + micro,
                config.batch_size,
                accelerator.process_index,
                accelerator.num_processes,
            )
            prior = encoded_prior.batch(prior_index, accelerator.device)
        with accelerator.accumulate(unet):
            loss = batch_loss(config, unet, noise_scheduler, batch, prior, generator, prediction_type)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable_parameters(unet), config.max_grad_norm)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
    return sum(losses) / len(losses)


def batch_loss(
    config: TrainConfig,
    unet,
    noise_scheduler,
    batch: Batch,
    prior: Batch | None,
    generator: torch.Generator,
    prediction_type: str,
) -> torch.Tensor:
    """The concept batch's loss plus the weighted loss of its regularisation rows: one UNet call when
    both are the same size, two when their buckets differ (the sum is the same)."""

    def loss_of(rows: Batch, prior_samples: int = 0) -> torch.Tensor:
        return diffusion_loss(
            unet,
            noise_scheduler,
            rows.latents,
            rows.embeddings,
            generator,
            prediction_type,
            config.min_snr_gamma,
            config.noise_offset,
            prior_samples,
            config.prior_loss_weight,
            added_cond_kwargs=rows.added_cond_kwargs(),
        )

    if prior is None:
        return loss_of(batch)
    if batch.fits(prior):
        return loss_of(batch.cat(prior), prior_samples=len(prior.latents))
    return loss_of(batch) + config.prior_loss_weight * loss_of(prior)


def diffusion_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    generator: torch.Generator,
    prediction_type: str,
    min_snr_gamma: float = 0.0,
    noise_offset: float = 0.0,
    prior_samples: int = 0,
    prior_loss_weight: float = 1.0,
    added_cond_kwargs: dict | None = None,
) -> torch.Tensor:
    """MSE between the UNet's prediction and the epsilon or v target, optionally Min-SNR weighted.

    The last `prior_samples` rows are regularisation images: their mean loss is added with
    weight `prior_loss_weight` to the mean loss of the others. SDXL's pooled embedding and size
    conditioning come in `added_cond_kwargs`.
    """
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((batch, latents.shape[1], 1, 1), generator=generator).to(
            noise
        )
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator
    ).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    elif prediction_type == "epsilon":
        target = noise
    else:
        raise ConfigError(f"prediction type {prediction_type!r} is not supported (epsilon or v_prediction)")
    extra = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs is not None else {}
    prediction = unet(noisy, timesteps, encoder_hidden_states=embeddings, **extra).sample
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        per_sample = per_sample * weight
    if prior_samples:
        concept, prior = per_sample[:-prior_samples], per_sample[-prior_samples:]
        return concept.mean() + prior_loss_weight * prior.mean()
    return per_sample.mean()


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
    """Frozen UNet weights can sit in half precision; the adapter itself always trains in float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
