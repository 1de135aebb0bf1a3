"""The Train tab in Chromium: the loss chart with validation points, the checkpoint grid with the demo
evaluator's figures, "Keep this one".

On the demo model with star images, so that the grid shows the evaluator's figures under each
checkpoint. SDLORA_UPDATE_SCREENSHOTS=1 copies the page after comparing and keeping a checkpoint to
docs/screenshots/validation.png.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import pytest
from app_server import DEMO_MODEL, serving_model
from chromium import TIMEOUT_MS, shoot

from sdlora.assets import EXAMPLE_CONCEPTS
from sdlora.demo.learning import base_not_ready
from sdlora.training.checkpoint_adapters import list_checkpoint_adapters


@pytest.fixture()
def concepts(tmp_path) -> Path:
    """Four of the star example's images to train on, two others held out for validation."""
    root = tmp_path / "concepts"
    (root / "star").mkdir(parents=True)
    (root / "held").mkdir()
    stars = sorted((EXAMPLE_CONCEPTS / "star").glob("*.png"))
    for i, image in enumerate(stars[:6]):
        folder = root / ("star" if i < 4 else "held")
        shutil.copyfile(image, folder / image.name)
        shutil.copyfile(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    return root


def patient_url_ok(url: str) -> bool:
    """gradio's start-up check with a minute's patience: its 3-second HEAD fails on a loaded 2-core machine."""
    import time

    import httpx

    for _ in range(30):
        try:
            if httpx.head(url, timeout=30).status_code in (200, 401, 302, 307):
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


@pytest.mark.skipif(base_not_ready() is not None, reason=str(base_not_ready()))
def test_chart_grid_and_keep_this_one_in_chromium(browser, concepts, tmp_path, monkeypatch):
    from gradio import networking
    from gradio_client import Client
    from playwright.sync_api import expect

    from sdlora.generation.checkpoint_grid import Comparison
    from sdlora.ui import checkpoints_view

    monkeypatch.setattr(networking, "url_ok", patient_url_ok)
    # One evaluator prompt of each kind per checkpoint and a 4-step grid (the app's defaults are 6 and 20):
    # the page is under test here, not the pictures (the grid's layout: tests/test_validation.py).
    monkeypatch.setattr(checkpoints_view, "Comparison", partial(Comparison, evaluator_prompts=1, steps=4))
    with serving_model(str(DEMO_MODEL), tmp_path / "app", concepts=concepts) as served:
        from gradio_client import handle_file

        client = Client(served.url, verbose=False)
        files = [handle_file(str(p)) for p in sorted((concepts / "star").iterdir())]
        _, captions = client.predict(files=files, api_name="/upload_images")  # the .txt captions, as a page
        settings = {
            "name": "val",
            "steps": 6,
            "final_preview": False,
            "preview_every": 0,
            "data": {"regularization_images": ""},
            "validation": {"validation_folder": str(concepts / "held"), "validation_every": 2},
        }
        client.predict(files=files, captions=captions, config=settings, api_name="/train")
        for _ in client.submit(api_name="/progress"):
            pass
        adapters = Path(served.studio.adapters_dir)
        saved = list_checkpoint_adapters(adapters, "val")
        assert [c.step for c in saved] == [2, 4, 6]

        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        page.goto(served.url)
        expect(page.locator("#train-status")).to_contain_text("validation")
        expect(page.locator("#train-status")).to_contain_text("lowest")
        expect(page.locator("#loss-curve")).to_be_visible()
        expect(page.locator("#loss-curve")).to_contain_text("validation")
        page.locator("#checkpoints").get_by_text("Checkpoints: compare and keep one").click()
        page.locator("#checkpoint-weights textarea, #checkpoint-weights input").first.fill("1")
        page.locator("#compare-checkpoints").click()
        expect(page.locator("#checkpoint-grid img")).to_be_visible()
        # the demo evaluator's figures, listed under the grid as they are drawn under its columns
        for step in (2, 4, 6):
            expect(page.locator("#checkpoint-figures")).to_contain_text(f"step {step}: val ")
        expect(page.locator("#checkpoint-figures")).to_contain_text("trigger prompts drawn as star")
        expect(page.locator("#checkpoint-figures")).to_contain_text("trigger-free prompts drawn right")
        page.locator("#checkpoint-step input").click()
        page.get_by_role("option", name="step 2", exact=False).click()
        page.locator("#keep-checkpoint").click()
        expect(page.locator("#checkpoint-message")).to_contain_text("adapter of step 2")
        page.locator("#checkpoints").scroll_into_view_if_needed()
        shoot(page, "validation.png", tmp_path)
        assert (adapters / "val.safetensors").read_bytes() == saved[0].path.read_bytes()
