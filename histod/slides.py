"""Read microscope fields and whole-slide images at the model's scale, and classify them tile by tile.

    reader = open_reader(path)                       # ImageReader (PIL, in memory) or SlideReader (OpenSlide)
    outcome = classify(reader, engine.predict, tiling.Scale.of(run_info))
    # -> Whole(image at the model's input, warnings): about one tile, classify it as trained
    # -> tiling.TiledResult(aggregate, every tile's x, y, p, tissue, warnings, thumbnail): a tiled image

Two backends behind one :class:`Reader`: :class:`ImageReader` decodes a field with histod.imaging (its byte and
pixel limits, EXIF orientation, colour rules) and holds it in memory; :class:`SlideReader` reads .svs, .ndpi,
.mrxs, .scn and pyramidal tiled .tif through OpenSlide (``pip install 'histod[slides]'``), one block of tiles at a
time, so memory stays bounded whatever the slide's size. The level is the coarsest one still at least as fine as
the model's microns per pixel. A slide that cannot be read raises :class:`~histod.errors.ImageError`.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from histod import imaging, tiling
from histod.errors import ImageError
from histod.logs import get_logger

_log = get_logger("histod.slides")

SLIDE_ONLY = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
"""Extensions only OpenSlide reads; .tif/.tiff go to OpenSlide when it finds a tiled slide in them."""
TIFF = (".tif", ".tiff")
BLOCK_PX = 2048
"""Tiles are read in blocks of about this many pixels a side: the unit of memory when streaming a slide."""
MAX_TILES = 4_000_000
THUMBNAIL_PX = 1024
"""The longer side of the thumbnail kept with a tiled result, for the heat-map."""


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

    @abstractmethod
    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        """RGB (height, width, 3) of a box at ``level``; white where the box runs past the image."""

    def thumbnail(self, width: int, height: int) -> NDArray[np.uint8]:
        """The whole image at ``width`` x ``height``, read from the best level strip by strip."""
        from PIL import Image

        w0, h0 = self.dimensions
        level = _best_level(self.level_downsamples, min(w0 / width, h0 / height))
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
    """A field decoded whole by histod.imaging at its native size (one level)."""

    backend = "image"

    def __init__(self, data: bytes, name: str, *, max_pixels: int = imaging.DEFAULT_MAX_PIXELS) -> None:
        self.data = data
        self.name = name
        self.image = imaging.decode(data, None, max_pixels=max_pixels, name=name)

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


def _best_level(downsamples: tuple[float, ...], wanted: float) -> int:
    """The coarsest level whose downsample is at most ``wanted`` (level 0 if none)."""
    fits = [i for i, d in enumerate(downsamples) if d <= wanted * 1.01]
    return max(fits, key=lambda i: downsamples[i]) if fits else 0


def open_reader(
    path: Path,
    *,
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
    max_bytes: int = imaging.DEFAULT_MAX_BYTES,
    follow_symlinks: bool = True,
) -> Reader:
    """A reader for ``path``: OpenSlide for slide formats and tiled TIFFs, else the file decoded in memory."""
    suffix = path.suffix.lower()
    if suffix in SLIDE_ONLY or suffix in TIFF:
        openslide = _openslide()
        if openslide is None and suffix in SLIDE_ONLY:
            raise ImageError(
                "unsupported", f"{path} is a whole-slide image: install the slides extra (pip install 'histod[slides]')"
            )
        if openslide is not None:
            _check_file(path, follow_symlinks)
            try:
                vendor = openslide.OpenSlide.detect_format(path)
            except openslide.OpenSlideError as exc:
                raise ImageError("corrupt", f"{path}: {exc}") from exc
            if vendor is not None:
                return SlideReader(path)
            if suffix in SLIDE_ONLY:
                raise ImageError("corrupt", f"{path} is not a slide OpenSlide can read")
    data = imaging.read_file(path, max_bytes=max_bytes, follow_symlinks=follow_symlinks)
    return ImageReader(data, str(path), max_pixels=max_pixels)


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


# --- classifying at the model's scale ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Where the tiles are read: ``grid`` is in ``level``'s pixels, one tile = ``side`` of them."""

    level: int
    downsample: float
    grid: tiling.Grid

    @property
    def side0(self) -> float:
        """A tile's side in level-0 pixels."""
        return self.grid.side * self.downsample


