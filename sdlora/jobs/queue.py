"""The training queue: jobs on disk next to the adapters, run one at a time, in order, by one worker.

The queue is one JSON file, `<adapters>/.queue/queue.json`, replaced atomically under an flock,
so the web server and `python -m sdlora queue ...` in another process read and change the same
jobs. Each job keeps its own copy of its concept images (`.queue/<id>/images`): a later upload
or edit cannot change a queued job. Only one worker per queue runs jobs (it holds
`.queue/worker.lock` while it lives); a job it finds "running" when it starts was interrupted,
and continues from its last checkpoint. No torch or gradio at import: the app builds without them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.config import TrainConfig
from sdlora.errors import ConceptImagesError, ConfigError, SdloraError
from sdlora.events import BackgroundRun, Event, EventCallback, Finished, Started, Step, StopFlag
from sdlora.library.formats.files import TEMP_FILE, atomic_write_text
from sdlora.training.data import CAPTION_EXTENSION, IMAGE_EXTENSIONS

log = logging.getLogger(__name__)  # one line per job on a server console

QUEUE_FOLDER = ".queue"
STATES = ("queued", "running", "done", "failed", "cancelled", "stopped")
PENDING = ("queued", "running")
RETRYABLE = ("failed", "cancelled", "stopped")
CHECKPOINTS_PER_JOB = 10  # a job that asks for no checkpoints gets this many, so a killed server loses little
STOP_CHECK_SECONDS = 1.0  # how often a running job reads the file for a stop request from another process
# How often a running job writes its step and speed: only the queue table's ETA reads them, and each
# write makes every open page re-read the file, so they are written now and then, without fsync
# (a crash loses at most this much of the shown step; the checkpoints hold the real progress).
PROGRESS_WRITE_SECONDS = 10.0
# The file every open page reads each second stays small: at most this many ended jobs are kept (the
# newest), and a client can line up only so many jobs, each holding its own copy of its images.
HISTORY_KEPT = 20
MAX_PENDING_JOBS = 20
MAX_PENDING_PER_CLIENT = 5


@dataclass(frozen=True)
class Job:
    """One training job: its settings, its own images, and where it stands."""

    id: str
    name: str
    config: dict  # TrainConfig.to_dict(), its data.images pointing at the job's own copy
    images: str  # the job's copy of its concept images, under the queue folder
    state: str = "queued"
    message: str = ""  # one line: why it failed, or what it saved
    created: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    step: int = 0
    total_steps: int = 0
    seconds_per_step: float = 0.0
    trained: bool = False  # it got as far as training once: its checkpoints are its own, to resume from
    resumed_from: int = 0  # the checkpoint step the last run continued from (0: started fresh)
    stop_requested: bool = False  # set by `queue cancel` on a running job in another process
    client: str = ""  # who queued it (a user name or an address; '' from the command line), for the caps

    def train_config(self) -> TrainConfig:
        """The job's settings, read back strictly and checked: the queue file may have been edited since."""
        config = TrainConfig.from_dict(self.config, source=f"queued job {self.id}")
        config.validate()
        return config


@dataclass(frozen=True)
class QueueRow:
    """A job as the queue's table shows it."""

    id: str
    position: int  # 1 for the running job (or the next to run), 0 for jobs that have ended
    name: str
    state: str
    eta_seconds: float | None  # seconds until it ends; None when unknown or ended
    message: str


