"""What the embedded demo base draws: `python bench/demo_base.py` (the issue's base-model figures).

Runs `python -m sdlora.demo.report` (108 new-seed prompts over every colour x shape pair,
scored by the evaluator, timed per image; grid in docs/demo-grid.png) and copies its
summary into docs/benchmarks.md beside the other benchmarks.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, write_section  # noqa: E402
from sdlora.demo import report  # noqa: E402


def main() -> None:
    block = report.main(sys.argv[1:])
    body = block.replace(report.START, "").replace(report.END, "").replace("## Latest report", "").strip()
    text = "\n".join(
        [
            "## The demo base model (`python bench/demo_base.py`)",
            "",
            f"{machine()}.",
            "",
            body,
        ]
    )
    print(f"written to {write_section('demo-base', text)}")


if __name__ == "__main__":
    main()
