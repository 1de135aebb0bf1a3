"""Chromium through Playwright for the browser tests: the `browser` fixture (conftest) and page helpers.

Drives Debian's Chromium (Playwright's own browser download is not used). The setup installs what
is missing (`apt-get install chromium`, `pip install playwright==...`) and skips, saying why, only
where that cannot be done. With SDLORA_UPDATE_SCREENSHOTS=1, `shoot` also rewrites the README's
docs/screenshots/*.png.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLAYWRIGHT_VERSION = "1.65.2"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
SCREENSHOTS = REPO / "docs" / "screenshots"
TIMEOUT_MS = 120_000


def _install(command: list[str]) -> str:
    """Run an install command; '' on success, else why it failed."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(command)}: {exc}"
    return (
        "" if done.returncode == 0 else f"{' '.join(command)} failed: {(done.stderr or done.stdout)[-500:]}"
    )


def browser_setup() -> str:
    """Install Chromium and Playwright where missing; returns why the browser cannot run, or ''."""
    if not CHROMIUM.exists():
        if shutil.which("apt-get") is None:
            return "no /usr/bin/chromium and no apt-get to install it"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
            if done.returncode:
                return f"cannot install chromium: {(done.stderr or done.stdout)[-500:]}"
    try:
        importlib.import_module("playwright.sync_api")
    except ImportError:
        problem = _install(
            [sys.executable, "-m", "pip", "install", "-q", f"playwright=={PLAYWRIGHT_VERSION}"]
        )
        if problem:
            return f"cannot install playwright: {problem}"
        importlib.invalidate_caches()
    return ""


@pytest.fixture(scope="module")
def browser():
    """Chromium for one test module, or a skip that says why this machine has none."""
    reason = browser_setup()
    if reason:
        print(f"skipping the browser test: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
        except Exception as exc:  # noqa: BLE001 - any launch failure means this machine has no usable browser
            print(f"skipping the browser test: chromium does not start: {exc}")
            pytest.skip(f"chromium does not start: {exc}")
        yield browser
        browser.close()


def shoot(page, name: str, folder: Path) -> None:
    page.screenshot(path=str(folder / name), full_page=True)
    if os.environ.get("SDLORA_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / name, SCREENSHOTS / name)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def containing(text: str) -> re.Pattern:
    return re.compile(".*" + re.escape(text) + ".*", re.S)


def exactly(text: str) -> re.Pattern:
    return re.compile(r"^\s*" + re.escape(text) + r"\s*$")