class JobQueue:
    """The queue file of one adapter library; every change is a locked read-modify-replace."""

    def __init__(self, adapters_dir: str | Path) -> None:
        self.adapters_dir = Path(adapters_dir).resolve()
        self.folder = self.adapters_dir / QUEUE_FOLDER
        self.path = self.folder / "queue.json"
        self._cache: tuple[tuple, dict] | None = (
            None  # (the file's identity, its state): unchanged, not re-parsed
        )

    # -- reading and writing ---------------------------------------------------------------------

    def jobs(self) -> list[Job]:
        """All jobs in queue order (ended ones stay, as history)."""
        return self._read()["jobs"]

    def job(self, job_id: str) -> Job:
        for job in self.jobs():
            if job.id == str(job_id).strip():
                return job
        raise ConfigError(f"there is no job {job_id!r} in the queue {self.path}")

    def _read(self) -> dict:
        # Every open page asks for the rows each second: a file that has not changed is not parsed again.
        try:
            stat = self.path.stat()
            identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            cached = self._cache
            if cached is not None and cached[0] == identity:
                return {"next_id": cached[1]["next_id"], "jobs": list(cached[1]["jobs"])}
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"next_id": 1, "jobs": []}
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"the queue file {self.path} cannot be read: {exc}") from None
        state = {"next_id": raw["next_id"], "jobs": [Job(**job) for job in raw["jobs"]]}
        self._cache = (identity, state)
        return {"next_id": state["next_id"], "jobs": list(state["jobs"])}

    @contextmanager
    def _changing(self, durable: bool = True) -> Iterator[dict]:
        """Hold the lock, hand out the current state, write it back atomically if the block changed it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "queue.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self._read()
                before = (state["next_id"], list(state["jobs"]))
                yield state
                if (state["next_id"], state["jobs"]) != before:
                    self._write(state, durable)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, state: dict, durable: bool = True) -> None:
        text = json.dumps(
            {"next_id": state["next_id"], "jobs": [dataclasses.asdict(j) for j in state["jobs"]]}, indent=1
        )
        atomic_write_text(self.path, text + "\n", durable)

    def _update(self, job_id: str, durable: bool = True, **changes) -> Job:
        with self._changing(durable) as state:
            index = _index(state["jobs"], job_id, self.path)
            state["jobs"][index] = job = dataclasses.replace(state["jobs"][index], **changes)
        return job

    # -- what users do ---------------------------------------------------------------------------

    def add(self, config: TrainConfig, client: str = "") -> Job:
        """Queue a job on a checked config (sdlora.settings.train_config_from) within the caps: copy its
        images in, put it last."""
        # A job may run in another process with another working folder: local paths are made absolute.
        config = config.replace(
            output_dir=str(self.adapters_dir),
            base_model=_absolute(config.base_model),
            data=dataclasses.replace(
                config.data, regularization_images=_absolute(config.data.regularization_images)
            ),
        )
        if config.checkpoint_every == 0:
            config = config.replace(checkpoint_every=max(1, config.steps // CHECKPOINTS_PER_JOB))
        source = Path(config.data.images)
        if not source.is_dir():
            raise ConceptImagesError(f"the concept images folder {source} does not exist")
        with self._changing() as state:
            self._refuse_taken_name(config.name, state["jobs"])
            _refuse_over_cap(state["jobs"], client)
            job_id = str(state["next_id"])
            images = self.folder / job_id / "images"
            shutil.rmtree(images.parent, ignore_errors=True)
            _copy_images(source, images)
            config = config.replace(data=dataclasses.replace(config.data, images=str(images)))
            job = Job(
                id=job_id,
                name=config.name,
                config=config.to_dict(),
                images=str(images),
                created=time.time(),
                total_steps=config.steps,
                client=client,
            )
            state["next_id"] += 1
            state["jobs"].append(job)
            forgotten = _trim_history(state["jobs"])
        for old in forgotten:
            shutil.rmtree(Path(old.images).parent, ignore_errors=True)
        return job

    def reserved_names(self) -> set[str]:
        """Names of the adapters that queued and running jobs will write: taken from the moment they are queued."""
        return {job.name for job in self.jobs() if job.state in PENDING}

    def _refuse_taken_name(self, name: str, jobs: list[Job]) -> None:
        if (self.adapters_dir / f"{name}.safetensors").exists():
            raise ConfigError(
                f"an adapter named {name!r} is already in the library {self.adapters_dir}; "
                "choose another name, or delete or rename the old one"
            )
        for other in jobs:
            if other.name == name and other.state in PENDING:
                raise ConfigError(
                    f"job {other.id} in the queue already trains an adapter named {name!r}; "
                    "choose another name"
                )

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled and never runs; a running one is asked to stop and save."""
        job = self.job(job_id)
        if job.state == "queued":
            return self._update(
                job.id, state="cancelled", message="cancelled before it started", finished=time.time()
            )
        if job.state == "running":
            return self._update(job.id, stop_requested=True)
        raise ConfigError(
            f"job {job.id} ({job.name}) is {job.state}; only queued or running jobs can be cancelled"
        )

    def move(self, job_id: str, offset: int) -> Job:
        """Move a queued job past `offset` other queued jobs (negative: towards the front)."""
        with self._changing() as state:
            jobs = state["jobs"]
            index = _index(jobs, job_id, self.path)
            if jobs[index].state != "queued":
                raise ConfigError(
                    f"job {jobs[index].id} is {jobs[index].state}; only queued jobs can be moved"
                )
            queued = [i for i, j in enumerate(jobs) if j.state == "queued"]
            target = queued[max(0, min(len(queued) - 1, queued.index(index) + offset))]
            jobs.insert(target, jobs.pop(index))
            return jobs[target]

    def retry(self, job_id: str) -> Job:
        """Queue a failed, cancelled or stopped job again, last; it continues from its checkpoint if it has one."""
        with self._changing() as state:
            jobs = state["jobs"]
            index = _index(jobs, job_id, self.path)
            job = jobs[index]
            if job.state not in RETRYABLE:
                raise ConfigError(
                    f"job {job.id} ({job.name}) is {job.state}; only failed, cancelled or stopped "
                    "jobs can be retried"
                )
            for other in jobs:
                if other.name == job.name and other.state in PENDING:
                    raise ConfigError(f"job {other.id} already trains {job.name!r}; retry after it ends")
            jobs.pop(index)
            job = dataclasses.replace(
                job, state="queued", message="", started=0.0, finished=0.0, stop_requested=False
            )
            jobs.append(job)
        return job

    def pending(self) -> bool:
        """Whether any job is queued or running."""
        return any(job.state in PENDING for job in self.jobs())

    def rows(self, now: float | None = None) -> list[QueueRow]:
        """Every job with its position and ETA; queued jobs are timed at the latest measured speed."""
        jobs = self.jobs()
        speeds = [j.seconds_per_step for j in sorted(jobs, key=lambda j: j.started) if j.seconds_per_step]
        speed = speeds[-1] if speeds else 0.0
        ahead: float | None = 0.0
        position, rows = 0, []
        for job in sorted(jobs, key=lambda j: j.state != "running"):  # the running job is first in line
            eta = None
            if job.state in PENDING:
                position += 1
                pace = job.seconds_per_step or speed
                ahead = ahead + (job.total_steps - job.step) * pace if ahead is not None and pace else None
                eta = ahead
            rows.append(
                QueueRow(
                    job.id, position if job.state in PENDING else 0, job.name, job.state, eta, job.message
                )
            )
        return rows

    # -- what the worker does --------------------------------------------------------------------

    def clear_leftovers(self) -> None:
        """Remove temp files of a queue write cut short by a killed process (the queue file itself is whole)."""
        with self._changing():
            for tmp in self.folder.glob(".queue.json.*.tmp"):
                if TEMP_FILE.match(tmp.name):
                    tmp.unlink(missing_ok=True)

    def claim_next(self) -> Job | None:
        """The job to run now, marked running: an interrupted one first, else the first queued one."""
        with self._changing() as state:
            jobs = state["jobs"]
            waiting = [i for i, j in enumerate(jobs) if j.state == "running"] or [
                i for i, j in enumerate(jobs) if j.state == "queued"
            ]
            if not waiting:
                return None
            index = waiting[0]
            jobs[index] = dataclasses.replace(
                jobs[index], state="running", started=jobs[index].started or time.time()
            )
            return jobs[index]

    def end(self, job_id: str, job_state: str, message: str) -> Job:
        """Record how a job ended; a finished job's image copy goes (a stopped or failed one may be retried)."""
        with self._changing() as state:
            index = _index(state["jobs"], job_id, self.path)
            state["jobs"][index] = job = dataclasses.replace(
                state["jobs"][index],
                state=job_state,
                message=message,
                finished=time.time(),
                stop_requested=False,
            )
            forgotten = _trim_history(state["jobs"])
        log.info("job %s (%s) %s: %s", job.id, job.name, job_state, message)
        for old in ([job] if job_state == "done" else []) + forgotten:
            shutil.rmtree(Path(old.images).parent, ignore_errors=True)
        return job


