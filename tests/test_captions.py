"""Captions written for the user: the options every captioner honours, the demo captioner, the CLI verb."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from sdlora.assets import DEMO_MODEL
from sdlora.captioning.captioners import default_captioner, load_captioner, spec_of
from sdlora.captioning.captions import CaptionOptions, caption_images, finish_caption, write_caption_files
from sdlora.demo.captioner import DemoCaptioner, describe, every_kind_of_scene
from sdlora.demo.shapes import (
    BACKGROUNDS,
    BASE_COLOURS,
    make_scene,
    render,
)
from sdlora.errors import ConfigError
from sdlora.events import StopFlag

STAR_FOLDER = DEMO_MODEL.parent / "concepts" / "star"


def test_demo_captioner_names_colour_shape_and_background_of_new_images():
    scenes = every_kind_of_scene(seed=2026)
    assert len(scenes) >= 200
    right = textures = 0
    for scene in scenes:
        words = describe(render(scene))
        right += (
            f" {scene.colour} " in words
            and f" {scene.shape} " in words
            and words.endswith(f"on a {scene.background} background")
        )
        textures += words == scene.caption()
    assert right / len(scenes) >= 0.95, right / len(scenes)
    assert textures / len(scenes) >= 0.95  # the whole caption, texture included, as the generator wrote it


def test_demo_captioner_reads_any_size_and_says_when_nothing_is_drawn():
    scene = make_scene(
        np.random.default_rng(1), ("square",), {"red": BASE_COLOURS["red"]}, {"black": BACKGROUNDS["black"]}
    )
    big = render(scene).resize((256, 256), Image.Resampling.NEAREST)
    assert describe(big) == "a red square on a black background"
    assert describe(Image.new("RGB", (64, 64), BACKGROUNDS["gray"])) == "a plain gray background"


def test_finish_caption_puts_prefix_first_drops_words_and_cuts_length():
    raw = "a red star on a white background"
    assert finish_caption(raw, CaptionOptions(prefix="sks")) == "sks, a red star on a white background"
    assert finish_caption("sks, a star", CaptionOptions(prefix="sks")) == "sks, a star"  # not twice
    assert finish_caption(raw, CaptionOptions(drop_words=("star",))) == "a red on a white background"
    assert (
        finish_caption("a photo of Star, smiling", CaptionOptions(drop_words=("star",)))
        == "a photo of, smiling"
    )
    assert finish_caption(raw, CaptionOptions(max_words=3, prefix="sks")) == "sks, a red star"
    assert finish_caption("   ", CaptionOptions(prefix="sks")) == "sks"


class Recorder:
    """A captioner that remembers its batches, to check what caption_images asks of it."""

    name = "recorder"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def caption(self, images):
        self.batches.append(len(images))
        return [f"image {image.size[0]} wide" for image in images]


@pytest.fixture()
def folder(tmp_path):
    for index in range(5):
        Image.new("RGB", (16 + index, 16), (index * 40, 0, 0)).save(tmp_path / f"img{index}.png")
    (tmp_path / "img1.txt").write_text("my own words\n")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "notes.md").write_text("not an image")
    return tmp_path


def test_fill_empty_only_keeps_existing_captions_and_reports_unreadable_files(folder):
    recorder = Recorder()
    events = []
    result = caption_images(
        recorder, sorted(folder.iterdir()), CaptionOptions(batch_size=2), on_caption=events.append
    )
    assert sorted(p.name for p in result.captions) == ["img0.png", "img2.png", "img3.png", "img4.png"]
    assert [p.name for p in result.kept] == ["img1.png"]
    assert [p.path.name for p in result.problems] == ["broken.jpg"]
    assert recorder.batches == [2, 2]
    assert [(e.done, e.total) for e in events] == [(1, 5), (2, 5), (3, 5), (4, 5)]
    written = write_caption_files(result)
    assert (folder / "img1.txt").read_text() == "my own words\n"
    assert (folder / "img3.txt").read_text() == "image 19 wide\n"
    assert len(written) == 4 and not list(folder.glob(".*.tmp"))
    line = result.summary()
    assert "captioned 4 images" in line and "kept 1 existing caption" in line and "broken.jpg" in line
    assert "\n" not in line


def test_overwrite_replaces_every_caption_and_existing_mapping_wins_over_files(folder):
    images = sorted(folder.glob("img*.png"))
    result = caption_images(Recorder(), images, CaptionOptions(overwrite=True, prefix="sks"))
    assert len(result.captions) == 5 and result.captions[folder / "img1.png"] == "sks, image 17 wide"
    # The app passes the caption table as it stands: a caption typed there counts even before it is saved.
    typed = {path: "" for path in images} | {images[0]: "typed in the table"}
    result = caption_images(Recorder(), images, CaptionOptions(), existing=typed)
    assert images[0] not in result.captions and images[1] in result.captions


def test_stop_keeps_what_was_captioned(folder):
    stop = StopFlag()
    recorder = Recorder()

    def stop_after_first(event):
        stop.request()

    result = caption_images(
        recorder,
        sorted(folder.glob("img*.png")),
        CaptionOptions(batch_size=1, overwrite=True),
        on_caption=stop_after_first,
        stop=stop,
    )
    assert result.stopped and len(result.captions) == 1 and recorder.batches == [1]


def test_captioner_registry_defaults_to_demo_for_the_demo_model(tmp_path):
    assert default_captioner(str(DEMO_MODEL)) == "demo"
    copied = tmp_path / "my-demo"
    shutil.copytree(DEMO_MODEL, copied)  # recognised by its marker wherever it is copied
    assert default_captioner(str(copied)) == "demo"
    assert isinstance(load_captioner("demo"), DemoCaptioner)
    with pytest.raises(ConfigError, match="unknown captioner 'wd15'.*demo"):
        spec_of("wd15")


def test_cli_caption_writes_missing_captions_and_leaves_existing_ones(tmp_path, capsys):
    from sdlora.cli import main

    folder = tmp_path / "star"
    shutil.copytree(STAR_FOLDER, folder)
    hand = {p.stem: p.read_text() for p in folder.glob("*.txt")}
    for caption in folder.glob("*.txt"):
        caption.unlink()
    (folder / "star_03.txt").write_text("kept as written\n")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(["caption", "--images", str(folder), "--prefix", "sks"]) == 0
    out, err = capsys.readouterr()
    assert "captioner: demo" in out and "bad.png" in err
    assert (folder / "star_03.txt").read_text() == "kept as written\n"
    for stem, text in hand.items():
        if stem != "star_03":
            assert (folder / f"{stem}.txt").read_text() == f"sks, {text}"  # the hand captions, trigger first
    assert not (folder / "bad.txt").exists()
    assert main(["caption", "--images", str(folder / "nowhere")]) == 2
    assert "nowhere is not a folder" in capsys.readouterr().err
