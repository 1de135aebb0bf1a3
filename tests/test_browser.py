"""The web app in a real browser: upload, train, generate with the new adapter, download it.

Chromium comes from conftest's `browser` fixture (tests/chromium.py). Screenshots go to the test's
tmp folder; with SDLORA_UPDATE_SCREENSHOTS=1 the README's docs/screenshots/*.png are rewritten.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from app_server import serving_model
from chromium import REPO, TIMEOUT_MS, containing, exactly, open_tab, shoot
from conftest import draw_concept
from tiny_models import IMAGE_SIZE

from sdlora.config import preview_interval

pytest.importorskip("sdlora.training.presets", reason="the app needs sdlora.training.presets")
pytest.importorskip("sdlora.generation.generate", reason="the app needs sdlora.generation.generate")

# SDLORA_UPDATE_SCREENSHOTS=1 rewrites the README's screenshots: the same steps on the demo model
# with one of its example concepts and a longer run (SDLORA_SCREENSHOT_STEPS, default 600;
# SDLORA_SCREENSHOT_MODEL names another base model).
README_MODE = os.environ.get("SDLORA_UPDATE_SCREENSHOTS") == "1"
DEMO_MODEL = Path(os.environ.get("SDLORA_SCREENSHOT_MODEL") or REPO / "assets" / "demo-model")
README_CONCEPT = REPO / "assets" / "concepts" / "star"


@dataclass(frozen=True)
class Scenario:
    """What the test uploads and how long it trains."""

    files: list[str]
    name: str
    trigger: str
    prompt: str
    steps: int
    preview_every: int
    resolution: int | None  # None: keep the preset's


def scenario(tmp_path: Path) -> Scenario:
    if README_MODE:
        files = sorted(str(p) for p in README_CONCEPT.iterdir())
        prompt = next(p for p in sorted(README_CONCEPT.iterdir()) if p.suffix == ".txt").read_text().strip()
        steps = int(os.environ.get("SDLORA_SCREENSHOT_STEPS", "600"))  # the demo preset's
        return Scenario(files, "star", "sks", f"sks, {prompt}", steps, max(1, steps // 4), None)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    files = [str(draw_concept(uploads / f"circle{i}.png", i, colour=(20, 140, 60))) for i in range(3)]
    (uploads / "circle0.txt").write_text("a green circle")
    return Scenario(
        [*files, str(uploads / "circle0.txt")], "browser-lora", "sks", "sks, a circle", 6, 3, IMAGE_SIZE
    )


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """The app on the tiny SD 1.x model (conftest's shared server). The same walk on SDXL is test_app's
    Train-tab test without a browser, and on Flux.1 test_browser_flux: one browser walk per model kind."""
    if README_MODE:
        if not DEMO_MODEL.is_dir():
            pytest.skip(f"the README screenshots need the demo model at {DEMO_MODEL}")
        with serving_model(str(DEMO_MODEL), tmp_path_factory.mktemp("browser-app")) as served:
            yield SimpleNamespace(url=served.url, family="sd1")
    else:
        yield SimpleNamespace(url=request.getfixturevalue("tiny_app").url, family="sd1")


def fill_steps(page, steps: int, preview_every: int) -> None:
    """Steps, then previews: a change of steps sets the preview interval from the server, so the page waits
    for that answer before it types its own interval (typed first, the answer would overwrite it)."""
    from playwright.sync_api import expect

    page.locator("#steps input").fill(str(steps))
    page.locator("#steps input").press("Tab")
    expect(page.locator("#preview-every input")).to_have_value(str(preview_interval(steps)))
    page.locator("#preview-every input").fill(str(preview_every))
    page.locator("#preview-every input").press("Tab")
    expect(page.locator("#preview-every input")).to_have_value(str(preview_every))


def test_upload_train_generate_download_in_chromium(browser, server, tmp_path):
    from playwright.sync_api import expect

    run = scenario(tmp_path)
    images = [f for f in run.files if not f.endswith(".txt")]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    # expect() keeps its own 5 s default; a comparison grid on a loaded 2-core machine took longer
    expect.set_options(timeout=TIMEOUT_MS)
    page.goto(server.url)

    # Train: the page fills the preset on load; then upload, name the adapter, shorten the run.
    expect(page.locator("#preset-note")).to_contain_text("Preset")
    if README_MODE:  # what a first-time user does: one of the example concepts, in one click
        page.locator("#example-concept input").click()
        page.get_by_role("option", name=README_CONCEPT.name, exact=True).click()
        page.locator("#use-example").click()
    else:
        page.locator("#concept-files input[type=file]").set_input_files(run.files)
    expect(page.locator("#thumbnails img")).to_have_count(len(images))
    expect(page.locator("#captions")).to_contain_text(Path(images[0]).name)
    page.locator("#adapter-name textarea, #adapter-name input").first.fill(run.name)
    page.locator("#trigger-word textarea, #trigger-word input").first.fill(run.trigger)
    fill_steps(page, run.steps, run.preview_every)
    if run.resolution is not None:
        page.locator("#resolution input").fill(str(run.resolution))
    page.locator("#train-button").click()
    expect(page.locator("#train-status")).to_contain_text("finished", timeout=30 * TIMEOUT_MS)
    expect(page.locator("#previews img").first).to_be_visible()
    shoot(page, "train.png", tmp_path)
    page.reload()  # the run lives on the server: a reloaded page shows it again
    expect(page.locator("#train-status")).to_contain_text(
        f"{run.name}: finished, step {run.steps}/{run.steps}"
    )
    expect(page.locator("#previews img").first).to_be_visible()

    # Generate with the new adapter at a weight, and the comparison grid.
    open_tab(page, "Generate")
    page.locator("#adapter-1 input").click()
    page.get_by_role("option", name=run.name).click()
    page.locator("#prompt textarea").fill(run.prompt)
    page.locator("#seed input").fill("3")
    page.locator("#comparison-grid input").check()
    page.locator("#generate-button").click()
    expect(page.locator("#results img").first).to_be_visible()
    expect(page.locator("#comparison img")).to_be_visible()
    expect(page.locator("#parameters textarea")).to_have_value(containing(f"<lora:{run.name}:1>"))
    shoot(page, "generate.png", tmp_path)

    # Library: pick it, download in the kohya format.
    open_tab(page, "Library")
    page.locator("#adapters-table [role=gridcell]").filter(has_text=exactly(run.name)).first.click()
    expect(page.locator("#selected-adapter textarea, #selected-adapter input").first).to_have_value(run.name)
    page.locator("#download-format").get_by_text("kohya").click()
    expect(page.locator("#download")).to_contain_text(f"{run.name}.safetensors")
    with page.expect_download() as download_info:
        page.locator("#download").click()
    saved = tmp_path / "downloaded.safetensors"
    download_info.value.save_as(saved)
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as handle:
        assert all(key.startswith("lora_unet_") for key in handle.keys())
    shoot(page, "library.png", tmp_path)

    open_tab(page, "Settings")
    expect(page.locator("#model-status")).to_contain_text("loaded")
    expect(page.locator("#model-status")).to_contain_text(server.family)
    shoot(page, "settings.png", tmp_path)
    page.close()


@pytest.fixture(scope="module")
def demo_server(demo_app) -> str:
    """The app on the demo model (conftest's shared server), whose default captioner needs no weights."""
    return demo_app.url


def test_caption_images_fills_the_caption_table_in_chromium(browser, demo_server, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    from sdlora.demo.captioner import describe

    images = [
        shutil.copy(p, tmp_path) for p in sorted(README_CONCEPT.glob("*.png"))[:4]
    ]  # no .txt beside them
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page.goto(demo_server)
    expect(page.locator("#preset-note")).to_contain_text("Preset")
    page.locator("#concept-files input[type=file]").set_input_files(images)
    expect(page.locator("#thumbnails img")).to_have_count(len(images))
    expect(page.locator("#captions")).to_contain_text(Path(images[0]).name)
    page.locator("#trigger-word textarea, #trigger-word input").first.fill("star")
    # The prefix box is left empty: captions then start with the trigger word.
    page.locator("#caption-button").click()
    for image in images:
        expect(page.locator("#captions")).to_contain_text(
            "star, " + describe(Image.open(image).convert("RGB"))
        )
    expect(page.locator("#caption-summary")).to_contain_text(f"captioned {len(images)} images")
    shoot(page, "captions.png", tmp_path)
    open_tab(page, "Settings")  # which captioners this server has, and which one the button used
    expect(page.locator("#model-status")).to_contain_text("Captioner demo, used by Caption images")
    expect(page.locator("#model-status")).to_contain_text("Captioner blip")
    page.screenshot(path=str(tmp_path / "settings-captioners.png"), full_page=True)
    page.close()


def test_two_jobs_queued_in_the_train_tab_both_finish_in_chromium(browser, server, tmp_path):
    """Queue two jobs from the Train tab; the queue table shows them run in order, and both land in the library."""
    from playwright.sync_api import expect

    uploads = tmp_path / "queued"
    uploads.mkdir()
    files = [str(draw_concept(uploads / f"square{i}.png", i, colour=(200, 40, 40))) for i in range(2)]
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page.goto(server.url)
    expect(page.locator("#preset-note")).to_contain_text("Preset")
    page.locator("#concept-files input[type=file]").set_input_files(files)
    expect(page.locator("#thumbnails img")).to_have_count(len(files))
    fill_steps(page, 4, 0)
    page.locator("#resolution input").fill(str(IMAGE_SIZE))
    names = ["queued-first", "queued-second"]
    for name in names:
        page.locator("#adapter-name textarea, #adapter-name input").first.fill(name)
        page.locator("#queue-add").click()
        expect(page.locator("#queue-table")).to_contain_text(name)
    # The table's rows are drawn cell by cell, not as <tr>: read its text, a row's cells in order.
    table = page.locator("#queue-table")
    both_done = re.compile(r"(\d+)\s+queued-first\s+done\b.*?(\d+)\s+queued-second\s+done\b", re.S)
    expect(table).to_contain_text(both_done, timeout=30 * TIMEOUT_MS)
    first, second = map(int, both_done.search(table.inner_text()).groups())
    assert first < second, (first, second)  # queued first, so listed and run first
    # The page that queued them follows them in its progress view, as it follows a click on Train.
    expect(page.locator("#train-status")).to_contain_text("queued-second: finished, step 4/4")
    shoot(page, "queue.png", tmp_path)
    # A click on a row picks its job for the buttons beside the table.
    table.locator("span").filter(has_text=exactly("queued-second")).first.click()
    expect(page.locator("#queue-job-id textarea, #queue-job-id input").first).to_have_value(str(second))
    open_tab(page, "Library")
    for name in names:
        expect(page.locator("#adapters-table")).to_contain_text(name)
    page.close()
