"""The Train tab in Chromium: the loss chart with validation points, the checkpoint grid, "Keep this one".

Writes docs/screenshots/validation.png (the page after comparing and keeping a checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from app_server import REPO, serving_model
from chromium import TIMEOUT_MS
from conftest import draw_concept

from sdlora.training.checkpoint_adapters import list_checkpoint_adapters


@pytest.fixture()
def concepts(tmp_path) -> Path:
    root = tmp_path / "concepts"
    (root / "circle").mkdir(parents=True)
    (root / "held").mkdir()
    for i in range(4):
        draw_concept(root / "circle" / f"img{i}.png", i)
    for i in range(2):
        draw_concept(root / "held" / f"val{i}.png", 2 * i, colour=(30, 160, 40))
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


def test_chart_grid_and_keep_this_one_in_chromium(
    browser,
    tiny_model,
    concepts,
    tmp_path,
    monkeypatch,
):
    from gradio import networking
    from gradio_client import Client
    from playwright.sync_api import expect

    monkeypatch.setattr(networking, "url_ok", patient_url_ok)
    with serving_model(str(tiny_model), tmp_path / "app", concepts=concepts) as served:
        client = Client(served.url, verbose=False)
        settings = {
            "name": "val",
            "steps": 6,
            "final_preview": False,
            "data": {"images": str(concepts / "circle"), "resolution": 32},
            "validation": {"validation_folder": str(concepts / "held"), "validation_every": 2},
        }
        client.predict(config=settings, api_name="/train")
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
        page.locator("#compare-checkpoints").click()
        expect(page.locator("#checkpoint-grid img")).to_be_visible()
        page.locator("#checkpoint-step input").click()
        page.get_by_role("option", name="step 2", exact=False).click()
        page.locator("#keep-checkpoint").click()
        expect(page.locator("#checkpoint-message")).to_contain_text("adapter of step 2")
        page.locator("#checkpoints").scroll_into_view_if_needed()
        page.screenshot(path=str(REPO / "docs" / "screenshots" / "validation.png"), full_page=True)
        assert (adapters / "val.safetensors").read_bytes() == saved[0].path.read_bytes()
