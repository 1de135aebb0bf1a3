"""What the web app works on, without gradio: one base model, one adapter library, one training queue.

Every method takes and returns engine types. torch, diffusers and the heavy engine modules
are imported inside methods, so building the app stays as fast as importing gradio.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

from sdlora.config import TrainConfig
from sdlora.errors import ConfigError, SdloraError
from sdlora.events import BackgroundRun
from sdlora.jobs.queue import Job, JobQueue, QueueRow, QueueWorker
from sdlora.ui.uploads import collect_uploads, is_image, write_captions

log = logging.getLogger(__name__)  # one line per request on the server console

ASSETS = (
    Path(__file__).resolve().parents[2] / "assets"
)  # the demo model, its concepts and regularisation images


@dataclass(frozen=True)
class Access:
    """What a client of this server may do beyond its own uploads: read folders under `roots`, switch the model.

    A client names folders (regularisation images, a concept folder, a base model) on the server's
    disk; outside the roots they are refused before anything reads them, so an error never lists
    a server folder's files.
    """

    roots: tuple[Path, ...] = ()  # besides the studio's own: its concepts folder, assets/ and work folder
    model_switch: bool = True  # False on a shared server: the one resident model is everyone's

    def check_folder(self, path: str, what: str) -> Path:
        """The resolved path when it lies under a root; ConfigError in one line otherwise."""
        resolved = Path(path).expanduser().resolve()
        if not any(resolved.is_relative_to(root) for root in self.roots):
            raise ConfigError(
                f"{what} {path} is outside the folders this server lets clients read "
                f"({', '.join(map(str, self.roots))}); the server's --allowed-roots adds more"
            )
        return resolved


@dataclass(frozen=True)
class SavedImage:
    """A generated image on disk, with the parameters that made it."""

    path: Path
    parameters: str


class Studio:
    """The server's state: the app's handlers call its methods and nothing else."""

    def __init__(
        self,
        base_model: str,
        adapters_dir: str | Path,
        concepts_dir: str | Path = "assets/concepts",
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
        access = access or Access()
        roots = dict.fromkeys((self.concepts_dir, ASSETS, self.work_dir, *access.roots))
        self.access = Access(tuple(Path(r).expanduser().resolve() for r in roots), access.model_switch)
        self.queue = JobQueue(self.adapters_dir)
        self.worker = QueueWorker(self.queue, train=self._train)
        self._library = None
        self._generator = None
        self._batcher = None
        self._model_error = ""
        self._model_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._image_count = 0
        self._captioner = None  # loaded on the first "Caption images" and kept, like the base model
        self._captioner_lock = threading.Lock()

    # -- folders and examples ------------------------------------------------------------------

    @property
    def library(self):
        """The adapter library (sdlora.library.store.AdapterLibrary), opened on first use."""
        if self._library is None:
            from sdlora.library.store import AdapterLibrary

            self.adapters_dir.mkdir(parents=True, exist_ok=True)
            self._library = AdapterLibrary(self.adapters_dir)
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

    def buckets_of(self, images: list[Path]) -> list[str]:
        """The bucket each image trains in at the base model's native size ('' while no model is loaded)."""
        from sdlora.config import DataConfig
        from sdlora.training.buckets import bucket_step
        from sdlora.training.data import bucket_labels

        try:
            generator = self.generator()
            info, scale = generator.model_info, generator.pipeline.vae_scale_factor
        except SdloraError:
            return [""] * len(images)
        return bucket_labels(images, DataConfig(resolution=info.resolution), bucket_step(scale))

    def captioner_name(self) -> str:
        """The captioner "Caption images" uses: the demo one for the demo model, else the first one present."""
        from sdlora.captioning.captioners import default_captioner

        return default_captioner(self.base_model)

    def caption_images(self, images: list[Path], captions: dict[str, str], options=None, on_caption=None):
        """sdlora.captioning.captions.CaptionResult for staged images, honouring the captions typed so far (by file name).

        The default captioner of the base model does the work; nothing is written to disk,
        since the caption table is what trains.
        """
        from sdlora.captioning.captioners import load_captioner
        from sdlora.captioning.captions import CaptionOptions, caption_images

        name = self.captioner_name()
        with self._captioner_lock:
            if self._captioner is None or self._captioner.name != name:
                self._captioner = load_captioner(name)
            captioner = self._captioner
        existing = {Path(p): captions.get(Path(p).name, "") for p in images}
        return caption_images(
            captioner, list(existing), options or CaptionOptions(), existing=existing, on_caption=on_caption
        )

    # -- the base model ------------------------------------------------------------------------

    def base_model_problem(self) -> str:
        """Why the base model cannot be used, in words, or '' when it looks usable."""
        source = self.base_model.strip()
        if not source:
            return "no base model is set; enter one in Settings"
        path = Path(source).expanduser()
        if _looks_local(source) and not path.exists():
            hint = (
                " (the demo model is built with `python -m sdlora.demo.build`)"
                if path.name == "demo-model"
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

    def set_base_model(self, source: str) -> None:
        """Switch to another base model and load it now, so a mistake shows at once."""
        if not self.access.model_switch:
            raise ConfigError(
                "this server is shared, so its base model is a server setting (--base-model): "
                "switching it here would change it for everyone"
            )
        if _looks_local(source.strip()):
            self.access.check_folder(source.strip(), "the base model")
        with self._model_lock:
            self.base_model, self._generator, self._model_error = source.strip(), None, ""
        self.generator()

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

    def start_training(self, config: TrainConfig, files: list[str], captions: dict[str, str]) -> Job:
        """Queue a training job with its own copy of the images; it starts at once when the queue is idle."""
        from sdlora.training.data import load_regularization_images

        if self.base_model_problem():
            raise ConfigError(f"cannot train: {self.base_model_problem()}")
        config = self._resolved(config)
        config.validate()
        if config.data.regularization_images:
            self.access.check_folder(config.data.regularization_images, "the regularisation images folder")
        load_regularization_images(config.data)  # a wrong folder is reported now, not after the run starts
        staging = Path(tempfile.mkdtemp(prefix="job-", dir=self.work_dir))
        try:
            write_captions(collect_uploads(files, staging), captions)
            job = self.queue.add(config.replace(data=_replace(config.data, images=str(staging))))
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

    def queue_rows(self) -> list[QueueRow]:
        """Every job of the queue, in order, with position, state and ETA."""
        return self.queue.rows()

    def queue_busy(self) -> bool:
        """Whether a job is queued or running."""
        return self.queue.pending()

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a queued job, or stop (and save) the running one."""
        job = self.queue.job(job_id)
        if job.state == "running" and self.worker.job is not None and self.worker.job.id == job.id:
            self.worker.stop_running()
            return job
        return self.queue.cancel(job.id)

    def move_job(self, job_id: str, offset: int) -> Job:
        """Move a queued job up (negative offset) or down the queue."""
        return self.queue.move(job_id, offset)

    def retry_job(self, job_id: str) -> Job:
        """Queue a failed, cancelled or stopped job again; it starts at once when the queue is idle."""
        job = self.queue.retry(job_id)
        self.start_queue()
        self.worker.poll()
        return job

    def estimate(self, config: TrainConfig, uncaptioned: int = 0):
        """sdlora.training.presets.Estimate of time (and GPU memory) for a run with this config, counting the time
        "Caption images" takes for the `uncaptioned` images where it can run here (offline, only a
        captioner that is present can)."""
        from sdlora.captioning.captioners import is_present, spec_of
        from sdlora.models.hub import offline
        from sdlora.training.presets import captioning_seconds, estimate_training

        generator = self.generator()
        unet_parameters = sum(p.numel() for p in generator.pipeline.unet.parameters())
        device = str(generator.device)
        spec = spec_of(self.captioner_name())
        if offline() and not is_present(spec):
            uncaptioned = 0
        seconds = captioning_seconds(
            uncaptioned, spec.seconds_per_image, device.startswith("cuda"), bool(spec.source)
        )
        return estimate_training(
            self._resolved(config),
            unet_parameters,
            generator.model_info,
            device,
            captioning=(uncaptioned, spec.name, seconds),
        )

    def _resolved(self, config: TrainConfig) -> TrainConfig:
        """The config on this server's base model and library; resolution 0 becomes the model's native one."""
        config = config.replace(base_model=self.base_model, output_dir=str(self.adapters_dir))
        if config.data.resolution == 0:
            native = self.generator().model_info.resolution
            config = config.replace(data=_replace(config.data, resolution=native))
        return config

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
        images = [self._save(g.image, g.parameters) for g in batcher.generate(config)]
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
        return self._save(grid, f"comparison grid: {what}; prompt {config.prompt!r}{seed}")

    def forget_adapter(self, name: str) -> None:
        """Drop a renamed, replaced or deleted adapter from the resident model."""
        if self._generator is not None:
            self._generator.forget(name)

    def _save(self, image, parameters: str) -> SavedImage:
        from PIL.PngImagePlugin import PngInfo

        folder = self.work_dir / "images"
        folder.mkdir(parents=True, exist_ok=True)
        with self._run_lock:
            self._image_count += 1
            path = folder / f"{self._image_count:05d}.png"
        info = PngInfo()
        info.add_text("parameters", parameters)
        image.save(path, pnginfo=info)
        return SavedImage(path, parameters)


def _looks_local(source: str) -> bool:
    """A path rather than a hub id: "org/name" is a hub id, unless its first part is a local folder."""
    return source.startswith((".", "/", "~")) or source.count("/") != 1 or Path(source.split("/")[0]).is_dir()


def _replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _precision(generator) -> str:
    return str(generator.pipeline.unet.dtype).replace("torch.", "")