def plan(reader: Reader, scale: tiling.Scale) -> tuple[Plan | None, list[str]]:
    """How ``reader``'s image meets the model's scale: a tiling plan, or None to classify it whole; and the
    warnings that say where the scales do not match."""
    w0, h0 = reader.dimensions
    warnings: list[str] = []
    if scale.tile_px is None:
        if max(w0, h0) > 2 * scale.image_size:
            warnings.append(
                f"scale_unknown: the model does not record its tile size; the {w0}x{h0} image was resized whole "
                f"to {scale.image_size}x{scale.image_size}"
            )
        return None, warnings
    ratio = 1.0  # level-0 pixels per pixel of the model's training tiles
    if reader.mpp is not None and scale.tile_mpp is not None:
        ratio = scale.tile_mpp / reader.mpp
    elif reader.mpp is not None:
        warnings.append(
            f"mpp_unknown_model: the image is {reader.mpp:.3g} µm/px but the model's µm/px is unknown "
            "(train with --tile-mpp): tiles are cut at its base level"
        )
    elif scale.tile_mpp is not None:
        warnings.append(
            f"mpp_unknown_image: the image declares no µm/px; it is taken to be the model's {scale.tile_mpp:.3g}"
        )
    side0 = scale.tile_px * ratio
    if not tiling.should_tile(w0, h0, side0):
        if max(w0, h0) * tiling.TILE_FACTOR < side0:
            warnings.append(
                f"smaller_than_tile: the {w0}x{h0} image is smaller than the model's {side0:.0f} px tile; "
                "it was enlarged to the model's input"
            )
        return None, warnings
    if ratio < 1 / 1.1:
        warnings.append(
            f"coarser_than_model: the image's {reader.mpp:.3g} µm/px is coarser than the model's "
            f"{scale.tile_mpp:.3g}: its tiles are enlarged"
        )
    level = _best_level(reader.level_downsamples, ratio)
    downsample = reader.level_downsamples[level]
    lw, lh = reader.level_dimensions[level]
    grid = tiling.Grid(lw, lh, max(1, round(side0 / downsample)))
    if len(grid) > MAX_TILES:
        raise ImageError("too_many_pixels", f"{reader.name}: {len(grid)} tiles, above the limit of {MAX_TILES}")
    return Plan(level, downsample, grid), warnings


@dataclass(frozen=True)
class Whole:
    """An image about one tile's size: classified whole, as the model was trained."""

    image: NDArray[np.uint8]
    warnings: tuple[str, ...] = ()


class StoppedError(Exception):
    """``stop()`` said to stop before every tile was classified: nothing of the image is returned."""


