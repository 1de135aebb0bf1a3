"""Concept uploads for the web app: files and .zip archives unpacked safely within limits."""

from __future__ import annotations

import stat
import zipfile

import pytest
from conftest import draw_concept

from sdlora.errors import ConceptImagesError
from sdlora.ui.uploads import UploadLimits, collect_uploads, read_captions, write_captions


def make_zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_images_and_captions_are_copied_and_zip_folders_flattened(tmp_path):
    image = draw_concept(tmp_path / "a.png", 0)
    archive = make_zip(
        tmp_path / "set.zip",
        {
            "deep/dir/b.png": image.read_bytes(),
            "deep/dir/b.txt": b"bee",
            "__MACOSX/._b.png": b"junk",
            ".hidden.png": b"x",
            "readme.md": b"x",
        },
    )
    images = collect_uploads([str(image), str(archive)], tmp_path / "out")
    assert [p.name for p in images] == ["a.png", "b.png"]
    assert read_captions(images) == ["", "bee"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "b.txt"]


def test_same_names_from_two_uploads_both_survive(tmp_path):
    one, two = tmp_path / "1", tmp_path / "2"
    one.mkdir(), two.mkdir()
    images = collect_uploads(
        [str(draw_concept(one / "x.png", 0)), str(draw_concept(two / "x.png", 3))], tmp_path / "out"
    )
    assert [p.name for p in images] == ["x-1.png", "x.png"]


@pytest.mark.parametrize("name", ["../escape.png", "/abs/olute.png", "C:/win.png", "a/../../b.png"])
def test_zip_member_that_escapes_is_refused(tmp_path, name):
    archive = make_zip(tmp_path / "evil.zip", {name: b"x"})
    with pytest.raises(ConceptImagesError, match="unsafe path"):
        collect_uploads([str(archive)], tmp_path / "out")
    assert not (tmp_path / "escape.png").exists()


def test_zip_symlink_is_skipped(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    assert collect_uploads([str(archive)], tmp_path / "out") == []


def test_size_and_count_limits(tmp_path):
    archive = make_zip(tmp_path / "big.zip", {f"{i}.png": b"\0" * 1000 for i in range(5)})
    with pytest.raises(ConceptImagesError, match="larger than"):
        collect_uploads([str(archive)], tmp_path / "a", UploadLimits(max_file_bytes=999))
    with pytest.raises(ConceptImagesError, match="more than"):
        collect_uploads([str(archive)], tmp_path / "b", UploadLimits(max_total_bytes=4500))
    with pytest.raises(ConceptImagesError, match="too many files"):
        collect_uploads([str(archive)], tmp_path / "c", UploadLimits(max_files=4))


def test_zip_that_lies_about_its_size_is_refused(tmp_path):
    archive = make_zip(tmp_path / "bomb.zip", {"bomb.png": b"\0" * 100_000})
    data = bytearray(archive.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size: claim 10 bytes
        at = data.find(signature) + offset
        data[at : at + 4] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises(ConceptImagesError):
        collect_uploads([str(archive)], tmp_path / "out")


def test_damaged_zip_reads_as_a_message(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ConceptImagesError, match="not a readable .zip"):
        collect_uploads([str(bad)], tmp_path / "out")


def test_edited_captions_are_written_and_empty_ones_fall_back_to_the_template(tmp_path):
    images = [draw_concept(tmp_path / f"{n}.png", 0) for n in "ab"]
    (tmp_path / "b.txt").write_text("old")
    write_captions(images, {"a.png": "  new   caption ", "b.png": ""})
    assert (tmp_path / "a.txt").read_text() == "new caption\n"
    assert not (tmp_path / "b.txt").exists()
