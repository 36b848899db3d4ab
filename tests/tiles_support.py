"""Helpers for the tiling tests (tests/test_slides.py, tests/test_tiled_commands.py; no tests here): mosaics of
synthetic tiles laid on glass at known positions, so every tile's place and class is known; pyramidal TIFFs of
them that OpenSlide reads; a transparent predictor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histod import synthetic

try:
    import openslide  # noqa: F401 - only whether the slides extra is installed
except ImportError:
    HAVE_OPENSLIDE = False
else:
    HAVE_OPENSLIDE = True

needs_openslide = pytest.mark.skipif(
    not HAVE_OPENSLIDE,
    reason="OpenSlide is not installed: whole-slide images need the slides extra "
    "(pip install 'histod[slides]': openslide-python + openslide-bin)",
)

SIDE = 64  # the synthetic training tiles' side: tiny_run_dir records tile_px = 64
GLASS = np.array([238, 236, 240])


def mosaic(rows: int, cols: int, seed: int = 0, side: int = SIDE) -> tuple[np.ndarray, dict[tuple[int, int], bool]]:
    """Synthetic tiles on glass: a tile at every grid cell but one in three; malignant in the right half.
    Returns the image and {(x, y): malignant} of the tiles laid."""
    rng = np.random.default_rng(seed)
    image = np.clip(GLASS + rng.normal(0, 3, (rows * side, cols * side, 3)), 0, 255).astype(np.uint8)
    truth: dict[tuple[int, int], bool] = {}
    for r in range(rows):
        for c in range(cols):
            if (r + c) % 3 == 0:
                continue
            malignant = c >= cols // 2
            image[r * side : (r + 1) * side, c * side : (c + 1) * side] = synthetic.tile(malignant, side, rng)
            truth[(c * side, r * side)] = malignant
    return image, truth


def nuclei(batch: np.ndarray) -> np.ndarray:
    """A transparent predictor for checking where p's land: the share of dark (nucleus) pixels, scaled to 0..1.
    Synthetic malignant tiles are crowded with dark nuclei, benign ones have a few."""
    dark = (batch.astype(np.int32).sum(axis=-1) < 350).mean(axis=(1, 2))
    return np.asarray(np.clip(dark * 4, 0, 1), dtype=np.float32)


def pyramid(path: Path, image: np.ndarray, mpp: float | None, levels: int = 3, tile: int = 128) -> list[np.ndarray]:
    """A generic tiled pyramidal TIFF (one directory per level, each half the last) that OpenSlide reads."""
    import tifffile

    written = []
    with tifffile.TiffWriter(path) as tiff:
        level = image
        for i in range(levels):
            per_cm = None if mpp is None else 1e4 / (mpp * 2**i)
            tiff.write(
                level,
                tile=(tile, tile),
                compression="zlib",
                photometric="rgb",
                subfiletype=int(i > 0),
                resolution=None if per_cm is None else (per_cm, per_cm),
                resolutionunit=None if per_cm is None else "CENTIMETER",
            )
            written.append(level)
            level = np.asarray(Image.fromarray(level).reduce(2))
    return written


def field_png(
    tmp_path: Path, rows: int = 6, cols: int = 8, name: str = "field.png"
) -> tuple[Path, dict[tuple[int, int], bool]]:
    image, truth = mosaic(rows, cols)
    path = tmp_path / name
    Image.fromarray(image).save(path)
    return path, truth
