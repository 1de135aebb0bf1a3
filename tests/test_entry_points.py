"""Every entry point starts the same way: threads that yield, a readable console, no needless imports."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import draw_concept
from safetensors.torch import save_file

from sdlora import runtime

REPO = Path(__file__).resolve().parents[1]
# Runs `python -m sdlora ARGS` as the command line does, then reports what the process had loaded.
ENTRY = """
import os, runpy, sys
sys.argv, code = ["sdlora", *sys.argv[1:]], None
try:
    runpy.run_module("sdlora", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
print(f"exit={code} torch={'torch' in sys.modules} omp={os.environ.get('OMP_WAIT_POLICY')}", file=sys.stderr)
"""
NOISE = (
    "should be kept in float32: []",
    "Already found a `peft_config`",
    "Loading pipeline components",
    "Loading weights",
)


def clean_env(**more: str) -> dict[str, str]:
    """A user's shell: none of our thread settings, offline, this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "TRANSFORMERS_VERBOSITY")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **more)
    return env


def run_entry(*args: str, env: dict[str, str] | None = None, timeout: int = 120):
    return subprocess.run(
        [sys.executable, "-c", ENTRY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or clean_env(),
        cwd=REPO,
    )


def write_kohya_lora(path: Path, rank: int = 2) -> Path:
    """A small kohya-format LoRA file on one attention projection of a UNet."""
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {
        f"{stem}.lora_down.weight": torch.randn(rank, 32) * 0.01,
        f"{stem}.lora_up.weight": torch.randn(32, rank) * 0.01,
        f"{stem}.alpha": torch.tensor(float(rank)),
    }
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank)})
    return path


def test_help_loads_no_torch_and_sets_sleeping_threads():
    result = run_entry("--help")
    assert "train" in result.stdout and "adapters" in result.stdout
    assert "exit=0 torch=False omp=PASSIVE" in result.stderr


def test_adapters_list_reads_headers_without_torch(tmp_path):
    write_kohya_lora(tmp_path / "dots.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    result = run_entry("adapters", "--adapters-dir", str(tmp_path), "list")
    assert result.stdout.startswith("dots\t") and "rank 2" in result.stdout
    assert "damaged: broken.safetensors" in result.stderr
    assert "exit=0 torch=False" in result.stderr


def test_a_refused_option_loads_no_torch():
    result = run_entry("train", "--no-such-option")
    assert "unrecognized arguments: --no-such-option" in result.stderr
    assert "exit=2 torch=False" in result.stderr


def test_a_users_own_thread_setting_wins():
    result = run_entry("--help", env=clean_env(OMP_WAIT_POLICY="ACTIVE"))
    assert "omp=ACTIVE" in result.stderr


def test_app_gets_the_same_threading_before_gradio():
    code = "import os, sys, app; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=clean_env(), cwd=REPO
    )
    assert result.stdout.split() == ["PASSIVE", "False"], result.stderr[-2000:]


def test_empty_float32_notice_is_dropped_and_a_real_one_kept():
    runtime.quiet_library_warnings()
    logger = logging.getLogger(runtime.DIFFUSERS_MODELS_LOGGER)

    def passes(message: str) -> bool:
        return logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, (), None))

    assert not passes("There are modules in UNet2DConditionModel that should be kept in float32: []. Casting")
    assert passes(
        "There are modules in UNet2DConditionModel that should be kept in float32: ['norm']. Casting"
    )
    assert passes("an unrelated diffusers warning")


def test_peft_second_adapter_warning_is_dropped_and_others_kept():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        runtime.quiet_library_warnings()
        warnings.warn(
            "Already found a `peft_config` attribute in the model. This will lead to",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn("something a user should read", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something a user should read"]


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """An adapter trained by `python -m sdlora train` (with its final preview), its console, and a copy
    of it under a second name for the mix."""
    root = tmp_path_factory.mktemp("entry")
    concepts = root / "concepts" / "circles"
    concepts.mkdir(parents=True)
    for i in range(3):
        draw_concept(concepts / f"img{i}.png", i)
    lib = root / "lib"
    result = run_entry(
        *("train", "--base-model", str(tiny_model), "--images", str(concepts), "--output", str(lib)),
        *("--name", "one", "--steps", "2", "--resolution", "32"),
        timeout=300,
    )
    assert "exit=0" in result.stderr, result.stderr[-3000:]
    shutil.copyfile(lib / "one.safetensors", lib / "two.safetensors")
    console = result.stdout + result.stderr
    return SimpleNamespace(root=root, lib=lib, concepts=concepts, model=tiny_model, console=console)


def noise_in(console: str) -> list[str]:
    return [line for line in NOISE if line in console]


def test_cli_training_and_a_mix_print_only_our_lines(trained, tmp_path):
    console = trained.console
    assert f"finished step 2: adapter {trained.lib / 'one'}.safetensors" in console
    assert "speed: " in console and not noise_in(console), console[-3000:]
    common = ("generate", "--base-model", str(trained.model), "--adapters-dir", str(trained.lib))
    drawn = run_entry(
        *common,
        *("--lora", "one:0.5", "--lora", "two:0.5", "--prompt", "sks", "--steps", "2"),
        *("--out", str(tmp_path / "a.png")),
        timeout=300,
    )
    assert "exit=0" in drawn.stderr and not noise_in(drawn.stdout + drawn.stderr), drawn.stderr[-3000:]
    # A real problem still reaches the user, in one line.
    missing = run_entry(*common, "--lora", "three", "--prompt", "sks", "--out", str(tmp_path / "b.png"))
    assert "error: " in missing.stderr and "three" in missing.stderr and "exit=2" in missing.stderr


def test_app_console_has_one_line_per_request_and_job(trained):
    """`python app.py` serving a mix and a training job prints a line for each and no library noise."""
    from gradio_client import Client

    console = trained.root / "console.txt"
    port = free_port()
    with open(console, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port), "--base-model", str(trained.model)]
            + ["--adapters-dir", str(trained.lib), "--allowed-roots", str(trained.root)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            cwd=REPO,
        )
        try:
            client = Client(wait_for_page(f"http://127.0.0.1:{port}/", server), verbose=False)
            client.predict(
                prompt="sks",
                steps=2,
                adapter_1="one",
                weight_1=0.5,
                adapter_2="two",
                weight_2=0.5,
                api_name="/generate",
            )
            job = {"name": "three", "steps": 2, "data": {"images": str(trained.concepts), "resolution": 32}}
            client.predict(config=job, api_name="/train")
            for _ in client.submit(api_name="/progress"):
                pass
        finally:
            server.terminate()
            server.wait(timeout=60)
    text = console.read_text()
    assert not noise_in(text), text[-3000:]
    assert text.count("generated 1 image(s): sks") == 1, text[-3000:]
    assert len(re.findall(r"job \S+ \(three\) done: saved .*three.safetensors at step 2", text)) == 1, text[
        -3000:
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url: str, server: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return url
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"app.py served no page at {url} (exit code {server.poll()})")
