"""Tiles/s and memory of tiling: a large field and a pyramidal whole-slide image, end to end against raw LiteRT on
the same tiles.

    .venv/bin/python bench/tiles_speed.py --run RUN_DIR [--slide-tiles 108000] [--work /tmp/tiles-work]

* field: the mosaic of patient 8974 (every patch of the slide, bench/mosaic.py), one PNG, through histod.slides
  (ImageReader: read, decode whole, tissue mask, grid, batches of 64, the run's LiteRT model, 2 threads);
* slide: a generic pyramidal tiled TIFF (4 levels, zlib, 256 px TIFF tiles, 4 µm/px: the IDC patches' 2.5x)
  of an ellipse of real idc-dev patches on glass, about --slide-tiles tissue tiles, read through OpenSlide block
  by block (SlideReader), the model's scale given as 50 px at 4 µm/px.

Each is measured in a fresh process: tiles/s end to end (tissue tiles / wall time of open + classify), tiles per
CPU second (the process's user + system time, all threads: steadier than wall time on a shared machine) and
peak RSS (VmHWM) at the end of classify; then, in the same process, raw LiteRT (classifier.predict, batches of 64)
on up to --raw-n of the same tiles, already cut and resized (not timed), by wall and CPU time.
Writes bench/results/tiles/speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import IDC_DEV, load_average, machine, say, table, write_result
from bench.mosaic import GLASS, GRID, OUT, all_patches, build


def make_slide(path: Path, tissue_tiles: int, mpp: float, seed: int = 0) -> dict[str, Any]:
    """A pyramidal tiled TIFF (4 levels, zlib, 256 px TIFF tiles) of an elliptical piece of tissue made of real
    idc-dev patches on glass, about ``tissue_tiles`` patches: written strip by strip, never whole in memory."""
    import tifffile

    from histod import imaging

    side = int(np.ceil(np.sqrt(tissue_tiles / (np.pi / 4))))
    rows = cols = side
    yy, xx = np.mgrid[0:rows, 0:cols]
    inside = ((xx + 0.5 - cols / 2) / (cols / 2)) ** 2 + ((yy + 0.5 - rows / 2) / (rows / 2)) ** 2 <= 1
    rng = np.random.default_rng(seed)
    files = sorted((IDC_DEV / "benign").iterdir()) + sorted((IDC_DEV / "malignant").iterdir())
    pool = np.full((len(files), GRID, GRID, 3), 238, dtype=np.uint8)
    for i, f in enumerate(files):
        a = imaging.load(f, None)[:GRID, :GRID]
        pool[i, : a.shape[0], : a.shape[1]] = a
    choice = np.where(inside, rng.integers(0, len(files), (rows, cols)), -1)
    width, height = cols * GRID, rows * GRID
    texture = np.clip(GLASS + rng.normal(0, 3, (1024, 1024, 3)), 0, 255).astype(np.uint8)  # glass, repeated

    def strip(top: int, bottom: int) -> NDArray[np.uint8]:
        """Level-0 rows top..bottom, all columns."""
        out = texture[np.arange(top, bottom) % 1024][:, np.arange(width) % 1024]
        for row in range(top // GRID, min(rows, (bottom + GRID - 1) // GRID)):
            y0 = row * GRID
            for col in np.flatnonzero(choice[row] >= 0):
                patch = pool[choice[row, col]]
                a, b = max(top, y0), min(bottom, y0 + GRID)
                out[a - top : b - top, col * GRID : (col + 1) * GRID] = patch[a - y0 : b - y0]
        return out

    def tiles(level: int) -> Any:
        from PIL import Image

        d = 2**level
        lw, lh = -(-width // d), -(-height // d)
        for top in range(0, lh, 256):
            rows0 = strip(top * d, min(height, (top + 256) * d))
            level_strip = np.asarray(Image.fromarray(rows0).reduce(d)) if d > 1 else rows0
            padded = np.full((256, -(-lw // 256) * 256, 3), 238, dtype=np.uint8)
            padded[: level_strip.shape[0], : level_strip.shape[1]] = level_strip
            for left in range(0, lw, 256):
                yield padded[:, left : left + 256]

    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        for level in range(4):
            d = 2**level
            tiff.write(
                tiles(level),
                shape=(-(-height // d), -(-width // d), 3),
                dtype=np.uint8,
                tile=(256, 256),
                compression="zlib",
                photometric="rgb",
                subfiletype=int(level > 0),
                resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)),
                resolutionunit="CENTIMETER",
            )
    return {"width": width, "height": height, "tissue_patches": int(inside.sum()), "bytes": path.stat().st_size}


def cpu() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(kind: str, run: Path, path: Path, mpp: float | None, raw_n: int) -> dict[str, Any]:
    """In a fresh process: classify ``path`` end to end, then raw LiteRT on (up to raw_n of) the same tiles."""
    from bench.common import proc_status_mb
    from histod import readers, slides, tiling
    from histod.daemon.classifier import load_classifier
    from histod.runs import load_run

    info = load_run(run)
    classifier = load_classifier(run, "litert", threads=2)
    classifier.predict(np.zeros((64, classifier.image_size, classifier.image_size, 3), dtype=np.uint8))  # warm
    rss_loaded = proc_status_mb(os.getpid(), "VmRSS")
    scale = tiling.Scale(info.image_size, info.threshold, info.tile_px, mpp)
    started, cpu_started = time.monotonic(), cpu()
    with readers.open_reader(path) as reader:
        result = slides.classify(reader, classifier.predict, scale)
        seconds, cpu_seconds = time.monotonic() - started, cpu() - cpu_started
        assert isinstance(result, tiling.TiledResult)
        peak = proc_status_mb(os.getpid(), "VmHWM")
        pick = np.random.default_rng(0).permutation(result.p.size)[:raw_n]
        side = round(result.tile_side)
        batch = np.stack(
            [
                tiling.resize(reader.read(0, int(result.x[i]), int(result.y[i]), side, side), classifier.image_size)
                for i in pick
            ]
        )
    raw_started, raw_cpu_started = time.monotonic(), cpu()
    raw_p = np.concatenate([classifier.predict(batch[i : i + 64]) for i in range(0, len(batch), 64)])
    raw_seconds, raw_cpu = time.monotonic() - raw_started, cpu() - raw_cpu_started
    return {
        "kind": kind,
        "backend": result.backend,
        "size": f"{result.width}x{result.height}",
        "grid_tiles": result.n_tiles,
        "tissue_tiles": result.aggregate.n_tissue,
        "seconds": round(seconds, 2),
        "tiles_per_s": result.aggregate.n_tissue / seconds,
        "tiles_per_cpu_s": result.aggregate.n_tissue / cpu_seconds,
        "raw_litert_tiles": len(pick),
        "raw_litert_tiles_per_s": len(pick) / raw_seconds,
        "raw_litert_tiles_per_cpu_s": len(pick) / raw_cpu,
        "raw_p_max_abs_diff": float(np.abs(raw_p - result.p[pick]).max()),
        "rss_engine_loaded_mb": rss_loaded,
        "peak_rss_mb": peak,
        "summary": result.summary(),
    }


def run_speed(args: argparse.Namespace) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    patients = all_patches()
    field = args.work / "field-8974.png"
    if not field.exists():
        from PIL import Image

        Image.fromarray(build("8974", patients["8974"]).image).save(field)
    slide = args.work / f"slide-{args.slide_tiles}.tif"
    made: dict[str, Any] = {}
    if not slide.exists():
        say(f"writing {slide} (~{args.slide_tiles:,} tissue patches)")
        made = make_slide(slide, args.slide_tiles, mpp=4.0)
    out: dict[str, Any] = {"machine": machine(), "slide_made": made}
    for kind, path, mpp in (("field", field, None), ("slide", slide, 4.0)):
        say(f"measuring {kind}: {path}")
        command = [sys.executable, str(Path(__file__).resolve()), "--run", str(args.run), "--raw-n", str(args.raw_n)]
        command += ["_measure", kind, "--path", str(path)] + ([] if mpp is None else ["--mpp", str(mpp)])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
        out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        progress = [line for line in (done.stdout + done.stderr).splitlines() if "tiles.progress" in line]
        out[kind]["progress_lines"] = progress[:3] + progress[-1:]
    out["load_average_at_end"] = load_average()
    write_result("speed", out, OUT)
    rows = [
        [
            k,
            out[k]["size"],
            out[k]["tissue_tiles"],
            f"{out[k]['tiles_per_s']:.0f}",
            f"{out[k]['raw_litert_tiles_per_s']:.0f}",
            f"{out[k]['tiles_per_cpu_s']:.0f}",
            f"{out[k]['raw_litert_tiles_per_cpu_s']:.0f}",
            f"{out[k]['peak_rss_mb']:.0f}",
        ]
        for k in ("field", "slide")
    ]
    headers = ["input", "size", "tissue tiles", "tiles/s", "raw LiteRT tiles/s", "tiles/CPU-s", "raw tiles/CPU-s"]
    print(table([*headers, "peak RSS MB"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tiles-work"))
    parser.add_argument("--slide-tiles", type=int, default=108_000)
    parser.add_argument("--raw-n", type=int, default=4000)
    inner = sub.add_parser("_measure")
    inner.add_argument("kind")
    inner.add_argument("--path", type=Path, required=True)
    inner.add_argument("--mpp", type=float, default=None)
    args = parser.parse_args()
    if args.command == "_measure":
        print(json.dumps(measure(args.kind, args.run, args.path, args.mpp, args.raw_n)))
    else:
        run_speed(args)


if __name__ == "__main__":
    main()
