"""The app on a Flux.1 base in a real browser: the Train tab trains, the Generate tab draws with the adapter.

The server runs `app.py`'s app over the tiny Flux.1 dev (`--base-model <tiny Flux folder>`); the steps
are a first user's. The Generate tab shows Flux's own settings: 28 steps at guidance 3.5, its one
flow-matching sampler, no negative prompt. One screenshot of both tabs goes to the test's tmp folder;
with SDLORA_UPDATE_SCREENSHOTS=1 to docs/screenshots/flux-train-generate.png.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from app_server import serving_model
from chromium import SCREENSHOTS, TIMEOUT_MS, containing, open_tab
from conftest import draw_concept
from tiny_transformers import IMAGE_SIZE, tiny_flux_model  # noqa: F401 - fixture

SCREENSHOT = "flux-train-generate.png"


@pytest.fixture(scope="module")
def flux_server(tiny_flux_model, tmp_path_factory):  # noqa: F811
    with serving_model(str(tiny_flux_model), tmp_path_factory.mktemp("flux-app")) as served:
        yield served


def side_by_side(left: Path, right: Path, out: Path) -> Path:
    """Two screenshots as one image, left beside right."""
    from PIL import Image

    images = [Image.open(left).convert("RGB"), Image.open(right).convert("RGB")]
    joined = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    joined.paste(images[0], (0, 0))
    joined.paste(images[1], (images[0].width, 0))
    joined.save(out)
    return out


def test_train_and_generate_on_a_flux_base_in_chromium(browser, flux_server, tmp_path):
    from playwright.sync_api import expect

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    files = [str(draw_concept(uploads / f"circle{i}.png", i, colour=(40, 90, 200))) for i in range(3)]
    (uploads / "circle0.txt").write_text("a blue circle")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page.goto(flux_server.url)

    expect(page.locator("#preset-note")).to_contain_text("Preset")
    page.locator("#concept-files input[type=file]").set_input_files([*files, str(uploads / "circle0.txt")])
    expect(page.locator("#thumbnails img")).to_have_count(len(files))
    page.locator("#adapter-name textarea, #adapter-name input").first.fill("flux-lora")
    page.locator("#trigger-word textarea, #trigger-word input").first.fill("sks")
    # A high rate, so that four steps visibly change the tiny model's drawing in the comparison grid.
    for field, value in (
        ("steps", 4),
        ("preview-every", 2),
        ("resolution", IMAGE_SIZE),
        ("learning-rate", 0.05),
    ):
        page.locator(f"#{field} input").fill(str(value))
    page.locator("#train-button").click()
    expect(page.locator("#train-status")).to_contain_text("finished", timeout=30 * TIMEOUT_MS)
    expect(page.locator("#previews img").first).to_be_visible()
    page.screenshot(path=str(tmp_path / "train.png"), full_page=True)

    open_tab(page, "Generate")
    # Flux.1 dev's own settings, not the UNet families': its card's steps and guidance, its sampler only.
    expect(page.locator("#generate-steps input[type=number]")).to_have_value("28")
    expect(page.locator("#generate-guidance input[type=number]")).to_have_value("3.5")
    expect(page.locator("#scheduler input")).to_have_value("Euler")
    expect(page.locator("#negative-prompt")).to_be_hidden()
    expect(page.locator("#generate-guidance")).to_contain_text("Flux.1's distilled guidance")
    page.locator("#generate-steps input[type=number]").fill("4")  # a quicker draw than the card's 28
    for side in ("width", "height"):  # the tiny model's size (Flux's native 1024 px would take minutes here)
        page.locator(f"#generate-{side} input").fill(str(IMAGE_SIZE))
    page.locator("#adapter-1 input").click()
    page.get_by_role("option", name="flux-lora").click()
    page.locator("#prompt textarea").fill("sks, a circle")
    page.locator("#seed input").fill("3")
    page.locator("#comparison-grid input").check()
    page.locator("#generate-button").click()
    expect(page.locator("#results img").first).to_be_visible()
    expect(page.locator("#comparison img")).to_be_visible()
    parameters = page.locator("#parameters textarea")
    expect(parameters).to_have_value(containing("<lora:flux-lora:1>"))
    expect(parameters).to_have_value(
        containing(f"Steps: 4, Sampler: Euler, CFG scale: 3.5, Seed: 3, Size: {IMAGE_SIZE}x")
    )
    page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)
    shot = side_by_side(tmp_path / "train.png", tmp_path / "generate.png", tmp_path / SCREENSHOT)
    if os.environ.get("SDLORA_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOTS / SCREENSHOT)

    open_tab(page, "Settings")
    expect(page.locator("#model-status")).to_contain_text("flux")
    page.close()
