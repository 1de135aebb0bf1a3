"""The training loop: prepare, encode-and-cache, step, log, preview, checkpoint, save.

`train()` reads top to bottom. It reports only through events and honours a stop flag;
the CLI and the UI decide how to show progress.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler

from sdlora.config import TrainConfig, check_image_size
from sdlora.errors import OutOfMemory, SdloraError, TrainingDiverged
from sdlora.events import (
    EventCallback,
    Failed,
    Finished,
    Preview,
    Saved,
    Started,
    Step,
    StopFlag,
    Throughput,
    Validated,
)
from sdlora.library.formats import Adapter, atomic_write, atomic_write_text, training_metadata, write_adapter
from sdlora.library.formats.names import UNetBlocks
from sdlora.models.families import Family
from sdlora.models.loading import (
    ModelInfo,
    check_quantize_base,
    inspect_pipeline,
    is_quantized,
    load_pipeline,
)
from sdlora.training import checkpoints
from sdlora.training.buckets import bucket_step
from sdlora.training.checkpoint_adapters import (
    VALIDATION_KEY,
    checkpoint_adapter_path,
    keep_best,
)
from sdlora.training.checkpoints import adapter_path, run_folder
from sdlora.training.data import (
    ConceptSet,
    bucket_counts,
    load_concept_images,
    load_regularization_images,
    tag_frequency,
)
from sdlora.training.devices import (
    cpu_only,
    cpu_threads,
    frozen_weight_dtype,
    out_of_memory_advice,
    resolve_mixed_precision,
)
from sdlora.training.encode import EncodedConcepts, encode_concepts, frozen_parts_to, text_encoders_to_dtype
from sdlora.training.estimate import remember_speed
from sdlora.training.lora import add_lora, lora_state_dict, parameter_counts, trainable_parameters
from sdlora.training.metrics import MetricsRow, check_tracker, log_preview, log_step, start_trackers
from sdlora.training.optimizers import check_available, make_optimizer
from sdlora.training.preview import render_previews
from sdlora.training.step import Run, optimizer_step
from sdlora.training.validation import ValidationSet, hold_out, load_validation_folder, validation_loss
from sdlora.training.watch import Watch, steps_per_epoch


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

    `config` is trusted as checked: every door makes it through sdlora.settings.train_config_from,
    which validates once (a queued job is checked again when read back from its file). What only
    the loaded model can say (the native size) and the optimizer's package are checked here.
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


@dataclass(frozen=True)
class Prepared:
    """What a run starts from: devices, the base model and its family, the images read."""

    accelerator: Accelerator
    pipeline: Any
    family: Family
    info: ModelInfo
    concepts: ConceptSet
    regularization: ConceptSet | None

    @property
    def skipped(self) -> tuple[str, ...]:
        """The files left out, with why."""
        problems = self.concepts.problems + (self.regularization.problems if self.regularization else [])
        return tuple(str(p) for p in problems)


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
    check_available(config)
    check_tracker(config)
    check_quantize_base(config.quantize_base)
    resume_path = checkpoints.resolve_resume(config, resume) if resume else None
    prepared = _prepare(config, files, pipeline)
    prepared, held = _validation_images(config, prepared)
    try:
        encoded, encoded_prior = _encode_and_cache(config, prepared)
        run = _build_adapter(config, prepared, encoded, encoded_prior, threads)
        start = _resume(run, resume_path)
        watch = _start_watch(run, held, start)
        emit(_started(run, prepared, start))
        step, loss_value, last_preview = _train_steps(run, prepared, emit, stop, start, watch)
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:  # the family known: its advice
        raise OutOfMemory(out_of_memory_advice(config, prepared.family)) from exc
    return _save(run, prepared, emit, step, loss_value, replaceable, watch, last_preview)


def _prepare(config: TrainConfig, files: list[str] | None, pipeline) -> Prepared:
    """Devices, the seed, the base model (loaded unless given) and the concept and regularisation images."""
    trackers = {"log_with": config.validation.log_with, "project_dir": str(run_folder(config) / "logs")}
    accelerator = Accelerator(
        cpu=cpu_only(),
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        **(trackers if config.validation.log_with else {}),
    )
    set_seed(config.seed)
    if pipeline is None:
        pipeline = load_pipeline(config.base_model, quantize_base=config.quantize_base)
    info = inspect_pipeline(pipeline)
    check_image_size(config.data.resolution, config.data.resolution, info.resolution, "training resolution")
    step_px = bucket_step(pipeline.vae_scale_factor, info.model_family.bucket_latent_step)
    concepts = load_concept_images(config.data, files, bucket_step=step_px)
    regularization = load_regularization_images(config.data, bucket_step=step_px)
    family = info.model_family.trained_with(config)  # refuses settings that mean nothing for it
    return Prepared(accelerator, pipeline, family, info, concepts, regularization)


def _validation_images(config: TrainConfig, prepared: Prepared) -> tuple[Prepared, ValidationSet | None]:
    """The images scored and never trained on (held out of the concept images, or a folder of their own),
    encoded like the rest; the training images are then the concept images less any held out."""
    settings = config.validation
    if not settings.enabled:
        return prepared, None
    if settings.validation_images:
        concepts, images = hold_out(prepared.concepts, settings.validation_images, config.seed)
        prepared = dataclasses.replace(prepared, concepts=concepts)
    else:
        step_px = bucket_step(prepared.pipeline.vae_scale_factor, prepared.family.bucket_latent_step)
        images = load_validation_folder(config.data, settings.validation_folder, step_px).images
    device = prepared.accelerator.device
    encoded = encode_concepts(prepared.pipeline, images, False, device, prepared.family)
    return prepared, ValidationSet(encoded, config.seed)


def _encode_and_cache(
    config: TrainConfig, prepared: Prepared
) -> tuple[EncodedConcepts, EncodedConcepts | None]:
    """Encode once: the VAE (always float32: a half-precision VAE overflows into NaN) and the frozen
    text encoders are not trained, so their outputs are cached; on a GPU they then wait on the CPU.

    The denoiser is not on the device meanwhile (a quantized base, which bitsandbytes loads onto the GPU,
    waits on the CPU), so the peak is the larger of caching and training, never their sum."""
    pipeline, device, family = prepared.pipeline, prepared.accelerator.device, prepared.family
    denoiser = getattr(pipeline, family.denoiser)
    if is_quantized(denoiser):
        denoiser.to(torch.device("cpu"))
    text_encoders_to_dtype(pipeline, prepared.accelerator.mixed_precision)
    encoded = encode_concepts(pipeline, prepared.concepts.images, config.data.flip, device, family)
    encoded_prior = None
    if prepared.regularization:
        images = prepared.regularization.images
        encoded_prior = encode_concepts(pipeline, images, config.data.flip, device, family)
    if device.type != "cpu":
        frozen_parts_to(pipeline, torch.device("cpu"))
    return encoded, encoded_prior


def _denoiser_to_device(prepared: Prepared) -> Any:
    """The denoiser on the device, its frozen weights in the training dtype (a quantized base keeps its own)."""
    accelerator = prepared.accelerator
    denoiser = getattr(prepared.pipeline, prepared.family.denoiser)
    if not is_quantized(denoiser) and denoiser.dtype != frozen_weight_dtype(accelerator):
        denoiser.to(dtype=frozen_weight_dtype(accelerator))
    denoiser.to(accelerator.device)
    return denoiser


def _build_adapter(
    config: TrainConfig,
    prepared: Prepared,
    encoded: EncodedConcepts,
    encoded_prior: EncodedConcepts | None,
    threads: int,
) -> Run:
    """The adapter on the family's denoiser, its optimizer and learning-rate schedule, and the objective."""
    accelerator = prepared.accelerator
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(config.cpu_threads, threads))
    denoiser = _denoiser_to_device(prepared)
    add_lora(denoiser, config.lora, prepared.family.lora_targets, seed=config.seed)
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    optimizer = make_optimizer(config, trainable_parameters(denoiser))
    lr_schedule = get_scheduler(
        "constant_with_warmup" if config.lr_schedule == "constant" else "cosine",
        optimizer=optimizer,
        num_warmup_steps=config.warmup_steps * accelerator.num_processes,
        num_training_steps=config.steps * accelerator.num_processes,
    )
    denoiser, optimizer, lr_schedule = accelerator.prepare(denoiser, optimizer, lr_schedule)
    checkpoints.register_lora_only_hooks(accelerator)
    objective = prepared.family.objective(
        prepared.pipeline.scheduler.config,
        prepared.info.prediction_type,
        min_snr_gamma=config.min_snr_gamma,
        noise_offset=config.noise_offset,
    )
    return Run(config, accelerator, denoiser, optimizer, lr_schedule, objective, encoded, encoded_prior)