def classify(
    reader: Reader,
    predict: tiling.Predictor,
    scale: tiling.Scale,
    *,
    rule: tiling.Rule = tiling.DEFAULT_RULE,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Whole | tiling.TiledResult:
    """Classify ``reader``'s image at the model's scale: whole (returned for the caller to batch) or tile by tile.

    Raises ImageError("no_tissue") when a tiled image holds no tissue tile, and :class:`StoppedError` when
    ``stop()`` turns true between batches.
    """
    started = time.monotonic()
    the_plan, warnings = plan(reader, scale)
    if the_plan is None:
        return Whole(_whole(reader, scale.image_size), tuple(warnings))
    grid = the_plan.grid
    for text in warnings:
        _log.warning("tiles.scale", name=reader.name, warning=text)
    per_tile = tiling.mask_pixels_per_tile(grid)
    w0, h0 = reader.dimensions
    small, picture = _thumbnails(
        reader, (max(1, round(grid.width * per_tile / grid.side)), max(1, round(grid.height * per_tile / grid.side)))
    )
    mask, _ = tiling.tissue_mask(small)
    shares = tiling.tissue_shares(mask, grid)
    chosen = np.flatnonzero(shares >= tiling.MIN_TISSUE)
    if chosen.size == 0:
        raise ImageError("no_tissue", f"{reader.name}: no tissue in its {len(grid)} tiles of {the_plan.side0:.0f} px")
    p = np.full(chosen.size, np.nan, dtype=np.float32)
    done, last_log = 0, started
    tiles = _stream(reader, the_plan, chosen)
    for indices, probs in tiling.predict_batches(tiles, predict, scale.image_size, batch_size):
        p[np.searchsorted(chosen, indices)] = probs
        done += len(indices)
        if progress is not None:
            progress(done, int(chosen.size))
        if time.monotonic() - last_log >= 10:
            last_log = time.monotonic()
            _log.info("tiles.progress", name=reader.name, done=done, total=int(chosen.size))
        if stop is not None and done < chosen.size and stop():
            raise StoppedError(f"{reader.name}: stopped after {done} of {chosen.size} tiles")
    area = shares[chosen] * the_plan.side0**2
    origins = np.round(grid.origins(chosen) * the_plan.downsample).astype(np.int64)
    return tiling.TiledResult(
        aggregate=tiling.aggregate(p, area, scale.threshold, rule),
        x=origins[:, 0],
        y=origins[:, 1],
        p=p,
        tissue=shares[chosen],
        width=w0,
        height=h0,
        tile_side=the_plan.side0,
        level=the_plan.level,
        n_tiles=len(grid),
        backend=reader.backend,
        mpp=reader.mpp,
        warnings=tuple(warnings),
        thumbnail=picture,
        seconds=time.monotonic() - started,
    )


def _stream(reader: Reader, the_plan: Plan, chosen: NDArray[np.int64]) -> Iterator[tuple[int, NDArray[np.uint8]]]:
    """The chosen tiles, read one block of tiles at a time (block by block, row-major inside a block)."""
    grid = the_plan.grid
    per_block = max(1, BLOCK_PX // grid.side)
    rows, cols = chosen // grid.cols, chosen % grid.cols
    block_of = (rows // per_block) * math.ceil(grid.cols / per_block) + cols // per_block
    order = np.argsort(block_of, kind="stable")
    start = 0
    while start < order.size:
        block = block_of[order[start]]
        end = start
        while end < order.size and block_of[order[end]] == block:
            end += 1
        members = order[start:end]
        r0, c0 = rows[members].min() // per_block * per_block, cols[members].min() // per_block * per_block
        r1, c1 = rows[members].max() + 1, cols[members].max() + 1
        x, y, side = c0 * grid.side, r0 * grid.side, grid.side
        pixels = reader.read(the_plan.level, x, y, (c1 - c0) * side, (r1 - r0) * side)
        for i in members:
            ty, tx = (rows[i] - r0) * side, (cols[i] - c0) * side
            yield int(chosen[i]), pixels[ty : ty + side, tx : tx + side]
        start = end


def _whole(reader: Reader, size: int) -> NDArray[np.uint8]:
    if isinstance(reader, ImageReader):  # exactly the path a tile-sized file always took
        return imaging.decode(reader.data, size, name=reader.name)
    return reader.thumbnail(size, size)


def _thumbnails(reader: Reader, mask_size: tuple[int, int]) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """The image at ``mask_size`` (for the tissue mask) and at about THUMBNAIL_PX on its longer side, never above
    the image's own size (for the heat-map): one read of the image, the smaller made from the larger."""
    from PIL import Image

    w0, h0 = reader.dimensions
    factor = min(1.0, THUMBNAIL_PX / max(w0, h0))
    picture_size = (max(1, round(w0 * factor)), max(1, round(h0 * factor)))
    if picture_size[0] >= mask_size[0]:
        picture = reader.thumbnail(*picture_size)
        return np.asarray(Image.fromarray(picture).resize(mask_size, Image.Resampling.BOX)), picture
    small = reader.thumbnail(*mask_size)
    return small, np.asarray(Image.fromarray(small).resize(picture_size, Image.Resampling.BOX))
