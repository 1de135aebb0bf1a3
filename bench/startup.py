"""How fast the web app comes up: `python app.py` to the first page served and to the first image.

Beside it, in the same run, the time of a bare `python -c "import gradio"`: the app's goal is
to be ready within 3 s of that. Figures go into docs/benchmarks.md between the startup
markers (the rest of the file is left alone).

    python bench/startup.py [--base-model assets/demo-model] [--runs 3] [--no-write]
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- startup:begin -->", "<!-- startup:end -->"
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


def write_section(text: str) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    old = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(new, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="assets/demo-model")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
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