class QueueWorker:
    """Runs the queue's jobs one at a time in a BackgroundRun, re-reading the file when idle."""

    def __init__(
        self, queue: JobQueue, poll_seconds: float = 1.0, train: Callable[..., object] | None = None
    ) -> None:
        self.queue = queue
        self.poll_seconds = poll_seconds
        self.run: BackgroundRun | None = None
        self.job: Job | None = None
        self._train = train
        self._lock = threading.Lock()
        self._worker_lock = None
        self._thread: threading.Thread | None = None

    def start(self) -> QueueWorker:
        """Start the polling thread, if this process can own the queue (one worker per queue folder)."""
        with self._lock:
            if self._thread is not None or not self._own_queue():
                return self
            self._thread = threading.Thread(target=self._loop, name="sdlora-queue", daemon=True)
            self._thread.start()
        return self

    def _own_queue(self) -> bool:
        self.queue.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.queue.folder / "worker.lock", "a")  # noqa: SIM115 - held for the worker's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False  # another server runs this queue; it picks up what is added here
        self._worker_lock = handle
        self.queue.clear_leftovers()
        return True

    @property
    def owns_queue(self) -> bool:
        return self._worker_lock is not None

    def _loop(self) -> None:
        while True:
            try:
                self.poll()
            except SdloraError:
                pass  # a broken queue file is reported to whoever reads it; keep polling
            run = self.run
            if run is not None and run.running:
                run.wait(self.poll_seconds)  # the next job starts as soon as this one ends
            else:
                time.sleep(self.poll_seconds)

    def poll(self) -> None:
        """If no job runs here, start the next one."""
        if not self.owns_queue:
            return
        with self._lock:
            if self.run is not None and self.run.running:
                return
            job = self.queue.claim_next()
            if job is None:
                return
            self.job = job
            self.run = BackgroundRun(lambda on_event, stop: self._run_job(job, on_event, stop)).start()

    def stop_running(self) -> bool:
        """Ask the running job to save and stop after its current step; False when none runs."""
        run = self.run
        if run is None or not run.running:
            return False
        run.stop.request()
        return True

    def _run_job(self, job: Job, on_event: EventCallback, stop: StopFlag):
        try:
            result = self._train_job(job, on_event, stop)
        except SdloraError as exc:
            self.queue.end(job.id, "failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        except BaseException as exc:
            self.queue.end(job.id, "failed", f"{type(exc).__name__}: {exc}".splitlines()[0])
            raise
        how = "stopped" if result.stopped_early else "done"
        resumed = self.queue.job(job.id).resumed_from
        self.queue.end(
            job.id,
            how,
            f"saved {result.adapter_path} at step {result.steps}"
            + (f" (resumed at step {resumed})" if resumed else ""),
        )
        return result

    def _train_job(self, job: Job, on_event: EventCallback, stop: StopFlag):
        from sdlora.training.checkpoints import checkpoint_folder, list_checkpoints

        train = self._train
        if train is None:
            from sdlora.training.loop import train
        config = job.train_config()
        if not Path(job.images).is_dir():
            raise ConceptImagesError(f"job {job.id} ({job.name}): its images folder {job.images} is gone")
        resume = "latest" if job.trained and list_checkpoints(checkpoint_folder(config)) else None
        progress = _ProgressWriter(self.queue, job, stop)

        def record(event: Event) -> None:
            on_event(event)
            progress(event)

        return train(config, on_event=record, stop=stop, resume=resume)


@dataclass
class _ProgressWriter:
    """Reads a stop request from the file each second; writes the running job's step and speed now and then."""

    queue: JobQueue
    job: Job
    stop: StopFlag
    _checked: float = field(default=0.0)
    _written: float = field(default=0.0)

    def __call__(self, event: Event) -> None:
        if isinstance(event, Started):
            self._written = time.monotonic()
            self.queue._update(
                self.job.id, trained=True, resumed_from=event.start_step, step=event.start_step
            )
        elif isinstance(event, Step) and time.monotonic() - self._checked >= STOP_CHECK_SECONDS:
            self._checked = now = time.monotonic()
            if now - self._written >= PROGRESS_WRITE_SECONDS:
                self._written = now
                changes = {"step": event.step, "seconds_per_step": event.seconds_per_step}
                job = self.queue._update(self.job.id, durable=False, **changes)
            else:
                job = self.queue.job(self.job.id)  # a read: unchanged files are not even parsed
            if job.stop_requested:
                self.stop.request()
        elif isinstance(event, Finished):
            self.queue._update(self.job.id, step=event.step)


def _index(jobs: list[Job], job_id: str, path: Path) -> int:
    for i, job in enumerate(jobs):
        if job.id == str(job_id).strip():
            return i
    raise ConfigError(f"there is no job {job_id!r} in the queue {path}")


def _refuse_over_cap(jobs: list[Job], client: str) -> None:
    pending = [job for job in jobs if job.state in PENDING]
    if len(pending) >= MAX_PENDING_JOBS:
        raise ConfigError(
            f"the queue already holds {len(pending)} jobs, its most; add this one when one has ended"
        )
    mine = [job for job in pending if job.client == client]
    if client and len(mine) >= MAX_PENDING_PER_CLIENT:
        raise ConfigError(
            f"you already have {len(mine)} jobs queued or running, the most one user may; "
            "add this one when one of them has ended"
        )


def _trim_history(jobs: list[Job]) -> list[Job]:
    """Drop all but the newest HISTORY_KEPT ended jobs from the list (in place); returns the dropped ones."""
    ended = sorted((j for j in jobs if j.state not in PENDING), key=lambda j: j.finished, reverse=True)
    dropped = ended[HISTORY_KEPT:]
    for job in dropped:
        jobs.remove(job)
    return dropped


def _absolute(path: str) -> str:
    """A local file or folder as an absolute path; anything else (a hub id, '') unchanged."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def _copy_images(source: Path, target: Path) -> None:
    """Copy the folder's images and captions (not sub-folders or hidden files) into the job."""
    target.mkdir(parents=True)
    copied = 0
    for path in sorted(source.iterdir()):
        suffix = path.suffix.lower()
        if (
            path.is_file()
            and not path.name.startswith(".")
            and (suffix in IMAGE_EXTENSIONS or suffix == CAPTION_EXTENSION)
        ):
            shutil.copyfile(path, target / path.name)
            copied += suffix in IMAGE_EXTENSIONS
    if not copied:
        shutil.rmtree(target.parent, ignore_errors=True)
        raise ConceptImagesError(f"the concept images folder {source} holds no images")