def _resume(run: Run, resume_path: Path | None) -> int:
    """The step to start from: 0, or a checkpoint's step after loading its adapter and optimizer state."""
    if resume_path is None:
        return 0
    run.accelerator.load_state(str(resume_path))
    return checkpoints.checkpoint_step(resume_path)


def _start_watch(run: Run, held: ValidationSet | None, start: int) -> Watch:
    """The metrics file and the trackers of this run, and what it validates on."""
    start_trackers(run.accelerator, run.config)
    per_epoch = steps_per_epoch(
        run.encoded,
        run.config.batch_size,
        run.accelerator.num_processes,
        run.config.gradient_accumulation_steps,
    )
    return Watch.start(run.config, held, start, run.accelerator.is_main_process, per_epoch)


def _started(run: Run, prepared: Prepared, start: int) -> Started:
    """The event that opens a run: what it trains, on what, with which images."""
    trainable, total = parameter_counts(run.denoiser)
    concepts, regularization = prepared.concepts, prepared.regularization
    return Started(
        total_steps=run.config.steps,
        start_step=start,
        image_count=len(concepts.images),
        trainable_parameters=trainable,
        total_parameters=total,
        skipped_files=prepared.skipped,
        device=str(run.accelerator.device),
        mixed_precision=run.accelerator.mixed_precision,
        buckets=tuple(f"{bucket}: {count}" for bucket, count in bucket_counts(concepts.images).items()),
        notices=tuple(str(n) for n in concepts.notices + (regularization.notices if regularization else []))
        + tuple(str(n) for n in run.encoded.notices),
    )


