"""The Library tab's Resize and Merge panels in Chromium, on the demo model: each makes a new adapter and says
what it kept. The screenshot goes to docs/screenshots/library-reshape.png with SDLORA_UPDATE_SCREENSHOTS=1."""

from __future__ import annotations

import re

import pytest
import torch
from chromium import TIMEOUT_MS, open_tab, shoot

from sdlora.library.formats import Adapter, LoraLayer, read_adapter, write_adapter
from sdlora.library.store import reference_from_pipeline


@pytest.fixture(scope="module")
def two_adapters(demo_app) -> tuple[str, str]:
    """Two random rank-4 adapters on the demo model's attention layers, in the shared demo app's library."""
    layout = reference_from_pipeline(demo_app.studio.generator().pipeline)
    names = ("reshape-a", "reshape-b")
    for seed, name in enumerate(names):
        g = torch.Generator().manual_seed(seed)
        layers = {
            key: LoraLayer(
                torch.randn(4, *shape[1:], generator=g), torch.randn(shape[0], 4, generator=g), 4.0
            )
            for key, shape in layout.shapes.items()
            if key.startswith("unet.") and key.endswith(("to_q", "to_v"))
        }
        write_adapter(
            demo_app.studio.library.path_of(name), Adapter(layers, {"sdlora.family": "sd1"}), "kohya"
        )
    return names


def pick(page, dropdown: str, option: str) -> None:
    page.locator(f"#{dropdown} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_resize_and_merge_panels_make_new_adapters_in_chromium(browser, demo_app, two_adapters, tmp_path):
    from playwright.sync_api import expect

    a, b = two_adapters
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page.goto(demo_app.url)
    open_tab(page, "Library")
    expect(page.locator("#adapters-table")).to_contain_text(b)

    page.get_by_text("Resize: the same adapter at a lower rank").click()
    pick(page, "resize-source", a)
    page.locator("#resize-rank input").fill("2")
    page.locator("#resize-name textarea, #resize-name input").first.fill("reshape-a-2")
    page.locator("#resize-button").click()
    expect(page.locator("#resize-report textarea")).to_have_value(
        re.compile(rf"^{a} \(rank 4\) -> reshape-a-2, resized to rank 2: .* retained overall")
    )
    expect(page.locator("#adapters-table")).to_contain_text("reshape-a-2")

    page.get_by_text("Merge: several adapters with weights").click()
    for row, (name, weight) in enumerate(((a, "0.7"), (b, "0.3")), 1):
        pick(page, f"merge-adapter-{row}", name)
        page.locator(f"#merge-weight-{row} input").fill(weight)
    page.locator("#merge-name textarea, #merge-name input").first.fill("reshape-ab")
    page.locator("#merge-button").click()
    expect(page.locator("#merge-report textarea")).to_have_value(
        re.compile(rf"^{a} x 0\.7 \+ {b} x 0\.3 -> reshape-ab, exact merge of 2: .* 100\.00% of ΔW's")
    )
    expect(page.locator("#selected-adapter textarea, #selected-adapter input").first).to_have_value(
        "reshape-ab"
    )
    expect(page.locator("#download")).to_contain_text("reshape-ab.safetensors")  # picked like any adapter
    shoot(page, "library-reshape.png", tmp_path)
    page.close()

    library = demo_app.studio.library
    merged = read_adapter(library.path_of("reshape-ab"))
    sources = [read_adapter(library.path_of(n)) for n in two_adapters]
    key = next(iter(merged.layers))
    want = 0.7 * sources[0].layers[key].delta() + 0.3 * sources[1].layers[key].delta()
    assert float((merged.layers[key].delta() - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert read_adapter(library.path_of("reshape-a-2")).layers[key].rank == 2
