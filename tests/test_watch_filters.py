"""ImageFilter: names only, any letter case for extensions, glob patterns for what is never taken."""

from __future__ import annotations

from pathlib import Path

import pytest

from histod.daemon.filters import DEFAULT_IGNORE_PATTERNS, ImageFilter
from histod.settings import IMAGE_EXTENSIONS, load_settings


@pytest.fixture
def image_filter() -> ImageFilter:
    return ImageFilter(IMAGE_EXTENSIONS, DEFAULT_IGNORE_PATTERNS)


@pytest.mark.parametrize(
    "name",
    ["a.png", "A.PNG", "slide.Jpeg", "x.tif", "x.TIFF", "scan.bmp", "with space.jpg", "ünï cödé.png", "new\nline.png"],
)
def test_images_are_taken(image_filter: ImageFilter, name: str) -> None:
    assert image_filter(Path("/watch") / name)


@pytest.mark.parametrize(
    "name",
    [
        ".hidden.png",
        ".png",
        "upload.png.part",
        "upload.part",
        "x.tmp",
        "x.png.tmp",
        "~$lock.png",
        "notes.txt",
        "archive.png.gz",
        "png",
    ],
)
def test_others_are_ignored(image_filter: ImageFilter, name: str) -> None:
    assert not image_filter(Path("/watch") / name)


def test_the_folder_itself_is_not_taken(image_filter: ImageFilter) -> None:
    assert not image_filter(Path())


def test_extensions_are_normalised() -> None:
    image_filter = ImageFilter(["PNG", ".Jpg", ""], [])
    assert image_filter.extensions == (".jpg", ".png")
    assert image_filter(Path("x.JPG")) and image_filter(Path("y.png")) and not image_filter(Path("z.tif"))


def test_patterns_are_configurable() -> None:
    image_filter = ImageFilter([".png"], ["scratch_*"])
    assert not image_filter(Path("scratch_1.png"))
    assert image_filter(Path(".dotted.png"))  # the default patterns no longer apply


def test_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HISTOD_EXTENSIONS", '["PNG"]')
    monkeypatch.setenv("HISTOD_IGNORE_PATTERNS", '["*_draft.png"]')
    image_filter = ImageFilter.from_settings(load_settings())
    assert image_filter.extensions == (".png",)
    assert image_filter(Path("a.PNG")) and not image_filter(Path("a_draft.png")) and not image_filter(Path("a.jpg"))
    assert "ImageFilter(" in repr(image_filter)


def test_in_tree_walks_folders_of_any_name_but_not_ignored_ones() -> None:
    root = Path("/w")
    accept = ImageFilter([".png"])
    assert accept.in_tree(root, root / "case17" / "a.png")
    assert accept.in_tree(root, root / "slides.png" / "deeper" / "a.png")  # a folder named like an image
    assert not accept.in_tree(root, root / ".upload" / "a.png")  # a hidden folder: an upload in progress
    assert not accept.in_tree(root, root / "case17" / "notes.txt")
    assert not accept.in_tree(root, Path("/elsewhere/a.png")) and not accept.in_tree(root, root)