def _train_steps(
    run: Run, prepared: Prepared, emit: EventCallback, stop: StopFlag, start: int, watch: Watch
) -> tuple[int, float, Preview | None]:
    """Steps until the last or a stop request: each logged, checkpointed and previewed as configured.
    Returns the step reached, its loss and the last preview rendered (None: none was)."""
    config = run.config
    preview_prompts = _preview_prompts(config, prepared)
    throughput, loss_value, step, preview = Throughput(), float("nan"), start, None
    throughput.tick()
    run.denoiser.train()
    while step < config.steps and not stop.requested:
        loss_value = optimizer_step(run, step)
        if not math.isfinite(loss_value):
            raise _diverged(config, loss_value, step + 1)
        step += 1
        throughput.tick()
        emit(_logged(run, step, loss_value, throughput.seconds_per_step()))
        if _after_step(run, prepared, watch, emit, step, loss_value):
            break  # the validation loss has risen long enough: _save keeps the best checkpoint adapter
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            emit(Saved(step, str(checkpoints.save_checkpoint(run.accelerator, config, step)), "checkpoint"))
        if config.preview_every and step % config.preview_every == 0 and run.accelerator.is_main_process:
            preview = render_previews(
                prepared.pipeline, run.accelerator, run.denoiser, config, preview_prompts, step
            )
            log_preview(run.accelerator, config, preview.images, step)
            emit(preview)
            run.denoiser.train()
    remember_speed(config, str(run.accelerator.device), throughput.seconds_per_step(), step - start)
    return step, loss_value, preview


def _after_step(
    run: Run, prepared: Prepared, watch: Watch, emit: EventCallback, step: int, loss_value: float
) -> bool:
    """The validation loss when due, the step's metrics row, a checkpoint adapter when due; True when
    the validation loss has stayed above its lowest for `stop_when_validation_rises` evaluations."""
    validation = None
    if watch.evaluation_due(step):
        validation = validation_loss(run.denoiser, run.objective, watch.held, run.accelerator.device)
        watch.rises.add(step, validation)
        best = watch.rises
        emit(Validated(step, validation, best.best_step, best.best_loss, best.rises))
    row = MetricsRow(step, loss_value, validation, run.lr_schedule.get_last_lr()[0])
    if watch.metrics is not None:
        watch.metrics.add(row)
    log_step(run.accelerator, run.config, row)
    if watch.adapter_due(step, validation is not None):
        _save_checkpoint_adapter(run, prepared, emit, step, validation)
    return watch.overfitting()


