"""What the web app works on, without gradio: one base model, one adapter library, one training queue.

Every method takes and returns engine types. torch, diffusers and the heavy engine modules
are imported inside methods, so building the app stays as fast as importing gradio. What a client
may name or switch is `ui.access.Access`; settings become a TrainConfig on `sdlora.settings`' one
road; the captioner it keeps is `captioning.resident`, the images it draws `generation.saved_images`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

from sdlora.assets import ASSETS, DEMO_MODEL, EXAMPLE_CONCEPTS
from sdlora.captioning.resident import ResidentCaptioner
from sdlora.config import TrainConfig
from sdlora.errors import ConfigError, SdloraError
from sdlora.events import BackgroundRun
from sdlora.generation.saved_images import ImageFolder, SavedImage
from sdlora.jobs.queue import Job, JobQueue, QueueWorker
from sdlora.models.hub import looks_like_path
from sdlora.settings import train_config_from
from sdlora.ui.access import Access
from sdlora.ui.uploads import collect_uploads, is_image, write_captions

log = logging.getLogger(__name__)  # one line per request on the server console


class Studio:
    """The server's state: the app's handlers call its methods and nothing else."""

    def __init__(
        self,
        base_model: str,
        adapters_dir: str | Path,
        concepts_dir: str | Path = EXAMPLE_CONCEPTS,
        work_dir: str | Path | None = None,
        access: Access | None = None,
    ) -> None:
        self.base_model = str(base_model)
        self.adapters_dir = Path(adapters_dir).resolve()
        self.concepts_dir = Path(concepts_dir).resolve()
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="sdlora-app-")).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # A folder the studio made itself (uploads, generated images, exports) goes when the server
        # exits; adapters live in adapters_dir and are never touched. A folder given by the caller stays.
        self.remove_work_dir = (
            weakref.finalize(self, shutil.rmtree, str(self.work_dir), ignore_errors=True)
            if work_dir is None
            else None
        )
        self.access = (access or Access()).with_roots(self.concepts_dir, ASSETS, self.work_dir)
        self.queue = JobQueue(self.adapters_dir)
        self.worker = QueueWorker(self.queue, train=self._train)
        self._library = None
        self._generator = None
        self._batcher = None
        self._model_error = ""
        self._model_lock = threading.Lock()
        self.images = ImageFolder(self.work_dir / "images")
        self.captioning = ResidentCaptioner(lambda: self.base_model)  # loaded on first use and kept

    # -- folders and examples ------------------------------------------------------------------

    @property
    def library(self):
        """The adapter library (sdlora.library.store.AdapterLibrary), opened on first use."""
        if self._library is None:
            from sdlora.library.store import AdapterLibrary

            self.adapters_dir.mkdir(parents=True, exist_ok=True)
            self._library = AdapterLibrary(self.adapters_dir)
            self._library.find_reference = lambda: self.generator().library.reference  # set as it loads
        return self._library

    def example_concepts(self) -> list[str]:
        """Names of the example concept folders shipped with the demo."""
        if not self.concepts_dir.is_dir():
            return []
        return sorted(
            p.name for p in self.concepts_dir.iterdir() if p.is_dir() and any(map(is_image, p.iterdir()))
        )

    def example_files(self, name: str) -> list[Path]:
        """The images and captions of one example concept folder."""
        folder = self.concepts_dir / name
        if name not in self.example_concepts():
            raise ConfigError(
                f"there is no example concept {name!r}; choose one of {self.example_concepts()}"
            )
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))

    def stage_upload(self, files: list[str]) -> list[Path]:
        """Unpack uploaded files into a fresh folder for viewing; returns the images."""
        return collect_uploads(files, Path(tempfile.mkdtemp(prefix="upload-", dir=self.work_dir)))

    def buckets_of(self, images: list[Path], resolution: int | float | None = None) -> list[str]:
        """The bucket each image trains in at the typed `resolution` (else the base model's native size),
        in the family's bucket steps, as training picks it ('' while no model is loaded)."""
        from sdlora.config import DataConfig
        from sdlora.training.buckets import bucket_step
        from sdlora.training.data import bucket_labels

        try:
            generator = self.generator()
            info, scale = generator.model_info, generator.pipeline.vae_scale_factor
        except SdloraError:
            return [""] * len(images)
        side = int(resolution or 0) or info.resolution
        step = bucket_step(scale, info.model_family.bucket_latent_step)
        return bucket_labels(images, DataConfig(resolution=side), step)

    # -- the base model ------------------------------------------------------------------------

    def base_model_problem(self) -> str:
        """Why the base model cannot be used, in words, or '' when it looks usable."""
        source = self.base_model.strip()
        if not source:
            return "no base model is set; enter one in Settings"
        path = Path(source).expanduser()
        if looks_like_path(source) and not path.exists():
            hint = (
                " (the demo model is built with `python -m sdlora.demo.build`)"
                if path.name == DEMO_MODEL.name
                else ""
            )
            return f"the base model {source} does not exist on this server{hint}"
        return ""

    def generator(self):
        """The resident sdlora.generation.generate.Generator, loading the base model on first use."""
        with self._model_lock:
            if self._generator is None:
                from sdlora.errors import ModelLoadError
                from sdlora.generation.generate import Generator

                problem = self.base_model_problem()
                if problem:
                    self._model_error = problem
                    raise ModelLoadError(problem)
                try:
                    generator = Generator(self.base_model, self.library)
                    generator.pipeline  # noqa: B018 - load now, so a bad base model is reported here
                    self._generator, self._model_error = generator, ""
                except SdloraError as exc:
                    self._model_error = str(exc)
                    raise
            return self._generator

    def sampling_defaults(self):
        """(model words, sdlora.models.families.base.SamplingDefaults) for drawing on the base model: the
        loaded model's, else what its folder's configs say (without loading it)."""
        from sdlora.generation.defaults import sampling_defaults_of

        generator = self._generator
        if generator is not None:
            return generator.model_info.model_family.words, generator.sampling_defaults
        family, defaults = sampling_defaults_of(self.base_model)
        return (family.words if family else ""), defaults

    def set_base_model(self, source: str) -> None:
        """Switch to another base model and load it now, so a mistake shows at once."""
        self.access.check_model_switch()
        if looks_like_path(source.strip()):
            self.access.check_folder(source.strip(), "the base model")
        # hostile (issue 24): a failed load keeps the working model, so generation goes on for everyone.
        with self._model_lock:
            kept = self.base_model, self._generator, self._model_error
            self.base_model, self._generator, self._model_error = source.strip(), None, ""
        try:
            self.generator()
        except Exception as exc:
            with self._model_lock:
                self.base_model, self._generator, self._model_error = kept
            if isinstance(exc, SdloraError) and kept[1] is not None:
                raise type(exc)(f"{exc}; the server still uses {kept[0]}") from None
            raise

    def warm_up(self) -> threading.Thread:
        """Import torch and load the base model in the background, so the first image comes quickly."""

        def load() -> None:
            try:
                self.generator()
            except SdloraError:
                pass  # shown in Settings via model_status()

        thread = threading.Thread(target=load, name="sdlora-warm-up", daemon=True)
        thread.start()
        return thread

    def model_status(self) -> dict[str, str]:
        """What is loaded now, for the Settings tab; never loads anything itself."""
        generator = self._generator
        if generator is not None:
            info = generator.model_info
            return {
                "state": "loaded",
                "base_model": self.base_model,
                "family": info.family,
                "resolution": str(info.resolution),
                "prediction": info.prediction_type,
                "device": str(generator.device),
                "precision": _precision(generator),
            }
        problem = self._model_error or self.base_model_problem()
        state = (
            f"not loaded: {problem}"
            if problem
            else ("loading" if self._model_lock.locked() else "not loaded yet")
        )
        return {"state": state, "base_model": self.base_model}

    # -- training ------------------------------------------------------------------------------

    @property
    def run(self) -> BackgroundRun | None:
        """The queue job running in this server now, or the last one it ran."""
        return self.worker.run

    @property
    def run_name(self) -> str:
        return self.worker.job.name if self.worker.job is not None else ""

    def start_queue(self) -> None:
        """Run queued jobs in the background, an interrupted one first (from its last checkpoint)."""
        self.worker.start()

    def train_config(
        self, values: dict[str, Any], source: str = "settings", validate: bool = True
    ) -> TrainConfig:
        """Settings -> the TrainConfig of a run on this server's base model, into its library (sdlora.settings)."""
        return train_config_from(
            {**values, "output_dir": str(self.adapters_dir)},
            base_model=self.base_model,
            native_resolution=lambda: self.generator().model_info.resolution,
            source=source,
            validate=validate,
        )

    def queue_training(
        self, config: TrainConfig, files: list[str], captions: dict[str, str], client: str = ""
    ) -> Job:
        """Queue a training job with its own copy of the images; it starts at once when the queue is idle.

        `client` names who asked (a user or an address), so one client cannot fill the queue.
        """
        from sdlora.config import check_image_size
        from sdlora.training.data import load_regularization_images

        if self.base_model_problem():
            raise ConfigError(f"cannot train: {self.base_model_problem()}")
        if config.data.regularization_images:
            self.access.check_folder(config.data.regularization_images, "the regularisation images folder")
        if config.validation.validation_folder:
            self.access.check_folder(config.validation.validation_folder, "the validation images folder")
        # The same cap as the run's own, checked now rather than after the job waited its turn.
        side, native = config.data.resolution, self.generator().model_info.resolution
        check_image_size(side, side, native, "training resolution")
        load_regularization_images(config.data)  # a wrong folder is reported now, not after the run starts
        staging = Path(tempfile.mkdtemp(prefix="job-", dir=self.work_dir))
        try:
            write_captions(collect_uploads(files, staging), captions)
            job = self.queue.add(
                config.replace(data=dataclasses.replace(config.data, images=str(staging))), client
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.start_queue()
        self.worker.poll()
        return job

    def _train(self, config: TrainConfig, **kwargs):
        # diffusers' lazy imports break when two threads import it at once (a queued job resuming at
        # start-up while the base model loads): the trainer is imported under the model lock.
        with self._model_lock:
            from sdlora.training.loop import train
        return train(config, **kwargs)

    def concept_folder_files(self, folder: str) -> list[str]:
        """The files of a concept folder on the server that a client named (inside the allowed roots)."""
        path = self.access.check_folder(folder, "the concept images folder")
        if not path.is_dir():
            raise ConfigError(f"the concept images folder {folder} does not exist on this server")
        return [str(p) for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]

    def stop_training(self) -> bool:
        """Ask the running job to save and stop after its current step; False when none runs."""
        return self.worker.stop_running()

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a queued job, or stop (and save) the running one."""
        job = self.queue.job(job_id)
        if job.state == "running" and self.worker.job is not None and self.worker.job.id == job.id:
            self.worker.stop_running()
            return job
        return self.queue.cancel(job.id)

    def retry_job(self, job_id: str) -> Job:
        """Queue a failed, cancelled or stopped job again; it starts at once when the queue is idle."""
        job = self.queue.retry(job_id)
        self.start_queue()
        self.worker.poll()
        return job

    def estimate(self, config: TrainConfig, uncaptioned: int = 0):
        """sdlora.training.estimate.Estimate of time (and GPU memory) for a run with this config, counting the time
        "Caption images" takes for the `uncaptioned` images where it can run here (offline, only a
        captioner that is present can)."""
        from sdlora.captioning.captioners import is_present, spec_of
        from sdlora.generation.defaults import sampling_defaults
        from sdlora.models.hub import offline
        from sdlora.training.estimate import captioning_seconds, estimate_training
        from sdlora.training.lora import layer_counts

        generator = self.generator()
        family = generator.model_info.model_family
        denoiser = getattr(generator.pipeline, family.denoiser)  # UNet or transformer
        unet_parameters = sum(p.numel() for p in denoiser.parameters())
        layers = layer_counts(denoiser, config.lora, family.lora_targets)
        device = str(generator.device)
        spec = spec_of(self.captioning.name())
        if offline() and not is_present(spec):
            uncaptioned = 0
        seconds = captioning_seconds(
            uncaptioned, spec.seconds_per_image, device.startswith("cuda"), bool(spec.source)
        )
        return estimate_training(
            config,
            unet_parameters,
            generator.model_info,
            device,
            captioning=(uncaptioned, spec.name, seconds),
            layers=layers,
            passes=sampling_defaults(family, dict(denoiser.config)).passes_per_step,
        )

    # -- generation and the library ------------------------------------------------------------

    def generate(self, config) -> list[SavedImage]:
        """Generate with a sdlora.generation.generate.GenerateConfig; images are saved with their parameters.

        Concurrent calls are drawn together (sdlora.generation.batching), so many users share pipeline calls.
        """
        from sdlora.generation.batching import Batcher

        generator = self.generator()
        with self._model_lock:
            if self._batcher is None or self._batcher.generator is not generator:
                self._batcher = Batcher(generator)
            batcher = self._batcher
        images = [self.images.save(g.image, g.parameters) for g in batcher.generate(config)]
        log.info(
            "generated %d image(s): %s", len(images), images[0].parameters.splitlines()[0] if images else ""
        )
        return images

    def comparison_grid(self, config) -> SavedImage:
        """One grid at the same seeds: one adapter at weights 0, 0.5 and 1, or the base beside each adapter."""
        names = tuple(a.name for a in config.adapters)
        grid = self.generator().comparison_grid(config, adapters=names if len(names) > 1 else ())
        what = f"{names[0]} at weights 0, 0.5, 1" if len(names) == 1 else "base beside " + ", ".join(names)
        seed = f", first seed {config.seed}" if config.seed >= 0 else ""
        return self.images.save(grid, f"comparison grid: {what}; prompt {config.prompt!r}{seed}")

    def forget_adapter(self, name: str) -> None:
        """Drop a renamed, replaced or deleted adapter from the resident model."""
        if self._generator is not None:
            self._generator.forget(name)


def _precision(generator) -> str:
    denoiser = getattr(generator.pipeline, generator.model_info.model_family.denoiser)  # UNet or transformer
    return str(denoiser.dtype).replace("torch.", "")
