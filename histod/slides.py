"""Classify an image or a whole-slide image at the model's scale: whole, or tile by tile.

    with readers.open_reader(path) as reader:
        outcome = classify(reader, classifier.predict, tiling.Scale.of(run_info))
    # -> Whole(image at the model's input, warnings): about one tile, classify it as trained
    # -> tiling.TiledResult(aggregate, every tile's x, y, p, tissue, warnings, thumbnail): a tiled image

:func:`plan` picks the level (the coarsest one still at least as fine as the model's microns per pixel) and the
tile grid, or says "whole", and lists every scale mismatch as a warning. :func:`classify` finds tissue on one
thumbnail, reads the tissue tiles one block at a time (histod.readers), classifies them in batches with the
caller's predictor (the service classifier's ``predict``) and aggregates them (histod.tiling).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from histod import tiling
from histod.errors import ImageError
from histod.logs import get_logger
from histod.readers import BLOCK_PX, ImageReader, Reader, best_level

_log = get_logger("histod.slides")

MAX_TILES = 4_000_000
THUMBNAIL_PX = 1024
"""The longer side of the thumbnail kept with a tiled result, for the heat-map."""
PROGRESS_EVERY_S = 10.0
"""How often a tiled image's progress (``tiles.progress``: tiles done / total) goes to the log."""


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


def judge(longest: int, mpp: float | None, scale: tiling.Scale) -> tuple[float | None, list[str]]:
    """How an image whose longer side is ``longest`` level-0 pixels, at ``mpp`` µm/px (None: not declared), meets
    the model's scale: the side of one tile in level-0 pixels (None: classify it whole), and the warnings that
    say where the scales do not match. Needs only the image's header."""
    warnings: list[str] = []
    if scale.tile_px is None:
        if longest > 2 * scale.image_size:
            warnings.append(
                f"scale_unknown: the model does not record its tile size; the image ({longest} px on its longer "
                f"side) was resized whole to {scale.image_size}x{scale.image_size}"
            )
        return None, warnings
    ratio = 1.0  # level-0 pixels per pixel of the model's training tiles
    if mpp is not None and scale.tile_mpp is not None:
        ratio = scale.tile_mpp / mpp
    elif mpp is not None:
        warnings.append(
            f"mpp_unknown_model: the image is {mpp:.3g} µm/px but the model's µm/px is unknown "
            "(train with --tile-mpp): tiles are cut at its base level"
        )
    elif scale.tile_mpp is not None:
        warnings.append(
            f"mpp_unknown_image: the image declares no µm/px; it is taken to be the model's {scale.tile_mpp:.3g}"
        )
    side0 = scale.tile_px * ratio
    if not tiling.should_tile(longest, side0):
        if longest * tiling.TILE_FACTOR < side0:
            warnings.append(
                f"smaller_than_tile: the image ({longest} px on its longer side) is smaller than the model's "
                f"{side0:.0f} px tile; it was enlarged to the model's input"
            )
        return None, warnings
    if ratio < 1 / 1.1:
        warnings.append(
            f"coarser_than_model: the image's {mpp:.3g} µm/px is coarser than the model's "
            f"{scale.tile_mpp:.3g}: its tiles are enlarged"
        )
    return side0, warnings


def plan(reader: Reader, scale: tiling.Scale) -> tuple[Plan | None, list[str]]:
    """How ``reader``'s image meets the model's scale (:func:`judge`): a tiling plan, or None to classify it
    whole; and the warnings."""
    side0, warnings = judge(reader.longest_side(), reader.mpp, scale)
    if side0 is None:
        return None, warnings
    ratio = side0 / scale.tile_px if scale.tile_px else 1.0
    level = best_level(reader.level_downsamples, ratio)
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
        if time.monotonic() - last_log >= PROGRESS_EVERY_S:
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
    if isinstance(reader, ImageReader):  # exactly the path a tile-sized file always takes
        return reader.whole(size)
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
