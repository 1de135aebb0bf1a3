"""A new user's first hour in a real browser, on the demo model (issue #23's must-show).

Example concept -> the preset in force -> a short run -> previews appear -> generate with the
adapter -> download each format. Along the way: the estimate learns this machine's speed from the
run, controls that cannot act are not clickable, and the page says how many files it loaded.
SDLORA_FIRST_HOUR_STEPS sets the run's length (default 8: still four previews, and the speed the
estimate learns is the run's own, however short); SDLORA_UPDATE_SCREENSHOTS=1 copies the screenshots
to docs/screenshots/.
"""

from __future__ import annotations

import os
import re

import pytest
from app_server import DEMO_MODEL, serving_model
from chromium import TIMEOUT_MS, exactly, open_tab, shoot

from sdlora.config import TRIGGER_WORD, preview_interval

STEPS = int(os.environ.get("SDLORA_FIRST_HOUR_STEPS", "8"))
CONCEPT = "star"
SPEED = re.compile(r"([\d.]+) s/step")


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    """The app on the demo model with the shipped example concepts and an empty library."""
    if not DEMO_MODEL.is_dir():
        pytest.skip(f"the first-hour walk needs the demo model at {DEMO_MODEL}")
    with serving_model(str(DEMO_MODEL), tmp_path_factory.mktemp("first-hour")) as served:
        yield served


def speed_in(text: str) -> float:
    found = SPEED.search(text)
    assert found, f"no s/step in {text!r}"
    return float(found.group(1))


def test_a_new_users_first_hour_on_the_demo_model(browser, demo_app, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page.goto(demo_app.url)

    # Before anything runs: the preset shown is the one in force, and nothing idle is clickable.
    expect(page.locator("#preset-note")).to_contain_text("Preset Demo")
    expect(page.locator("#preset input:checked")).to_have_value("Demo")
    expect(page.locator("#estimate")).to_contain_text("Estimate: about")
    for idle in ("#stop-button", "#queue-cancel", "#queue-up", "#queue-down", "#queue-retry"):
        expect(page.locator(idle)).to_be_disabled()
    expect(page.locator("#loss-curve")).to_be_hidden()

    # An example concept in one click: the page says how many images and captions it loaded.
    page.locator("#example-concept input").click()
    page.get_by_role("option", name=CONCEPT, exact=True).click()
    page.locator("#use-example").click()
    expect(page.locator("#caption-summary")).to_contain_text("8 images loaded, 8 with a caption")
    expect(page.locator("#trigger-word textarea, #trigger-word input").first).to_have_value(TRIGGER_WORD)

    # A short run: previews follow the step count, and the estimate warns that it is short.
    page.locator("#steps input").fill(str(STEPS))
    page.locator("#steps input").press("Tab")
    expect(page.locator("#preview-every input")).to_have_value(str(preview_interval(STEPS)))
    expect(page.locator("#estimate")).to_contain_text(f"{STEPS} steps is well below the 600")
    page.locator("#train-button").click()
    expect(page.locator("#stop-button")).to_be_enabled()  # something to stop now
    expect(page.locator("#train-status")).to_contain_text(
        f"{CONCEPT}: finished, step {STEPS}/{STEPS}", timeout=30 * TIMEOUT_MS
    )
    expect(page.locator("#previews img").first).to_be_visible()
    expect(page.locator("#loss-curve")).to_be_visible()
    expect(page.locator("#stop-button")).to_be_disabled()

    # After one run the estimate uses the speed this run measured.
    expect(page.locator("#estimate")).to_contain_text("measured in the last run here")
    measured = speed_in(page.locator("#train-status").inner_text())
    estimated = speed_in(page.locator("#estimate").inner_text())
    assert abs(estimated - measured) <= 0.25 * measured, (estimated, measured)
    shoot(page, "train.png", tmp_path)

    # Generate with the new adapter, and its comparison grid.
    open_tab(page, "Generate")
    page.locator("#adapter-1 input").click()
    page.get_by_role("option", name=CONCEPT, exact=True).click()
    page.locator("#prompt textarea").fill(f"{TRIGGER_WORD}, a red star on a white background")
    page.locator("#seed input").fill("3")
    page.locator("#comparison-grid input").check()
    page.locator("#generate-button").click()
    expect(page.locator("#results img").first).to_be_visible()
    expect(page.locator("#comparison img")).to_be_visible()
    shoot(page, "generate.png", tmp_path)

    # Library: nothing picked, nothing to delete or download; then each format in one click.
    open_tab(page, "Library")
    expect(page.locator("#delete-button")).to_be_disabled()
    expect(page.locator("#download")).to_be_disabled()
    page.locator("#adapters-table [role=gridcell]").filter(has_text=exactly(CONCEPT)).first.click()
    expect(page.locator("#delete-button")).to_be_enabled()
    names = {}
    for fmt, file_name, prefix in (
        ("kohya", f"{CONCEPT}.safetensors", "lora_unet_"),
        ("diffusers", f"{CONCEPT}.diffusers.safetensors", "unet."),
    ):
        page.locator("#download-format").get_by_text(fmt, exact=True).click()
        expect(page.locator("#download")).to_contain_text(file_name)
        with page.expect_download() as download_info:
            page.locator("#download").click()
        download = download_info.value
        names[fmt] = download.suggested_filename
        saved = tmp_path / download.suggested_filename
        download.save_as(saved)
        from safetensors import safe_open

        with safe_open(str(saved), framework="pt") as handle:
            assert all(key.startswith(prefix) for key in handle.keys()), fmt
    assert names == {"kohya": f"{CONCEPT}.safetensors", "diffusers": f"{CONCEPT}.diffusers.safetensors"}
    shoot(page, "library.png", tmp_path)

    open_tab(page, "Settings")
    expect(page.locator("#model-status")).to_contain_text("loaded")
    shoot(page, "settings.png", tmp_path)
    page.close()
