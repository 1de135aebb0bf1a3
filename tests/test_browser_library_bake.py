"""The Library tab's Extract and Bake panels in Chromium, on the demo model (conftest's shared demo server).

A fine-tuned demo model is made by adding a known low-rank change to it; the page extracts a LoRA
from it into the library, then bakes that LoRA into the server's base model as a single file.
The screenshot goes to the test's tmp folder (docs/screenshots/ with SDLORA_UPDATE_SCREENSHOTS=1).
"""

from __future__ import annotations

import re

import pytest
import torch
from chromium import open_tab, shoot
from safetensors import safe_open

from sdlora.library.tools.extract import target_modules
from sdlora.models.loading import load_pipeline

# Extract and bake run while the page waits; on a 2-core machine shared with other work they took up
# to two minutes, past test_browser's limit.
TIMEOUT_MS = 300_000


@pytest.fixture(scope="module")
def tuned_demo(demo_app):
    """The demo model with a rank-2 change on its UNet's attention layers, in the server's work folder."""
    pipeline = load_pipeline(str(demo_app.studio.base_model))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, module in target_modules(pipeline.unet, "unet").items():
            if ".attentions." in path:
                rows, columns = module.weight.shape[0], module.weight[0].numel()
                delta = torch.randn(rows, 2, generator=generator) @ torch.randn(
                    2, columns, generator=generator
                )
                module.weight += 0.01 * delta.reshape(module.weight.shape)
    folder = demo_app.studio.work_dir / "tuned-demo"
    pipeline.save_pretrained(folder)
    return folder


def unet_checksum(studio) -> float:
    with torch.no_grad():
        return float(sum(p.double().abs().sum() for p in studio.generator().pipeline.unet.parameters()))


def test_extract_then_bake_in_the_library_tab_in_chromium(browser, demo_app, tuned_demo, tmp_path):
    from playwright.sync_api import expect

    resident_before = unet_checksum(demo_app.studio)  # the base every page generates with
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page.goto(demo_app.url)
    open_tab(page, "Library")
    page.get_by_text("Extract: a LoRA from a fine-tuned model and its base").click()
    page.locator("#extract-tuned textarea, #extract-tuned input").first.fill(str(tuned_demo))
    page.locator("#extract-rank input").first.fill("4")
    page.locator("#extract-name textarea, #extract-name input").first.fill("demo-extract")
    page.locator("#extract-button").click()
    expect(page.locator("#extract-report textarea")).to_have_value(re.compile("^84 layers extracted"))
    expect(page.locator("#adapters-table")).to_contain_text("demo-extract")

    page.get_by_text("Bake: a mix merged into the base model, saved as a full model").click()
    page.locator("#bake-mix textarea, #bake-mix input").first.fill("demo-extract:0.8")
    page.locator("#bake-name textarea, #bake-name input").first.fill("demo-baked")
    page.locator("#bake-button").click()
    report = page.locator("#bake-report textarea")
    expect(report).to_have_value(re.compile("single file, original layout, fp16"))
    link = page.locator("#bake-download a")
    expect(link).to_have_attribute("href", re.compile(r"/demo-baked\.safetensors$"))
    shoot(page, "library-extract-bake.png", tmp_path)
    page.close()

    baked = next(demo_app.studio.work_dir.glob("bake-*/demo-baked.safetensors"))
    with safe_open(str(baked), framework="pt") as file:
        assert "model.diffusion_model.input_blocks.0.0.weight" in file.keys()
        assert "demo-extract" in file.metadata()["sdlora.baked"]
    assert unet_checksum(demo_app.studio) == resident_before  # baking left the shared base untouched
