"""Images and whole-slide images behind one interface: levels, their downsamples, µm/px, ``read(level, x, y, w,
h)`` and ``thumbnail(w, h)``.

    with open_reader(path) as reader:                # judged by content, not by name
        reader.longest_side(), reader.level_dimensions, reader.mpp

:class:`ImageReader` reads an image file through histod.imaging (PNG, JPEG, TIFF, BMP by content; its byte and
pixel limits, EXIF orientation and colour rules), from its header until pixels are asked for, then held in
memory. :class:`SlideReader` reads .svs, .ndpi, .mrxs, .scn and tiled pyramidal TIFFs (under any name) through
OpenSlide (the ``slides`` extra: ``pip install 'histod[slides]'``), one box at a time, so memory stays bounded
whatever the slide's size. Every failure is an :class:`~histod.errors.ImageError` with a reason, like any bad
image. Classifying a reader's image at a model's scale is histod.slides.
"""

from __future__ import annotations

import errno
import os
import stat
from abc import ABC, abstractmethod
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from histod import imaging
from histod.errors import ImageError

SLIDE_ONLY = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
"""Extensions only OpenSlide reads; any other file goes to OpenSlide when its content is a TIFF OpenSlide
recognises (a tiled pyramidal one)."""
SINGLE_FILE_SLIDES = (".svs", ".ndpi", ".scn", ".bif", ".svslide")
"""The slide formats held in one file: what the service takes from its watch folder by default. A MIRAX (.mrxs)
or Hamamatsu .vms/.vmu slide is a file plus a folder of data files, which a move of the one file would split."""
BLOCK_PX = 2048
"""Boxes are read about this many pixels a side at most: the unit of memory when streaming a slide."""


class Reader(ABC):
    """An image at one or more levels (level 0 = full resolution); coordinates are in a level's pixels."""

    backend: str
    name: str
    mpp: float | None = None
    """microns per pixel at level 0, when the file declares it"""

    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]: ...

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def longest_side(self) -> int:
        """The longer side of level 0, in pixels: all it takes to know whether the image is tiled."""
        return max(self.dimensions)

    @abstractmethod
    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        """RGB (height, width, 3) of a box at ``level``; white where the box runs past the image."""

    def thumbnail(self, width: int, height: int) -> NDArray[np.uint8]:
        """The whole image at ``width`` x ``height``, read from the best level strip by strip."""
        from PIL import Image

        w0, h0 = self.dimensions
        level = best_level(self.level_downsamples, min(w0 / width, h0 / height))
        lw, lh = self.level_dimensions[level]
        out = np.empty((height, width, 3), dtype=np.uint8)
        rows_per_strip = max(1, (BLOCK_PX * BLOCK_PX) // max(1, lw))
        done = 0
        for top in range(0, lh, rows_per_strip):
            bottom = min(lh, top + rows_per_strip)
            target = height if bottom == lh else round(bottom * height / lh)
            if target > done:
                strip = Image.fromarray(self.read(level, 0, top, lw, bottom - top))
                out[done:target] = np.asarray(strip.resize((width, target - done), Image.Resampling.BOX))
                done = target
        return out

    def close(self) -> None:  # noqa: B027 - a reader with nothing to release keeps this
        """Release the file."""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class ImageReader(Reader):
    """An image file (PNG, JPEG, TIFF, BMP, judged by content) decoded by histod.imaging at its native size (one
    level) when first read: its header is all an image of about one tile needs, which is then decoded once, at
    the model's input, exactly as a tile file always is (:class:`Whole`)."""

    backend = "image"

    def __init__(self, data: bytes, name: str, *, max_pixels: int = imaging.DEFAULT_MAX_PIXELS) -> None:
        self.data = data
        self.name = name
        self.max_pixels = max_pixels
        self._longest = imaging.longest_side(data, max_pixels=max_pixels, name=name)
        self._image: NDArray[np.uint8] | None = None

    @property
    def image(self) -> NDArray[np.uint8]:
        """The decoded image (H, W, 3) at its native size (EXIF orientation applied)."""
        if self._image is None:
            self._image = imaging.decode(self.data, None, max_pixels=self.max_pixels, name=self.name)
        return self._image

    def longest_side(self) -> int:
        return self._longest

    def whole(self, size: int) -> NDArray[np.uint8]:
        """The image at the model's input: histod.imaging.decode, the path every tile file takes."""
        return imaging.decode(self.data, size, max_pixels=self.max_pixels, name=self.name)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return ((self.image.shape[1], self.image.shape[0]),)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        piece = self.image[max(0, y) : y + height, max(0, x) : x + width]
        if piece.shape[:2] == (height, width):
            return piece
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        out[max(0, -y) : max(0, -y) + piece.shape[0], max(0, -x) : max(0, -x) + piece.shape[1]] = piece
        return out

    def thumbnail(self, width: int, height: int) -> NDArray[np.uint8]:
        from PIL import Image

        return np.asarray(Image.fromarray(self.image).resize((width, height), Image.Resampling.BOX), dtype=np.uint8)


class SlideReader(Reader):
    """A whole-slide image through OpenSlide (the ``slides`` extra)."""

    backend = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self.name = str(path)
        try:
            self._slide = openslide.OpenSlide(path)
            self._levels = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
            self._downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise ImageError("not_an_image", f"{path} is not a slide OpenSlide can read") from exc
        except openslide.OpenSlideError as exc:
            raise ImageError("corrupt", f"{path}: OpenSlide cannot read the slide ({exc})") from exc
        self.mpp = _mpp(self._slide.properties)
        self._error: type[Exception] = openslide.OpenSlideError

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._levels

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        from PIL import Image

        d = self._downsamples[level]
        try:
            rgba = self._slide.read_region((round(x * d), round(y * d)), level, (width, height))
        except self._error as exc:
            raise ImageError("corrupt", f"{self.name}: cannot read level {level} at {x},{y}: {exc}") from exc
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # unscanned areas are transparent: glass
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)

    def close(self) -> None:
        self._slide.close()


