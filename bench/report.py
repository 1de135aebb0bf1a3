"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections as they are."""

from __future__ import annotations

import os
import platform
import re
from datetime import date
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
TITLE = "# Benchmarks\n\nEach section is written by the script named in it; ratios are measured side by side in one run.\n"


def machine() -> str:
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    load = os.getloadavg()[0]
    return (
        f"{date.today().isoformat()}, {device}, {platform.machine()}, torch {torch.__version__}, "
        f"load average {load:.1f} at the start"
    )


def write_section(name: str, markdown: str) -> Path:
    """Replace the text between <!-- name:begin --> and <!-- name:end --> (appending it the first time)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else TITLE
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    return DOC
