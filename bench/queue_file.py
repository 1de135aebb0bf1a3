"""The training queue's file with 100 ended jobs: its size, and what reading it costs a page.

    python bench/queue_file.py [--before REV] [--no-write]

Every open page asks for the queue's rows each second, so the file's size and parse time are
paid once a second per page. Measured for the code here and for the code at REV (default: the
commit before the queue kept its file small), each in its own process on its own queue: 99
ended jobs are written as history, then one more job is queued, run and ended through the queue's
own verbs, as the server does. Two kinds of job: ordinary settings, and the longest preview
prompts the settings now accept (16 of 3,000 characters; before, there was no limit). Writes its
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "12aede2"  # main before issue 24's round two
JOBS = 100
READS = 30


def measure(preview_prompts: int, prompt_chars: int) -> dict:
    """In this process's sdlora: build the history, then time a page's reads of the rows."""
    from PIL import Image

    from sdlora.config import DataConfig, TrainConfig
    from sdlora.jobs.queue import Job, JobQueue

    root = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    images = root / "concept"
    images.mkdir()
    Image.new("RGB", (8, 8), "red").save(images / "img0.png")
    prompts = tuple((f"{i} " + "p" * prompt_chars)[:prompt_chars] for i in range(preview_prompts))
    config = TrainConfig(
        base_model=str(root / "model"), data=DataConfig(images=str(images)), preview_prompts=prompts
    )
    queue = JobQueue(root / "library")
    queue.folder.mkdir(parents=True)
    history = [
        Job(
            id=str(i),
            name=f"job-{i}",
            config=config.replace(name=f"job-{i}").to_dict(),
            images=str(queue.folder / str(i) / "images"),
            state="done",
            message=f"saved job-{i}.safetensors at step 1000",
            created=i,
            started=i,
            finished=i + 0.5,
            step=1000,
            total_steps=1000,
            trained=True,
        )
        for i in range(1, JOBS)
    ]
    queue._write({"next_id": JOBS, "jobs": history})
    job = queue.add(config.replace(name="last"))
    queue.claim_next()
    queue.end(job.id, "done", "saved last.safetensors at step 1000")
    page = JobQueue(queue.adapters_dir)
    warm, cold = [], []
    for _ in range(READS):
        start = time.perf_counter()
        page.rows()  # the same page, a second later, the file unchanged
        warm.append(time.perf_counter() - start)
        start = time.perf_counter()
        JobQueue(queue.adapters_dir).rows()  # the first read after a change
        cold.append(time.perf_counter() - start)
    return {
        "bytes": queue.path.stat().st_size,
        "kept": len(page.jobs()),
        "warm_ms": statistics.median(warm) * 1000,
        "cold_ms": statistics.median(cold) * 1000,
    }


def code_at(rev: str) -> Path:
    """The repository's files at `rev`, unpacked into a temporary folder."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="bench-queue-code-"))
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def measured_in(code: Path, kind: tuple[int, int]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", *map(str, kind)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=code).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--before", default=BEFORE, help="the revision to compare with (default: %(default)s)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--measure", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    sys.path.insert(0, str(REPO))
    from bench.report import machine, write_section
    from sdlora.jobs import queue

    kinds = {"ordinary settings": (0, 0), "16 preview prompts of 3,000 characters": (16, 3000)}
    trees = {f"before ({args.before})": code_at(args.before), "after": REPO}
    rows = []
    for kind, shape in kinds.items():
        for label, code in trees.items():
            m = measured_in(code, shape)
            rows.append(
                f"| {kind} | {label} | {m['kept']} | {m['bytes'] / 1e3:,.0f} | {m['cold_ms']:.1f} "
                f"| {m['warm_ms']:.2f} |"
            )
            print(rows[-1], flush=True)
    fields = {f.name for f in dataclasses.fields(queue.Job)}
    assert "client" in fields  # the after-rows were measured on this tree's queue
    text = "\n".join(
        [
            "## The training queue's file (`python bench/queue_file.py`)",
            "",
            f"{machine()}; {JOBS} ended jobs, medians of {READS} reads of the rows (what each open page asks "
            "for every second).",
            "",
            "| jobs | code | jobs kept in the file | size, kB | read after a change, ms | read of an unchanged "
            "file, ms |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"After: the newest {queue.HISTORY_KEPT} ended jobs are kept (older ones go, with their image "
            "copies); an unchanged file is not parsed again (its inode, size and time are compared); the file "
            "is written only when a change changes it; a running job reads it each "
            f"{queue.STOP_CHECK_SECONDS:g} s for a stop request but writes its step only every "
            f"{queue.PROGRESS_WRITE_SECONDS:g} s, without fsync (before: a rewrite with fsync every second).",
        ]
    )
    print(text)
    if not args.no_write:
        print(f"written to {write_section('queue_file', text)}")


if __name__ == "__main__":
    main()
