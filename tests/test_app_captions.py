"""The app's "Caption images": the table fills with the captioner's words, typed captions stay, nothing is written."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from app_server import CONCEPTS
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

STAR = CONCEPTS / "star"


@pytest.fixture(scope="module")
def served(demo_app):
    """The app on the demo model (conftest's shared server): its default captioner needs no weights."""
    return SimpleNamespace(client=Client(demo_app.url, verbose=False), studio=demo_app.studio)


def test_caption_images_fills_empty_rows_keeps_typed_ones_and_writes_nothing(served, tmp_path):
    from sdlora.demo.captioner import describe

    images = [Path(shutil.copy(p, tmp_path)) for p in sorted(STAR.glob("*.png"))[:3]]
    files = [handle_file(str(p)) for p in images]
    _, table = served.client.predict(files, api_name="/upload_images")
    assert [row[1] for row in table["data"]] == ["", "", ""]  # no .txt uploaded
    table["data"][1][1] = "typed by hand"
    new_table, summary = served.client.predict(
        images=files, captions=table, prefix="star", overwrite=False, api_name="/caption_images"
    )
    rows = {row[0]: row for row in new_table["data"]}
    for image in (images[0], images[2]):
        assert rows[image.name][1] == "star, " + describe(Image.open(image).convert("RGB"))
    assert rows[images[1].name][1] == "typed by hand"
    assert all(row[2] for row in new_table["data"])  # the bucket column is filled again
    assert "**demo**" in summary and "captioned 2 images, kept 1 existing caption" in summary
    assert not list(tmp_path.glob("*.txt"))  # the table trains; no caption file appears beside the uploads

    # No prefix and no trigger word: the captioner's words alone.
    overwritten, _ = served.client.predict(
        images=files,
        captions=new_table,
        prefix="",
        overwrite=True,
        trigger_word="",
        api_name="/caption_images",
    )
    assert overwritten["data"][1][1] == describe(Image.open(images[1]).convert("RGB"))


def test_caption_images_without_images_says_what_to_do(served):
    with pytest.raises(AppError, match="Add concept images first"):
        served.client.predict(
            images=[],
            captions={"headers": ["image", "caption", "bucket"], "data": []},
            prefix="",
            overwrite=False,
            api_name="/caption_images",
        )


def test_settings_lists_every_captioner_present_or_missing(served):
    from sdlora.captioning.captioners import CAPTIONERS, is_present

    text = served.client.predict(api_name="/settings")
    assert "Captioner demo, used by Caption images | present (built in)" in text
    for spec in CAPTIONERS.values():
        if spec.model_class:
            state = "present" if is_present(spec) else f"missing: `{spec.source}`"
            assert f"Captioner {spec.name} | {state}" in text
    assert "onnxruntime" in text


def test_the_estimate_counts_captioning_the_empty_rows(served):
    table = {"headers": ["image", "caption", "bucket"], "data": [["a.png", "", ""], ["b.png", "typed", ""]]}
    text = served.client.predict(
        captions=table, rank=4, alpha=4, steps=100, resolution=0, api_name="/estimate"
    )
    assert "captioning 1 image with demo" in text  # the empty row is what "Caption images" would fill
