"""Tiles at the model's scale: the grid, the tissue mask, batches for a predictor, and the image's result.

A model is trained on tiles of one side (``RunInfo.tile_px``, in source pixels). An input much larger than
that is not squashed to the model's input: it is cut into tiles of that side, background tiles are skipped,
the tissue tiles are classified, and a rule turns their p's into the image's label. Pure functions over arrays;
reading images and slides is histod.slides.

Edge handling: the grid starts at the image's top-left corner and covers it whole; the last column and row may
run past the image, and that part of a tile is background (white, like empty glass). A tile's tissue share is
measured over the whole tile, so a thin sliver at the edge is skipped like any mostly empty tile.

Tissue is found on a thumbnail (:func:`mask_pixels_per_tile` pixels per tile side, each the mean of the pixels
it covers, which also averages away the sensor noise of glass). A pixel is tissue when its HSV saturation is
above Otsu's threshold of the image's saturation (kept in [:data:`MIN_SATURATION`, :data:`MAX_SATURATION`], so
that an all-glass or an all-tissue image is not split in two), it is not dark (value below :data:`MAX_DARK`:
black ink, out-of-focus or unscanned areas) and its hue is not green or cyan (pen marks; H&E is pink to purple).
A tile is tissue when at least :data:`MIN_TISSUE` of it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from histod import LABELS

if TYPE_CHECKING:
    from histod.runs import RunInfo

TILE_FACTOR = 1.5
"""An image whose longer side is above this many tiles is tiled; up to it, it is classified whole (as trained)."""
MIN_SATURATION = 0.04
MAX_SATURATION = 0.10
MAX_DARK = 0.15
PEN_HUES = (60.0, 210.0)
"""Hues in degrees (greens, cyans, light blues) that are pen ink, not H&E stain."""
MIN_TISSUE = 0.25
"""The share of a tile that must be tissue for the tile to be classified."""

Predictor = Callable[[NDArray[np.uint8]], NDArray[np.float32]]
"""A model's predict: uint8 (N, S, S, 3) -> p(malignant) float32 (N,)."""


def native_side(paths: Iterable[Path]) -> int | None:
    """The median longer side, in pixels, of the images at ``paths`` (read from their headers); None if none."""
    from PIL import Image

    sides: list[int] = []
    for path in paths:
        try:
            with Image.open(path) as img:
                sides.append(max(img.size))
        except Exception:  # an unreadable file says nothing about the scale; training already skipped it
            continue
    return int(np.median(sides)) if sides else None


def should_tile(longest_side: int, tile_side: float | None) -> bool:
    """Whether an image whose longer side is ``longest_side`` source pixels is cut into tiles of ``tile_side``
    (None: scale unknown)."""
    return tile_side is not None and longest_side > TILE_FACTOR * tile_side


