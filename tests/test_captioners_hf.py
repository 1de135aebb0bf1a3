"""Transformers captioners (BLIP, Florence-2) on tiny random models saved like hub checkpoints: no download."""

from __future__ import annotations

import pytest
from PIL import Image
from tiny_captioners import save_tiny_blip, save_tiny_florence2

from sdlora.captioning import captioners
from sdlora.captioning.captioners import BLIP, default_captioner, is_present, load_captioner, spec_of
from sdlora.captioning.captions import CaptionOptions, caption_images, write_caption_files
from sdlora.errors import ModelLoadError

BUILDERS = {"blip": save_tiny_blip, "florence-2": save_tiny_florence2}


@pytest.fixture(scope="module")
def tiny_captioner_folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("captioners")
    return {name: str(build(root / name)) for name, build in BUILDERS.items()}


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "concept"
    folder.mkdir()
    for index, size in enumerate([(40, 30), (20, 50), (64, 64), (33, 33)]):
        Image.new("RGB", size, (60 * index, 200 - 40 * index, 90)).save(folder / f"img{index}.png")
    (folder / "img2.txt").write_text("my own words\n")
    return sorted(folder.glob("*.png"))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_transformers_captioner_from_a_local_folder_writes_finished_captions(
    name, tiny_captioner_folders, images
):
    folder = tiny_captioner_folders[name]
    assert is_present(spec_of(name), folder)
    captioner = load_captioner(name, device="cpu", source=folder)
    assert captioner.name == name
    raw = captioner.caption([Image.open(images[0]).convert("RGB"), Image.open(images[1]).convert("RGB")])
    assert len(raw) == 2 and all(isinstance(text, str) and text.strip() for text in raw)

    result = caption_images(captioner, images, CaptionOptions(prefix="sks", batch_size=2))
    assert [p.name for p in result.kept] == ["img2.png"]  # fill-empty-only: the hand caption stays
    assert sorted(p.name for p in result.captions) == ["img0.png", "img1.png", "img3.png"]
    for caption in result.captions.values():
        assert caption.startswith("sks, ") and len(caption) > len("sks, ")
    write_caption_files(result)
    assert images[2].with_suffix(".txt").read_text() == "my own words\n"
    for image in (images[0], images[1], images[3]):
        assert image.with_suffix(".txt").read_text() == result.captions[image] + "\n"

    again = caption_images(captioner, images, CaptionOptions(overwrite=True, max_words=3))
    assert len(again.captions) == 4 and all(len(c.split()) <= 3 for c in again.captions.values())


def test_a_hub_id_missing_from_the_cache_offline_is_one_error_saying_how_to_fetch_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = "sdlora-tests/no-such-captioner"
    assert not is_present(BLIP, missing)
    with pytest.raises(ModelLoadError) as caught:
        load_captioner("blip", device="cpu", source=missing)
    message = str(caught.value)
    assert "\n" not in message
    assert f"captioner blip model {missing} is not in the local Hugging Face cache" in message
    assert f"huggingface-cli download {missing}" in message and "--captioner-model" in message


def test_a_folder_of_another_kind_or_no_folder_is_refused_by_name(tiny_captioner_folders, tmp_path):
    with pytest.raises(ModelLoadError, match="holds a florence2 model, not blip"):
        load_captioner("blip", device="cpu", source=tiny_captioner_folders["florence-2"])
    with pytest.raises(ModelLoadError, match="is not a folder on this machine"):
        load_captioner("florence-2", device="cpu", source=str(tmp_path / "nowhere"))


def test_default_captioner_is_the_first_one_present(monkeypatch):
    monkeypatch.setattr(
        captioners, "is_present", lambda spec, source=None: spec is BLIP or not spec.model_class
    )
    assert default_captioner("some-org/some-model") == "blip"
    monkeypatch.setattr(captioners, "is_present", lambda spec, source=None: not spec.model_class)
    assert default_captioner("some-org/some-model") == next(n for n in captioners.CAPTIONERS if n != "demo")


def test_cli_captions_with_a_local_model_folder_and_names_a_missing_one(
    tiny_captioner_folders, images, capsys
):
    from sdlora.cli import main

    folder = images[0].parent
    assert (
        main(
            [
                "caption",
                "--images",
                str(folder),
                "--captioner-model",
                tiny_captioner_folders["florence-2"],
                "--prefix",
                "sks",
                "--batch-size",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "captioner: florence-2" in out and "captioned 3 images, kept 1 existing caption" in out
    assert (folder / "img0.txt").read_text().startswith("sks, ")
    assert (
        main(
            [
                "caption",
                "--images",
                str(folder),
                "--captioner",
                "blip",
                "--captioner-model",
                "sdlora-tests/no-such-captioner",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: captioner blip model sdlora-tests/no-such-captioner") and "\n" not in err