def _mpp(properties: Any) -> float | None:
    try:
        x, y = float(properties["openslide.mpp-x"]), float(properties["openslide.mpp-y"])
    except (KeyError, ValueError, TypeError):
        return None
    return (x + y) / 2 if x > 0 and y > 0 else None


def best_level(downsamples: tuple[float, ...], wanted: float) -> int:
    """The coarsest level whose downsample is at most ``wanted`` (level 0 if none)."""
    fits = [i for i, d in enumerate(downsamples) if d <= wanted * 1.01]
    return max(fits, key=lambda i: downsamples[i]) if fits else 0


def is_slide(path: Path) -> bool:
    """Whether ``path`` is named like a format only OpenSlide reads (.svs, .ndpi, .mrxs, ...): how a folder's
    slide files are found beside its image files. A file itself is judged by content (:func:`open_reader`)."""
    return path.suffix.lower() in SLIDE_ONLY and not path.name.startswith(".")


def read_by_openslide(path: Path) -> bool:
    """Whether :func:`open_reader` would hand ``path`` to OpenSlide (or refuse it for want of the slides extra),
    judged cheaply for the service's intake: a slide-only name, or a .tif/.tiff OpenSlide recognises; any other
    name is an image file, read into memory (a TIFF under another name, or a pyramidal TIFF without the extra,
    is refused by its size limits there with their reasons)."""
    suffix = path.suffix.lower()
    if suffix in SLIDE_ONLY:
        return True
    if suffix not in imaging.FORMATS["TIFF"]:
        return False
    openslide = _openslide()
    if openslide is None or not _starts_like_tiff(path, follow_symlinks=False):
        return False
    try:
        return openslide.OpenSlide.detect_format(path) is not None
    except openslide.OpenSlideError:
        return False


def open_reader(
    path: Path,
    *,
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
    max_bytes: int = imaging.DEFAULT_MAX_BYTES,
    follow_symlinks: bool = True,
) -> Reader:
    """A reader for ``path``, judged by content: a slide OpenSlide recognises (a vendor format, or a tiled
    pyramidal TIFF under any name) is read through it, block by block; any other file goes through
    histod.imaging (PNG, JPEG, TIFF, BMP by content, with its byte and pixel limits). A file named like a
    slide-only format needs the slides extra and must be a slide."""
    named_slide = path.suffix.lower() in SLIDE_ONLY
    openslide = _openslide()
    if openslide is None and named_slide:
        raise ImageError(
            "unsupported", f"{path} is a whole-slide image: install the slides extra (pip install 'histod[slides]')"
        )
    if openslide is not None and (named_slide or _starts_like_tiff(path, follow_symlinks)):
        _check_file(path, follow_symlinks)
        try:
            vendor = openslide.OpenSlide.detect_format(path)
        except openslide.OpenSlideError as exc:
            raise ImageError("corrupt", f"{path}: {exc}") from exc
        if vendor is not None:
            return SlideReader(path)
        if named_slide:
            raise ImageError("corrupt", f"{path} is not a slide OpenSlide can read")
    try:
        data = imaging.read_file(path, max_bytes=max_bytes, follow_symlinks=follow_symlinks)
        return ImageReader(data, str(path), max_pixels=max_pixels)
    except ImageError as exc:
        too_big = exc.reason in ("too_large", "too_many_pixels")
        if openslide is None and too_big and _starts_like_tiff(path, follow_symlinks):
            raise ImageError(
                exc.reason,
                f"{exc.args[0]}; a whole-slide TIFF is read tile by tile through OpenSlide: install the slides "
                "extra (pip install 'histod[slides]')",
            ) from exc
        raise


def _starts_like_tiff(path: Path, follow_symlinks: bool) -> bool:
    """Whether the file's first bytes are a TIFF's (what OpenSlide's tiled formats are built on). Any problem
    opening it is for the reader that follows to report."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
        try:
            head = os.read(fd, 8) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        finally:
            os.close(fd)
    except OSError:
        return False
    return imaging.signature(head) == "TIFF"


def _openslide() -> ModuleType | None:
    """The openslide module, or None when the slides extra is not installed."""
    try:
        import openslide
    except ImportError:
        return None
    return openslide


def _check_file(path: Path, follow_symlinks: bool) -> None:
    """The checks histod.imaging.read_file makes, for a file OpenSlide opens itself."""
    try:
        st = path.stat() if follow_symlinks else path.lstat()
    except FileNotFoundError as exc:
        raise ImageError("missing", f"{path} does not exist") from exc
    except PermissionError as exc:
        raise ImageError("unreadable", f"permission denied reading {path}") from exc
    except OSError as exc:
        reason = "symlink" if exc.errno == errno.ELOOP else "unreadable"
        raise ImageError(reason, f"cannot open {path}: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise ImageError("symlink", f"{path} is a symbolic link; links are not followed")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not_a_file", f"{path} is not a regular file")
    if st.st_size == 0:
        raise ImageError("empty", f"{path} is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ImageError("unreadable", f"permission denied reading {path}")
