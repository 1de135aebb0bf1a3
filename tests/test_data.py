"""Concept images: every odd file is normalised or reported by name, never fatal to the rest."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from conftest import draw_concept
from PIL import Image

from sdlora.config import DataConfig
from sdlora.errors import ConceptImagesError
from sdlora.training.data import load_concept_images, make_caption


def load_one(folder, name, resolution=32):
    result = load_concept_images(DataConfig(images=str(folder), resolution=resolution))
    assert not result.problems, result.problems
    return next(c for c in result.images if c.path.name == name)


def test_rgba_is_composited_over_white(tmp_path):
    image = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    image.save(tmp_path / "a.png")
    out = load_one(tmp_path, "a.png", resolution=40).image
    assert out.mode == "RGB" and out.getpixel((20, 20)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)


def test_palette_with_transparency_grayscale_cmyk_and_16bit_become_rgb(tmp_path):
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    Image.new("L", (32, 32), 100).save(tmp_path / "l.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16)).save(tmp_path / "i16.png")
    assert load_one(tmp_path, "p.png").image.getpixel((5, 5)) == (255, 255, 255)
    assert load_one(tmp_path, "l.png").image.getpixel((5, 5)) == (100, 100, 100)
    red = load_one(tmp_path, "c.jpg").image.getpixel((5, 5))
    assert red[0] > 200 and red[1] < 60
    assert load_one(tmp_path, "i16.png").image.getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 30), "white")
    image.paste((0, 0, 255), (0, 0, 30, 30))  # blue on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_one(tmp_path, "rot.jpg", resolution=30).image
    top, bottom = out.getpixel((15, 2)), out.getpixel((15, 27))
    assert top[2] > 200 and top[0] < 60 and bottom == pytest.approx((255, 255, 255), abs=30)


def test_first_frame_of_animation_and_resize_crop(tmp_path):
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    out = load_one(tmp_path, "anim.gif", resolution=32).image
    assert out.size == (32, 32)
    r, g, b = out.getpixel((16, 16))
    assert r > 200 and b < 60


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_claiming(width: int, height: int) -> bytes:
    """A tiny file whose header claims a huge image: a decompression bomb's signature."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def test_each_broken_file_is_reported_by_name_and_the_rest_train(tmp_path):
    for i in range(2):
        draw_concept(tmp_path / f"good{i}.png", i)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[:80])
    (tmp_path / "notimage.jpg").write_text("this is text, not a JPEG")
    (tmp_path / "bomb.png").write_bytes(_png_header_claiming(30000, 30000))
    (tmp_path / "layers.psd").write_bytes(b"8BPS")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    result = load_concept_images(DataConfig(images=str(tmp_path), resolution=32))
    assert [c.path.name for c in result.images] == ["good0.png", "good1.png"]
    reasons = {p.path.name: p.reason for p in result.problems}
    assert set(reasons) == {"truncated.png", "notimage.jpg", "bomb.png", "layers.psd"}
    assert "truncated" in reasons["truncated.png"] or "damaged" in reasons["truncated.png"]
    assert "too large" in reasons["bomb.png"]
    assert "unsupported file type" in reasons["layers.psd"]


def test_no_usable_image_is_one_clear_error(tmp_path):
    (tmp_path / "a.jpg").write_text("nope")
    with pytest.raises(ConceptImagesError, match="a.jpg: not a readable image"):
        load_concept_images(DataConfig(images=str(tmp_path)))
    with pytest.raises(ConceptImagesError, match="does not exist"):
        load_concept_images(DataConfig(images=str(tmp_path / "missing")))


def test_captions_trigger_word_and_template(tmp_path):
    assert make_caption(None, "sks", "a photo of {trigger} dog") == "a photo of sks dog"
    assert make_caption("a dog on grass", "sks", "{trigger}") == "sks, a dog on grass"
    assert make_caption("sks dog on grass", "sks", "{trigger}") == "sks dog on grass"
    draw_concept(tmp_path / "x.png", 0)
    (tmp_path / "x.txt").write_text("  a red\n circle ")
    result = load_concept_images(DataConfig(images=str(tmp_path), trigger_word="ohwx", resolution=32))
    assert result.images[0].caption == "ohwx, a red circle"


def test_explicit_file_list(tmp_path):
    paths = [draw_concept(tmp_path / f"f{i}.png", i) for i in range(3)]
    result = load_concept_images(DataConfig(images="", resolution=32), files=paths[:2])
    assert len(result.images) == 2
