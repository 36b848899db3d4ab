"""The heat-map of a tiled result: every tissue tile's p(malignant) over a thumbnail of the image, with a colour
bar that marks the model's threshold. matplotlib is imported inside :func:`write` only, so importing this module
costs nothing on the service's path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from histod.tiling import TiledResult

ALPHA = 0.5
CMAP = "coolwarm"
"""How opaque the tile colours are over the thumbnail."""


def tile_grid(result: TiledResult) -> NDArray[np.float64]:
    """The tiles' p on the tiling grid (rows, cols), NaN where no tissue tile was classified."""
    cols = max(1, math.ceil(result.width / result.tile_side - 1e-6))
    rows = max(1, math.ceil(result.height / result.tile_side - 1e-6))
    grid = np.full((rows, cols), np.nan)
    c = np.clip(np.round(result.x / result.tile_side).astype(np.int64), 0, cols - 1)
    r = np.clip(np.round(result.y / result.tile_side).astype(np.int64), 0, rows - 1)
    grid[r, c] = result.p
    return grid


def write(path: Path, result: TiledResult, threshold: float, title: str | None = None, dpi: int = 100) -> Path:
    """Write the heat-map PNG of ``result`` to ``path`` (its folder is created); return the path."""
    png = render(result, threshold, title, dpi)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def render(result: TiledResult, threshold: float, title: str | None = None, dpi: int = 100) -> bytes:
    """The heat-map PNG of ``result``: each tile's p over the thumbnail, with a colour bar marking the threshold.
    Uses matplotlib's object API only (no pyplot state), so any one thread may draw."""
    import io

    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    thumb = result.thumbnail
    grid = tile_grid(result)
    # the grid covers whole tiles, a little past the image's right and bottom edges
    extent = (0.0, grid.shape[1] * result.tile_side, grid.shape[0] * result.tile_side, 0.0)
    height_in = 6.0
    width_in = min(14.0, max(4.0, height_in * result.width / result.height + 1.2))
    fig = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(thumb, extent=(0.0, float(result.width), float(result.height), 0.0), interpolation="antialiased")
    norm = Normalize(0.0, 1.0)
    overlay = ax.imshow(
        np.ma.masked_invalid(grid), cmap=CMAP, norm=norm, alpha=ALPHA, extent=extent, interpolation="nearest"
    )
    ax.set_xlim(0, result.width)
    ax.set_ylim(result.height, 0)
    ax.set_axis_off()
    a = result.aggregate
    ax.set_title(
        title
        if title is not None
        else f"{a.label}: {a.n_malignant} of {a.n_tissue} tissue tiles above {threshold:.2f} "
        f"({a.malignant_share:.0%} of the tissue), rule {a.rule}",
        fontsize=9,
    )
    bar = fig.colorbar(overlay, ax=ax, shrink=0.8, label=f"p(malignant) of each tile (line: threshold {threshold:.2f})")
    if bar.solids is not None:
        bar.solids.set_alpha(1.0)
    bar.ax.axhline(threshold, color="black", linewidth=2)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=dpi)
    return out.getvalue()
