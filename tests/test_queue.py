"""The training queue on disk: jobs run in order by one worker, a bad job fails in one line and the queue goes
on, the CLI drives the same file as a running server, and a server killed mid-job resumes it from its checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli
from tiny_models import IMAGE_SIZE

from sdlora.config import DataConfig, LoraSpec, TrainConfig
from sdlora.errors import ConfigError
from sdlora.jobs.queue import JobQueue, QueueWorker
from sdlora.library.formats import read_metadata
from sdlora.training.checkpoints import checkpoint_folder, list_checkpoints

REPO = Path(__file__).resolve().parents[1]


def job_config(tiny_model, images, out, name, steps=4, **changes) -> TrainConfig:
    return TrainConfig(
        base_model=str(tiny_model),
        output_dir=str(out),
        name=name,
        steps=steps,
        learning_rate=1e-3,
        seed=7,
        final_preview=False,
        data=DataConfig(images=str(images), trigger_word="sks", resolution=IMAGE_SIZE),
        lora=LoraSpec(rank=4, alpha=4.0),
        **changes,
    )


def wait_until(condition, timeout: float = 240, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_jobs_run_in_order_from_their_own_copies_and_a_bad_job_fails_in_one_line(
    tiny_model, concept_dir, tmp_path
):
    out = tmp_path / "lib"
    queue = JobQueue(out)
    a, taken, gone, d = (
        queue.add(job_config(tiny_model, concept_dir, out, n)) for n in ("a", "taken", "gone", "d")
    )
    with pytest.raises(ConfigError, match="job 1 in the queue already trains an adapter named 'a'"):
        queue.add(job_config(tiny_model, concept_dir, out, "a"))
    shutil.rmtree(concept_dir)  # the jobs train from their own copies
    (out / "taken.safetensors").write_bytes(b"made elsewhere after the job was queued")
    shutil.rmtree(gone.images)
    worker = QueueWorker(queue, poll_seconds=0.1).start()
    wait_until(lambda: not queue.pending(), what="the queue to drain")

    jobs = {job.name: job for job in queue.jobs()}
    assert [jobs[n].state for n in ("a", "taken", "gone", "d")] == ["done", "failed", "failed", "done"]
    assert "'taken' already has an adapter" in jobs["taken"].message and "\n" not in jobs["taken"].message
    assert jobs["gone"].message == f"job {gone.id} (gone): its images folder {gone.images} is gone"
    assert jobs["a"].finished <= jobs["taken"].started <= jobs["gone"].started <= jobs["d"].started
    assert read_metadata(out / "a.safetensors")["ss_steps"] == "4" and (out / "d.safetensors").is_file()
    assert worker.run.wait(10) and not Path(a.images).exists()  # a done job's copy of its images goes
    assert [row.position for row in queue.rows()] == [0, 0, 0, 0]


def test_cli_adds_lists_reorders_and_cancels_in_the_same_file(tiny_model, concept_dir, tmp_path, capsys):
    out = tmp_path / "lib"
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(
        f'base_model = "{tiny_model}"\noutput_dir = "{out}"\nsteps = 30\n'
        f'[data]\nimages = "{concept_dir}"\nresolution = {IMAGE_SIZE}\n'
    )
    for name in ("first", "second"):
        code, printed, err = cli(
            capsys, "queue", "add", "--config", str(run_toml), "--name", name, "--rank", "2"
        )
        assert code == 0, err
    assert printed == "queued job 2: second\n"
    code, _, err = cli(capsys, "queue", "add", "--config", str(run_toml), "--name", "first")
    assert code == 2 and err.count("\n") == 1 and "already trains an adapter named 'first'" in err
    JobQueue(out).move("2", -1)  # what the page's Up button does, seen by the CLI
    code, printed, _ = cli(capsys, "queue", "list", "--adapters-dir", str(out))
    assert [line.split("\t")[:4] for line in printed.splitlines()] == [
        ["2", "1", "second", "queued"],
        ["1", "2", "first", "queued"],
    ]
    assert cli(capsys, "queue", "cancel", "1", "--adapters-dir", str(out))[1] == "job 1 (first): cancelled\n"
    job = JobQueue(out).job("1")
    assert job.state == "cancelled" and job.train_config().lora.rank == 2 and job.train_config().steps == 30
    assert job.train_config().checkpoint_every == 3  # a job without checkpoints gets ten, to resume from
    code, _, err = cli(capsys, "queue", "cancel", "1", "--adapters-dir", str(out))
    assert code == 2 and "job 1 (first) is cancelled" in err


def start_server(tiny_model, out: Path, log: Path) -> subprocess.Popen:
    from app_server import free_port

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [
            sys.executable,
            "app.py",
            "--base-model",
            str(tiny_model),
            "--adapters-dir",
            str(out),
            "--port",
            str(free_port()),
        ],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    wait_until(
        lambda: "sdlora is running on" in log.read_text() or server.poll() is not None, what="the server"
    )
    assert server.poll() is None, log.read_text()[-3000:]
    return server


def test_server_killed_during_a_job_resumes_it_from_its_checkpoint_after_a_restart(
    tiny_model, concept_dir, tmp_path, capsys
):
    out = tmp_path / "lib"
    queue = JobQueue(out)
    server = start_server(tiny_model, out, tmp_path / "server-1.log")
    try:
        base = [
            "--base-model",
            str(tiny_model),
            "--images",
            str(concept_dir),
            "--output",
            str(out),
            "--trigger",
            "sks",
            "--resolution",
            str(IMAGE_SIZE),
            "--rank",
            "4",
            "--alpha",
            "4",
            "--no-final-preview",
        ]
        for name, steps in (("one", "4"), ("two", "60"), ("three", "4")):  # picked up by the running server
            assert (
                cli(
                    capsys, "queue", "add", *base, "--name", name, "--steps", steps, "--checkpoint-every", "3"
                )[0]
                == 0
            )
        two = queue.job("2")
        wait_until(
            lambda: list_checkpoints(checkpoint_folder(two.train_config())), what="job 2's first checkpoint"
        )
        server.send_signal(signal.SIGKILL)
        server.wait(30)
    finally:
        server.kill()
    killed = {job.name: job for job in queue.jobs()}
    assert [killed[n].state for n in ("one", "two", "three")] == ["done", "running", "queued"], killed
    assert not (out / "two.safetensors").exists()
    checkpoint = list_checkpoints(checkpoint_folder(two.train_config()))[-1]

    server = start_server(tiny_model, out, tmp_path / "server-2.log")
    try:
        wait_until(lambda: not queue.pending(), what="the restarted server to finish the queue")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    jobs = {job.name: job for job in queue.jobs()}
    assert [jobs[n].state for n in ("one", "two", "three")] == ["done", "done", "done"]
    assert jobs["two"].resumed_from >= int(checkpoint.name.removeprefix("step-")) >= 3
    assert f"(resumed at step {jobs['two'].resumed_from})" in jobs["two"].message
    assert jobs["two"].finished <= jobs["three"].started
    for name, steps in (("one", "4"), ("two", "60"), ("three", "4")):
        assert read_metadata(out / f"{name}.safetensors")["ss_steps"] == steps  # whole, readable adapters
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "one.safetensors",
        "three.safetensors",
        "two.safetensors",
    ]
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers  # no half-written adapter, config or queue file
