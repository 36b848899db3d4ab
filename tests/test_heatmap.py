"""histod.heatmap: tile p's on the tiling grid over a thumbnail, with a colour bar; and the tiling modules' import
cost (no matplotlib, no OpenSlide until they are used)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histod import heatmap, tiling


def result(x: list[int], y: list[int], p: list[float], width: int = 200, height: int = 100) -> tiling.TiledResult:
    side = 50.0
    thumb = np.full((height // 2, width // 2, 3), 235, dtype=np.uint8)
    return tiling.TiledResult(
        aggregate=tiling.aggregate(np.array(p), np.full(len(p), side * side), 0.5),
        x=np.array(x),
        y=np.array(y),
        p=np.array(p, dtype=np.float32),
        tissue=np.ones(len(p), dtype=np.float32),
        width=width,
        height=height,
        tile_side=side,
        level=0,
        n_tiles=8,
        backend="image",
        mpp=None,
        warnings=(),
        thumbnail=thumb,
    )


def test_tile_grid_puts_each_p_in_its_cell_and_nan_elsewhere() -> None:
    grid = heatmap.tile_grid(result([0, 150, 50], [0, 50, 50], [0.1, 0.9, 0.6], width=180, height=100))
    assert grid.shape == (2, 4)  # 180 px wide: the fourth column runs past the edge
    assert grid[0, 0] == pytest.approx(0.1)
    assert grid[1, 3] == pytest.approx(0.9)
    assert grid[1, 1] == pytest.approx(0.6)
    assert np.isnan(grid).sum() == 5


def test_write_draws_malignant_tiles_warm_and_benign_tiles_cool(tmp_path: Path) -> None:
    # the left half benign (p 0.05), the right half malignant (p 0.95)
    xs = [0, 50, 100, 150] * 2
    ys = [0] * 4 + [50] * 4
    ps = [0.05, 0.05, 0.95, 0.95] * 2
    path = heatmap.write(tmp_path / "out" / "map.png", result(xs, ys, ps), threshold=0.5, dpi=60)
    assert path == tmp_path / "out" / "map.png"
    with Image.open(path) as png:
        assert png.format == "PNG"
        pixels = np.asarray(png.convert("RGB")).astype(int)
    reddish = (pixels[..., 0] - pixels[..., 2]) > 60
    bluish = (pixels[..., 2] - pixels[..., 0]) > 60
    # the image area spans most of the figure's width; its left part is blue, its right part red
    cols_red = np.flatnonzero(reddish.sum(axis=0) > 5)
    cols_blue = np.flatnonzero(bluish.sum(axis=0) > 5)
    assert cols_red.size and cols_blue.size
    assert np.median(cols_blue) < np.median(cols_red)


def test_write_adds_a_colour_bar_from_blue_to_red_with_a_line_at_the_threshold(tmp_path: Path) -> None:
    xs, ys, ps = [0, 50, 100, 150] * 2, [0] * 4 + [50] * 4, [0.05, 0.05, 0.95, 0.95] * 2
    path = heatmap.write(tmp_path / "map.png", result(xs, ys, ps), threshold=0.3, dpi=60)
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB")).astype(int)
    right = pixels[:, int(pixels.shape[1] * 0.7) :]  # the bar is right of the image
    red = (right[..., 0] - right[..., 2]) > 60
    blue = (right[..., 2] - right[..., 0]) > 60
    columns = np.flatnonzero(red.any(axis=0) & blue.any(axis=0))
    assert columns.size >= 5  # a bar some pixels wide holds both ends of the scale
    c = int(np.median(columns))
    reds, blues = np.flatnonzero(red[:, c]), np.flatnonzero(blue[:, c])
    top, bottom = reds.min(), blues.max()
    assert reds.mean() < blues.mean()  # p = 1 (red) at the top, p = 0 (blue) at the bottom
    dark = [r for r in np.flatnonzero(right[:, c].sum(axis=-1) < 150) if top + 2 < r < bottom - 2]
    assert dark, "no threshold line on the colour bar"
    assert (bottom - np.mean(dark)) / (bottom - top) == pytest.approx(0.3, abs=0.05)


def test_importing_the_tiling_modules_loads_neither_matplotlib_nor_openslide() -> None:
    code = (
        "import sys, histod.heatmap, histod.slides, histod.tiling; "
        "print(sorted(m for m in ('matplotlib', 'openslide') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
