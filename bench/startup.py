"""How fast sdlora comes up: the web app to its first page and first image, and the CLI's quick commands.

Beside the app, in the same run, the time of a bare `python -c "import gradio"`: the app's goal is
to be ready within 3 s of that. Beside the CLI, a bare `python -c pass`: `python -m sdlora --help`
should answer within 1 s and `adapters list` within 2 s (neither needs torch). Figures go into
docs/benchmarks.md between the startup and startup_cli markers (the rest of the file is left alone).

    python bench/startup.py [--base-model assets/demo-model] [--runs 3] [--only app|cli] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
LIBRARY_SIZE = 20  # adapters in the library that `adapters list` reads
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_import_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import gradio"], env=ENV, check=True, cwd=REPO)
    return time.perf_counter() - start


def torch_before_page() -> bool:
    """Whether building the page imports torch (it should wait for the background thread)."""
    code = (
        "import sys, tempfile, app; from sdlora.ui.studio import Studio; "
        "app.build_app(Studio('none', tempfile.mkdtemp())); print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=ENV, cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().endswith("True")


def wait_for_page(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode} before serving a page")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"no page at {url} within {timeout} s")


def first_image(url: str, prompt: str) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False)
    slots = [None, 1.0] * 4
    gallery, _, _ = client.predict(
        prompt, "", 1, 20, 7.5, 0, 0, "Euler a", 1, *slots, False, api_name="/generate"
    )
    if not gallery:
        raise RuntimeError("the app returned no image")


def app_run(base_model: str, with_image: bool) -> tuple[float, float | None]:
    """Seconds from launching app.py to its first page, and to its first generated image."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory() as adapters:
        start = time.perf_counter()
        process = subprocess.Popen(
            [
                sys.executable,
                "app.py",
                "--port",
                str(port),
                "--base-model",
                base_model,
                "--adapters-dir",
                adapters,
            ],
            cwd=REPO,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_page(url, process)
            page = time.perf_counter() - start
            image = None
            if with_image:
                first_image(url, "a red circle")
                image = time.perf_counter() - start
        finally:
            process.terminate()
            process.wait(timeout=30)
    return page, image


def seconds(command: list[str]) -> float:
    """Wall time of one command, from starting the process to its exit."""
    start = time.perf_counter()
    subprocess.run(command, env=ENV, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def fill_library(folder: Path, count: int = LIBRARY_SIZE) -> None:
    """`count` kohya LoRA files of 16 rank-8 layers each (numpy writes them: no torch here either)."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    for i in range(count):
        tensors = {}
        for layer in range(16):
            stem = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_{layer}_attn1_to_q"
            tensors[f"{stem}.lora_down.weight"] = rng.standard_normal((8, 320), dtype=np.float32) * 0.01
            tensors[f"{stem}.lora_up.weight"] = rng.standard_normal((320, 8), dtype=np.float32) * 0.01
            tensors[f"{stem}.alpha"] = np.array(8.0, dtype=np.float32)
        save_file(tensors, str(folder / f"adapter-{i:02d}.safetensors"), metadata={"ss_network_dim": "8"})


def cli_section(runs: int) -> str:
    """Medians of the CLI's quick commands beside a bare interpreter, interleaved run by run."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as library:
        fill_library(Path(library))
        commands = {
            "`python -c pass` (bare interpreter)": [sys.executable, "-c", "pass"],
            "`python -m sdlora --help` (goal: under 1)": [sys.executable, "-m", "sdlora", "--help"],
            f"`python -m sdlora adapters list`, {LIBRARY_SIZE} adapters (goal: under 2)": [
                *(sys.executable, "-m", "sdlora", "adapters", "--adapters-dir", library, "list")
            ],
        }
        times: dict[str, list[float]] = {label: [] for label in commands}
        for _ in range(runs):
            for label, command in commands.items():
                times[label].append(seconds(command))
    rows = [f"| {label} | {statistics.median(t):.2f} |" for label, t in times.items()]
    return "\n".join(
        [
            "## CLI startup (bench/startup.py)",
            "",
            f"{date.today().isoformat()}, median of {runs} runs on {platform.machine()} with {os.cpu_count()} "
            f"CPU cores, Python {platform.python_version()}, load average {load:.1f} at the start; wall "
            "time from starting the process to its exit.",
            "",
            "| command | seconds |",
            "| --- | --- |",
            *rows,
            "",
            "Neither command imports torch, diffusers, transformers or gradio: the run_* functions import "
            "what they need, and listing the library reads each file's safetensors header only "
            "(tests/test_entry_points.py checks both).",
        ]
    )


def write_section(text: str, name: str = "startup") -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    old = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(new, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="assets/demo-model")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=("app", "cli"), help="measure one of the two (default: both)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.only != "app":
        text = cli_section(args.runs)
        print(text)
        if not args.no_write:
            write_section(text, "startup_cli")
    if args.only != "cli":
        app_section(args)


def app_section(args: argparse.Namespace) -> None:
    """The web app: a bare gradio import, then app.py to its first page and to its first image."""
    has_model = (REPO / args.base_model).exists() or Path(args.base_model).exists()
    load = os.getloadavg()[0]  # other work on the machine slows the first image far more than the page

    imports, pages, images = [], [], []
    for _ in range(args.runs):  # interleaved, so a busy moment weighs on both sides alike
        imports.append(bare_import_seconds())
        page, image = app_run(args.base_model, with_image=has_model)
        pages.append(page)
        if image is not None:
            images.append(image)
    bare, page = statistics.median(imports), statistics.median(pages)
    torch_early = torch_before_page()
    image_text = f"{statistics.median(images):.2f} s" if images else f"n/a ({args.base_model} is missing)"
    text = "\n".join(
        [
            "## Web app startup (bench/startup.py)",
            "",
            f"Median of {args.runs} runs on {platform.machine()} with {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}, base model `{args.base_model}`, load average {load:.1f} at the "
            "start; each figure is wall time from starting the process.",
            "",
            "| what | seconds |",
            "| --- | --- |",
            f'| `python -c "import gradio"` (bare import) | {bare:.2f} |',
            f"| `python app.py` to the first page served | {page:.2f} |",
            f"| `python app.py` to the first generated image | {image_text.replace(' s', '')} |",
            f"| page served after the bare import time | {page - bare:+.2f} (goal: under 3) |",
            "",
            "The base model loads in a background thread once the page is served, so the first image waits "
            "for it; the page does not. "
            + (
                "Building the page imports torch: that is a regression (bench/startup.py checks it)."
                if torch_early
                else "torch is not imported before the page is served."
            ),
        ]
    )
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"\nwritten to {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
