"""The CLI and the app training side by side on a loaded CPU: `python bench/train_speed.py --entry-points`.

Each entry point runs in its own process, started as a user starts it (`python -m sdlora train`,
and `app.py` running a job queued by `python -m sdlora queue add`), with the same settings, while
a second process keeps every core busy with torch matrix products (another user's job). The
speed is the training loop's own seconds per step over its last steps, as both report it.
A third row runs the CLI with OMP_WAIT_POLICY=ACTIVE, the threading it had before every entry
point shared sdlora.runtime (only app.py set PASSIVE then).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import machine, write_section
from sdlora.jobs.queue import JobQueue

REPO = Path(__file__).resolve().parents[1]
BUSY = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"
ENDED = ("done", "failed", "cancelled", "stopped")
LIMIT_S = 900  # a run still going after this is reported as such (spinning threads can take that long)


def child_env(**settings: str) -> dict[str, str]:
    """The environment a user's shell would give: no thread settings of ours, offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(REPO), **settings)
    return env


def job_flags(base_model: str, images: str, steps: int, name: str) -> list[str]:
    return [
        *("--base-model", base_model, "--images", images, "--trigger", "sks", "--name", name),
        *("--steps", str(steps), "--no-final-preview"),
    ]


def cli_speed(flags: list[str], out: str, env: dict[str, str]) -> float:
    """Seconds per step of `python -m sdlora train`, from its closing speed line."""
    done = subprocess.run(
        [sys.executable, "-m", "sdlora", "train", *flags, "--output", out],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=LIMIT_S,
    )
    found = re.search(r"speed: ([0-9.]+) s/step", done.stdout + done.stderr)
    if not found:
        raise RuntimeError(f"the CLI printed no speed line:\n{done.stdout[-2000:]}")
    return float(found.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_speed(flags: list[str], adapters: str, env: dict[str, str]) -> float:
    """Seconds per step of a job that `app.py` runs from its queue, as the job's record keeps it."""
    app = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(free_port()), "--adapters-dir", adapters],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        subprocess.run(
            [sys.executable, "-m", "sdlora", "queue", "add", *flags, "--output", adapters],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + LIMIT_S
        while True:
            if app.poll() is not None:
                raise RuntimeError(f"app.py exited with {app.returncode}")
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("app.py", LIMIT_S)
            job = JobQueue(adapters).jobs()[-1]
            if job.state in ENDED:
                break
            time.sleep(1)
        if job.state != "done":
            raise RuntimeError(f"the app's job ended {job.state}: {job.message}")
        return job.seconds_per_step
    finally:
        app.terminate()
        app.wait(timeout=60)


def main(base_model: str, images: str, steps: int, write: bool = True) -> None:
    """Three runs under one busy process; writes the `train_speed_entry` section."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` ends the busy process
    busy = subprocess.Popen([sys.executable, "-c", BUSY], env=child_env())
    rows = []
    try:
        time.sleep(3)  # let the busy process reach its loop
        with tempfile.TemporaryDirectory() as tmp:
            runs = (
                ("CLI: `python -m sdlora train`", "cli", {}),
                ("app: `app.py` running a queued job", "app", {}),
                (
                    "CLI with OMP_WAIT_POLICY=ACTIVE (before: only app.py slept idle threads)",
                    "cli",
                    {"OMP_WAIT_POLICY": "ACTIVE"},
                ),
            )
            for i, (label, entry, settings) in enumerate(runs):
                flags = job_flags(base_model, images, steps, f"speed{i}")
                env = child_env(**settings)
                folder = str(Path(tmp) / f"lib{i}")
                try:
                    speed = cli_speed if entry == "cli" else app_speed
                    shown = f"{speed(flags, folder, env):.3f}"
                except subprocess.TimeoutExpired:
                    shown = f"not finished within {LIMIT_S} s"
                rows.append(f"| {label} | {shown} |")
                print(rows[-1], flush=True)
    finally:
        busy.kill()
        busy.wait()
    text = "\n".join(
        [
            "## The CLI and the app side by side on a loaded CPU (`python bench/train_speed.py --entry-points`)",
            "",
            f"{machine()}; base model `{Path(base_model).name}`, demo preset, {steps} steps, one run each, "
            "in this order, while a second process multiplies 1024x1024 matrices on every core. Seconds per "
            "step are the loop's own, over its last steps, as the CLI's closing line and the queue's job "
            f"record report them; a run not finished within {LIMIT_S} s took over {LIMIT_S // steps} s per "
            "step, start-up included.",
            "",
            "| entry point | seconds per step |",
            "| --- | --- |",
            *rows,
            "",
            "Every entry point calls `sdlora.runtime.prepare()` before torch loads: idle OpenMP threads sleep "
            "(OMP_WAIT_POLICY=PASSIVE) instead of spinning against the other process.",
        ]
    )
    print(text)
    if write:
        print(f"written to {write_section('train_speed_entry', text)}")