def _save_checkpoint_adapter(
    run: Run, prepared: Prepared, emit: EventCallback, step: int, validation: float | None
) -> None:
    """A library-loadable adapter of this step, with its validation loss in the header."""
    if not run.accelerator.is_main_process:
        return
    path = checkpoint_adapter_path(run.config.output_dir, run.config.name, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {VALIDATION_KEY: repr(validation)} if validation is not None else {}
    _write_adapter(run, prepared, path, None, step, extra)
    emit(Saved(step, str(path), "checkpoint adapter"))


def _preview_prompts(config: TrainConfig, prepared: Prepared) -> tuple[str, ...]:
    """The configured prompts, else a caption the adapter was trained on (with the trigger): the
    previews then show the concept as it was taught, not a bare trigger word the base cannot draw."""
    return config.preview_prompts or (prepared.concepts.images[0].caption,)


def _diverged(config: TrainConfig, loss_value: float, step: int) -> TrainingDiverged:
    """The error for a loss that stopped being a number, pointing at the last good checkpoint."""
    last = checkpoints.list_checkpoints(checkpoints.checkpoint_folder(config))
    error = TrainingDiverged(
        f"loss became {loss_value} at step {step}; training stopped. "
        + (
            f"The last good checkpoint is {last[-1]} (resume with --resume latest and a lower --lr)."
            if last
            else "No checkpoint was saved yet; lower --lr, or use --mixed-precision no/bf16."
        )
    )
    error.step = step
    return error


def _logged(run: Run, step: int, loss_value: float, seconds_per_step: float) -> Step:
    """The progress event of one finished step."""
    return Step(
        step=step,
        total_steps=run.config.steps,
        loss=loss_value,
        learning_rate=run.lr_schedule.get_last_lr()[0],
        seconds_per_step=seconds_per_step,
        eta_seconds=seconds_per_step * (run.config.steps - step),
    )


def _save(
    run: Run,
    prepared: Prepared,
    emit: EventCallback,
    step: int,
    loss_value: float,
    replaceable: tuple | None,
    watch: Watch,
    last_preview: Preview | None = None,
) -> TrainResult:
    """A checkpoint to resume from, and the adapter with its metadata, config and final preview."""
    config, accelerator, skipped = run.config, run.accelerator, prepared.skipped
    if step == 0:  # stopped before the first step: an untrained adapter is all zeros, worth no file
        message = "stopped before the first step; no adapter was saved"
        emit(Finished(step=0, adapter_path="", stopped_early=True, message=message))
        accelerator.end_training()
        return TrainResult(None, None, 0, True, loss_value, skipped, message)
    emit(Saved(step, str(checkpoints.save_checkpoint(accelerator, config, step)), "checkpoint"))
    path, message = checkpoints.free_adapter_path(config, replaceable)
    config_path = path.with_name(path.name.removesuffix(".safetensors") + ".config.json")
    overfitting = watch.overfitting()
    if accelerator.is_main_process:
        _write_adapter(run, prepared, path, config_path, step)
        if (
            watch.saves_adapters
            and not checkpoint_adapter_path(config.output_dir, config.name, step).exists()
        ):
            _save_checkpoint_adapter(run, prepared, emit, step, None)  # every end can be kept again
        if overfitting:
            rises = config.validation.stop_when_validation_rises
            kept = keep_best(config.output_dir, config.name, path, step, rises)
            message = " ".join(filter(None, [kept, message]))
        emit(Saved(step, str(path), "adapter"))
        if config.final_preview and not overfitting:  # the preview would show the last step, not the kept one
            emit(_final_preview(run, prepared, path, step, last_preview))
    accelerator.wait_for_everyone()
    stopped = step < config.steps
    emit(Finished(step=step, adapter_path=str(path), stopped_early=stopped, message=message))
    accelerator.end_training()
    return TrainResult(path, config_path, step, stopped, loss_value, skipped, message)


def _write_adapter(
    run: Run,
    prepared: Prepared,
    path: Path,
    config_path: Path | None,
    step: int,
    extra: dict[str, str] | None = None,
) -> None:
    """The adapter file (kohya format, with kohya's and modelspec's metadata) and the config beside it;
    `extra` adds header keys (a checkpoint adapter's validation loss)."""
    config, regularization = run.config, prepared.regularization
    captions = [c.caption for c in prepared.concepts.images]
    metadata = training_metadata(
        config,
        prepared.info,
        step,
        captions,
        tag_frequency(captions),
        processes=run.accelerator.num_processes,
        regularization_images=len(regularization.images) if regularization else 0,
        denoiser_config=dict(run.accelerator.unwrap_model(run.denoiser).config),
    )
    trained = run.accelerator.unwrap_model(run.denoiser)
    adapter = Adapter.from_peft(lora_state_dict(trained), config.lora.alpha, part=prepared.family.denoiser)
    blocks = UNetBlocks.of(trained.config)
    metadata.update(extra or {})
    write_adapter(path, adapter, "kohya", family=prepared.family.name, blocks=blocks, metadata=metadata)
    if config_path is not None:
        atomic_write_text(config_path, config.to_json() + "\n")


def _final_preview(
    run: Run, prepared: Prepared, path: Path, step: int, last_preview: Preview | None
) -> Preview:
    """The preview of the finished adapter, also saved beside it. A preview rendered at this very step
    shows the same weights with the same prompts and seeds, so it is reused rather than drawn again."""
    config = run.config
    if last_preview is not None and last_preview.step == step:
        preview = last_preview
    else:
        prompts = _preview_prompts(config, prepared)
        preview = render_previews(prepared.pipeline, run.accelerator, run.denoiser, config, prompts, step)
    atomic_write(
        path.with_name(path.name.removesuffix(".safetensors") + ".preview.png"),
        lambda tmp: preview.images[0].save(tmp, format="PNG"),
    )
    return preview