# --- the grid ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """Tiles of ``side`` pixels over a ``width`` x ``height`` image, row by row from the top-left corner."""

    width: int
    height: int
    side: int

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1 or self.side < 1:
            raise ValueError(f"a grid needs positive sizes, not {self.width}x{self.height} at {self.side}")

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.side)

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.side)

    def __len__(self) -> int:
        return self.rows * self.cols

    def origin(self, index: int) -> tuple[int, int]:
        """The (x, y) of tile ``index``'s top-left corner."""
        row, col = divmod(index, self.cols)
        return col * self.side, row * self.side

    def origins(self, indices: Sequence[int] | NDArray[np.int64]) -> NDArray[np.int64]:
        """(N, 2) array of x, y for ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        return np.stack([idx % self.cols * self.side, idx // self.cols * self.side], axis=1).reshape(-1, 2)


def cut(image: NDArray[np.uint8], grid: Grid, index: int) -> NDArray[np.uint8]:
    """Tile ``index`` of ``image`` (H, W, 3), padded white where it runs past the image."""
    x, y = grid.origin(index)
    piece = image[y : y + grid.side, x : x + grid.side]
    if piece.shape[:2] == (grid.side, grid.side):
        return piece
    tile = np.full((grid.side, grid.side, 3), 255, dtype=np.uint8)
    tile[: piece.shape[0], : piece.shape[1]] = piece
    return tile


# --- tissue -----------------------------------------------------------------------------------------------------


def otsu_threshold(values: NDArray[np.floating], bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in 0..1: the cut that maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1]
    w1 = hist.sum() - w0
    m0 = np.cumsum(hist * centres)[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - ((hist * centres).sum() - m0) / w1) ** 2
    if not np.isfinite(between).any():  # one value only
        return float(values.flat[0]) if values.size else 0.0
    return float(edges[1 + int(np.nanargmax(between))])


def tissue_mask(rgb: NDArray[np.uint8]) -> tuple[NDArray[np.bool_], float]:
    """Tissue pixels of an RGB image (H, W, 3) and the saturation threshold used (see the module's doc)."""
    x = rgb.astype(np.float32) / 255.0
    top = x.max(axis=-1)
    spread = top - x.min(axis=-1)
    saturation = np.divide(spread, top, out=np.zeros_like(top), where=top > 0)
    threshold = min(max(otsu_threshold(saturation), MIN_SATURATION), MAX_SATURATION)
    mask = (saturation > threshold) & (top > MAX_DARK)
    hue = _hue(x, top, spread)
    mask &= ~((hue >= PEN_HUES[0]) & (hue < PEN_HUES[1]))
    return mask, threshold


def _hue(x: NDArray[np.float32], top: NDArray[np.float32], spread: NDArray[np.float32]) -> NDArray[np.float32]:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.where(spread > 0, spread, 1.0)
    hue = np.where(top == r, (g - b) / safe % 6, np.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return np.where(spread > 0, hue * 60.0, 0.0).astype(np.float32)


def tissue_shares(mask: NDArray[np.bool_], grid: Grid) -> NDArray[np.float32]:
    """The tissue share of every tile of ``grid`` (len(grid),), from a mask of the image at any scale whose
    pixels map to the grid's: ``mask`` covers the image, resampled to a whole number of pixels per tile."""
    per_tile = max(1, round(mask.shape[1] * grid.side / grid.width))
    padded = np.zeros((grid.rows * per_tile, grid.cols * per_tile), dtype=np.float32)
    h, w = min(mask.shape[0], padded.shape[0]), min(mask.shape[1], padded.shape[1])
    padded[:h, :w] = mask[:h, :w]
    blocks = padded.reshape(grid.rows, per_tile, grid.cols, per_tile)
    return np.asarray(blocks.mean(axis=(1, 3)), dtype=np.float32).reshape(-1)


def mask_pixels_per_tile(grid: Grid, budget: int = 4_000_000) -> int:
    """How many mask pixels per tile side keep the mask within ``budget`` pixels (between 2 and 10)."""
    return max(2, min(10, int(math.sqrt(budget / max(1, len(grid))))))


# --- classifying tiles ------------------------------------------------------------------------------------------


def resize(tile: NDArray[np.uint8], size: int) -> NDArray[np.uint8]:
    """``tile`` at the model's input side, resampled as histod.imaging.decode resamples a whole image."""
    if tile.shape[0] == size and tile.shape[1] == size:
        return tile
    from PIL import Image

    return np.asarray(Image.fromarray(tile).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def predict_batches(
    tiles: Iterable[tuple[int, NDArray[np.uint8]]], predict: Predictor, size: int, batch_size: int = 64
) -> Iterator[tuple[list[int], NDArray[np.float32]]]:
    """Classify (index, tile) pairs in batches of ``batch_size``: yields (indices, p) per batch, in order."""
    indices: list[int] = []
    batch: list[NDArray[np.uint8]] = []
    for index, tile in tiles:
        indices.append(index)
        batch.append(resize(tile, size))
        if len(batch) == batch_size:
            yield indices, np.asarray(predict(np.stack(batch)), dtype=np.float32).reshape(-1)
            indices, batch = [], []
    if batch:
        yield indices, np.asarray(predict(np.stack(batch)), dtype=np.float32).reshape(-1)


# --- the image's result -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Aggregate:
    """An image's label from its tissue tiles' p's: ``score`` >= ``cut`` under rule ``rule``."""

    label: str
    score: float
    cut: float
    rule: str
    n_tissue: int
    n_malignant: int
    malignant_share: float
    """the share of the tissue area in tiles with p >= the model's threshold"""
    malignant_area_px: float
    """that area in source pixels (times mpp² for µm²)"""


@dataclass(frozen=True)
class Rule:
    """A named aggregation rule: ``kind`` is top-k mean, area share above the threshold, or tile count."""

    kind: str  # "topk" | "share" | "count" | "mean" | "max"
    k: float = 0.0  # topk: tiles (>= 1) or a fraction of the tissue tiles (< 1)
    cut: float | None = None  # None: the model's threshold (for p-like scores)

    @property
    def name(self) -> str:
        param = {"topk": f"{self.k:g}", "count": "", "share": "", "mean": "", "max": ""}[self.kind]
        cut = "" if self.cut is None else f">={self.cut:g}"
        return f"{self.kind}{param}{cut}"


DEFAULT_RULE = Rule("topk", k=0.1, cut=0.67)
"""Malignant when the mean p of the top 10 % of the tissue tiles is at least 0.67: of seven candidate rules,
the best on fields of training patients for the histology preset's model (docs/tiling.md). The cut is in that
model's p; bench/mosaic.py chooses it again for another model."""


def score(rule: Rule, p: NDArray[np.floating], area: NDArray[np.floating], threshold: float) -> float:
    """The rule's image score from tile p's and tissue areas (same length, at least one tile)."""
    if p.size == 0:
        raise ValueError("no tissue tiles to aggregate")
    if rule.kind == "max":
        return float(p.max())
    if rule.kind == "mean":
        return float(np.average(p, weights=area))
    if rule.kind == "topk":
        k = int(rule.k) if rule.k >= 1 else max(1, math.ceil(rule.k * p.size))
        return float(np.sort(p)[-min(k, p.size) :].mean())
    above = p >= threshold
    if rule.kind == "share":
        return float(area[above].sum() / area.sum())
    if rule.kind == "count":
        return float(above.sum())
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def aggregate(
    p: NDArray[np.floating], area: NDArray[np.floating], threshold: float, rule: Rule = DEFAULT_RULE
) -> Aggregate:
    """The image's label, score and counts from its tissue tiles (``area``: tissue pixels of each tile)."""
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    area = np.asarray(area, dtype=np.float64).reshape(-1)
    if p.shape != area.shape:
        raise ValueError(f"{p.size} p's but {area.size} areas")
    value = score(rule, p, area, threshold)
    cut_at = threshold if rule.cut is None else rule.cut
    above = p >= threshold
    return Aggregate(
        label=LABELS[int(value >= cut_at)],
        score=value,
        cut=cut_at,
        rule=rule.name,
        n_tissue=int(p.size),
        n_malignant=int(above.sum()),
        malignant_share=float(area[above].sum() / area.sum()),
        malignant_area_px=float(area[above].sum()),
    )


# --- a tiled image ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """What a model says about its input: the run's image_size, threshold, tile_px and tile_mpp."""

    image_size: int
    threshold: float
    tile_px: int | None = None
    tile_mpp: float | None = None

    @classmethod
    def of(cls, run: RunInfo) -> Scale:
        """From a histod.runs.RunInfo."""
        return cls(run.image_size, run.threshold, run.tile_px, run.tile_mpp)


@dataclass(frozen=True)
class TiledResult:
    """A tiled image's result: the aggregate and every tissue tile (x, y in level-0 pixels, p, tissue share)."""

    aggregate: Aggregate
    x: NDArray[np.int64]
    y: NDArray[np.int64]
    p: NDArray[np.float32]
    tissue: NDArray[np.float32]
    width: int
    height: int
    tile_side: float
    """in level-0 pixels"""
    level: int
    n_tiles: int
    backend: str
    mpp: float | None
    warnings: tuple[str, ...]
    thumbnail: NDArray[np.uint8] = field(repr=False)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return self.aggregate.label

    @property
    def malignant_area_mm2(self) -> float | None:
        return None if self.mpp is None else self.aggregate.malignant_area_px * self.mpp**2 / 1e6

    def summary(self) -> dict[str, Any]:
        """Everything but the tiles, JSON-ready."""
        a = self.aggregate
        return {
            "label": a.label,
            "score": round(a.score, 6),
            "cut": a.cut,
            "rule": a.rule,
            "grid_tiles": self.n_tiles,
            "tissue_tiles": a.n_tissue,
            "malignant_tiles": a.n_malignant,
            "malignant_share": round(a.malignant_share, 6),
            "malignant_area_px": round(a.malignant_area_px, 1),
            "malignant_area_mm2": None if self.malignant_area_mm2 is None else round(self.malignant_area_mm2, 6),
            "tile_px": round(self.tile_side, 3),
            "level": self.level,
            "width": self.width,
            "height": self.height,
            "mpp": self.mpp,
            "backend": self.backend,
            "warnings": list(self.warnings),
        }

    def tiles(self) -> list[dict[str, Any]]:
        return [
            {"x": int(x), "y": int(y), "p": round(float(p), 6), "tissue": round(float(t), 4)}
            for x, y, p, t in zip(self.x, self.y, self.p, self.tissue, strict=True)
        ]

    def packed(self) -> bytes:
        """The tiles as one little-endian array of (x int32, y int32, p float32, tissue float32) records."""
        records = np.empty(self.p.size, dtype=TILE_RECORD)
        records["x"], records["y"], records["p"], records["tissue"] = self.x, self.y, self.p, self.tissue
        return records.tobytes()


TILE_RECORD = np.dtype([("x", "<i4"), ("y", "<i4"), ("p", "<f4"), ("tissue", "<f4")])
