"""Images to drop into a watch folder, and dropping them: what bench/serve.py and bench/serve_workers.py share.

The images are distinct 50x50 PNGs from ``../shared/data/idc-dev`` (and the same upscaled to 224x224, JPEG quality
90), else generated tiles. Each file is written in place (open, write, close: inotify's close-write).
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from bench.common import shared_data


# --- images ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Drop:
    name: str
    data: bytes


def _sources(count: int, seed: int) -> list[Path] | None:
    """``count`` distinct 50x50 PNGs from idc-dev, or None when the data is absent."""
    from PIL import Image

    root = shared_data()
    if root is None:
        return None
    files = sorted(p for p in root.rglob("*.png") if p.is_file())
    rng = np.random.default_rng(seed)
    picked: list[Path] = []
    for i in rng.permutation(len(files)):
        with Image.open(files[i]) as img:
            if img.size != (50, 50):
                continue
        picked.append(files[i])
        if len(picked) == count:
            break
    if len(picked) < count:
        raise SystemExit(f"{root} has only {len(picked)} 50x50 PNGs; ask for fewer images")
    return picked


def _jpeg(png: bytes | NDArray[np.uint8], size: int = 224) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB") if isinstance(png, bytes) else Image.fromarray(png)
    out = io.BytesIO()
    img.resize((size, size), Image.Resampling.BILINEAR).save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_sets(
    n_jpeg: int, n_png: int, n_low: int, seed: int, jpeg_px: int = 224
) -> tuple[dict[str, list[Drop]], str]:
    """The three drop lists, all distinct source images: ``jpeg224`` (JPEGs of ``jpeg_px`` a side), ``png50``,
    ``low`` (alternating)."""
    total = n_jpeg + n_png + n_low
    sources = _sources(total, seed)
    pngs: list[bytes]
    if sources is not None:
        origin = f"{shared_data()} (50x50 PNGs; JPEGs resized to {jpeg_px}x{jpeg_px}, quality 90)"
        pngs = [p.read_bytes() for p in sources]
        jpegs = [_jpeg(b, jpeg_px) for b in pngs]
    else:
        from histod.synthetic import tile

        origin = "generated tiles (histod.synthetic): ../shared/data/idc-dev is absent"
        rng = np.random.default_rng(seed)
        arrays = [tile(i % 2 == 1, 50, rng) for i in range(total)]
        pngs = []
        for a in arrays:
            buf = io.BytesIO()
            from PIL import Image

            Image.fromarray(a).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        jpegs = [_jpeg(a, jpeg_px) for a in arrays]
    sets: dict[str, list[Drop]] = {
        "jpeg224": [Drop(f"j224_{i:05d}.jpg", jpegs[i]) for i in range(n_jpeg)],
        "png50": [Drop(f"p50_{i:05d}.png", pngs[n_jpeg + i]) for i in range(n_png)],
        "low": [],
    }
    for k in range(n_low):
        i = n_jpeg + n_png + k
        if k % 2 == 0:
            sets["low"].append(Drop(f"low_{k:05d}.png", pngs[i]))
        else:
            sets["low"].append(Drop(f"low_{k:05d}.jpg", jpegs[i]))
    return sets, origin


# --- dropping ----------------------------------------------------------------------------------------------------
def drop_files(watch: Path, drops: list[Drop], rate: float | None) -> dict[str, float]:
    """Write each file in place (close-write); return name -> wall time just after close."""
    closed: dict[str, float] = {}
    start = time.monotonic()
    for k, d in enumerate(drops):
        if rate:
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        fd = os.open(watch / d.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, d.data)
        finally:
            os.close(fd)
        closed[d.name] = time.time()
    return closed
