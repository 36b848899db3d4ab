"""The first two stages of the pipeline, for one file, in one task of the decode pool (histod.daemon.pipeline):
intake (read the file once and hash exactly those bytes) and decode (the model's inputs from the same bytes).

The recorded sha256 is exactly what the model saw. Nothing here follows a symbolic link or blocks on a FIFO
(histod.imaging.read_file). With the model's scale (histod.tiling.Scale), an image larger than the model's tiles
is not decoded here: its header says so (histod.slides.judge) and it leaves marked ``tiling = "field"`` with its
bytes, for the tiles stage (histod.daemon.tiled); a whole-slide image (histod.readers.read_by_openslide) is
hashed block by block, never held, and leaves marked ``tiling = "slide"``. :func:`scan` lists the watch folder
for `serve --once`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from histod.daemon.complete import open_for_writing
from histod.daemon.filters import ImageFilter
from histod.daemon.mover import Identity, identity
from histod.daemon.tree import walk
from histod.db.paths import display
from histod.errors import ImageError
from histod.imaging import decode, hash_file, read_file
from histod.readers import read_by_openslide
from histod.slides import judge
from histod.tiling import Scale, TiledResult

READ_ATTEMPTS = 3
"""reads of a file that changes while it is read, before it is left for its next change"""


class Arrival(NamedTuple):
    """A path the watcher found complete, and when (the result's ``received_at``)."""

    path: Path
    received_at: datetime


@dataclass(eq=False, slots=True)
class Item:
    """One file on its way through the pipeline: what was read, then what the model made of it."""

    path: Path
    received_at: datetime
    data: bytes | None = None
    """the bytes read: let go once decoded (outcomes keep no data)"""
    sha256: str | None = None
    size_bytes: int | None = None
    identity: Identity | None = None
    """the entry that was read (lstat before and after the read agree): only that entry is moved"""
    error: ImageError | None = None
    inputs: list[NDArray[np.uint8]] = field(default_factory=list)
    """the model's inputs for this file: one image (a file larger than the model's tiles goes to the tiles stage)"""
    tiling: str | None = None
    """``field`` (its bytes kept in ``data``) or ``slide`` (read from its path): classified tile by tile by the
    tiles stage, not in a batch"""
    warnings: tuple[str, ...] = ()
    """where the image's scale does not match the model's (histod.slides.judge)"""
    tiled: TiledResult | None = None
    """a tiled image's result (its p is the aggregation rule's score)"""
    heatmap: bytes | None = None
    """a tiled image's heat-map PNG, written beside the file once it is moved"""
    p: float | None = None
    classified_at: datetime | None = None
    read_s: float = 0.0
    decode_s: float = 0.0

    @property
    def for_tiles(self) -> bool:
        """Read, and to be classified tile by tile (histod.daemon.tiled), not in its batch."""
        return self.tiling is not None and self.error is None


def read(path: Path, received_at: datetime, *, max_bytes: int) -> Item | None:
    """Read ``path``; None when it no longer exists (already moved, or removed by its owner), or when it kept
    changing while it was read (it is not complete: its next change brings it back)."""
    for _ in range(READ_ATTEMPTS):
        before = identity(path)
        item = _read(path, received_at, max_bytes)
        if item is None:
            return None
        if identity(path) == before:
            item.identity = before
            return item
    return None


def _read(path: Path, received_at: datetime, max_bytes: int) -> Item | None:
    try:
        data = read_file(path, max_bytes=max_bytes, follow_symlinks=False)
    except ImageError as exc:
        if exc.reason == "missing":
            return None
        item = Item(path, received_at, error=exc)
        if exc.reason == "empty":
            item.sha256, item.size_bytes = hashlib.sha256(b"").hexdigest(), 0
        elif exc.reason == "too_large":
            item.size_bytes = _size(path)
        return item
    return Item(path, received_at, data, hashlib.sha256(data).hexdigest(), len(data))


def _size(path: Path) -> int | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def read_slide(path: Path, received_at: datetime) -> Item | None:
    """A whole-slide image's sha256 and size, hashed block by block (OpenSlide reads it again from its path);
    None as :func:`read`. Its entry is checked again after it is classified (histod.daemon.tiled)."""
    for _ in range(READ_ATTEMPTS):
        before = identity(path)
        try:
            digest, size = hash_file(path, follow_symlinks=False)
        except ImageError as exc:
            if exc.reason == "missing":
                return None
            return Item(path, received_at, error=exc, size_bytes=_size(path))
        if identity(path) == before:
            return Item(path, received_at, sha256=digest, size_bytes=size, identity=before, tiling="slide")
    return None


class _LargerError(Exception):
    """The header says the image is larger than the model's tiles: it is tiled, not decoded whole."""


def decode_inputs(item: Item, image_size: int, *, max_pixels: int, scale: Scale | None = None) -> None:
    """The model's inputs from the bytes read (or the reason there are none, in ``item.error``); the bytes are let
    go. An error keeps its reason and message only: its traceback would hold the bytes. With ``scale``, an
    image larger than the model's tiles keeps its bytes and is marked for the tiles stage, and a scale mismatch
    is kept in ``item.warnings``."""
    data, item.data = item.data, None
    if item.error is not None:
        return
    if data is None:
        item.error = ImageError("unreadable", f"{item.path} could not be read")
        return

    def judged(width: int, height: int) -> None:
        assert scale is not None
        side, warnings = judge(max(width, height), None, scale)
        item.warnings = tuple(warnings)
        if side is not None:
            raise _LargerError

    try:
        on_size = judged if scale is not None else None
        item.inputs = [decode(data, image_size, max_pixels=max_pixels, name=display(item.path), on_size=on_size)]
    except _LargerError:
        item.data, item.tiling = data, "field"
    except ImageError as exc:
        item.error = ImageError(exc.reason, str(exc.args[0]))


def prepare(
    arrival: Arrival, image_size: int, *, max_bytes: int, max_pixels: int, scale: Scale | None = None
) -> Item | None:
    """Intake and decode of one file: the decode pool's task (see the module documentation)."""
    start = time.perf_counter()
    if scale is not None and read_by_openslide(arrival.path):
        slide = read_slide(arrival.path, arrival.received_at)
        if slide is not None:
            slide.read_s = time.perf_counter() - start
        return slide
    item = read(arrival.path, arrival.received_at, max_bytes=max_bytes)
    if item is None:
        return None
    read_at = time.perf_counter()
    decode_inputs(item, image_size, max_pixels=max_pixels, scale=scale)
    item.read_s, item.decode_s = read_at - start, time.perf_counter() - read_at
    return item


def scan(folder: Path, accept: ImageFilter, *, settle_s: float, now: float) -> tuple[list[Path], float | None]:
    """The entries anywhere under ``folder`` that ``accept`` takes (histod.daemon.tree: real folders are walked
    into, ignored ones are not), that have not changed for ``settle_s`` seconds (by lstat mtime) and that no
    process has open for writing (histod.daemon.complete), sorted; and in how many seconds the others may be
    ready (None when there are none)."""
    ready: list[Path] = []
    wait: float | None = None
    entries, _ = walk(folder, accept.ignored)
    for path, st in entries:
        if not accept.in_tree(folder, path):
            continue
        age = now - st.st_mtime
        if age < settle_s:
            wait = max(wait or 0.0, settle_s - age)
        elif stat.S_ISREG(st.st_mode) and open_for_writing(path):
            wait = max(wait or 0.0, settle_s)  # still being written: look again (a few rounds at most)
        else:
            ready.append(path)
    return sorted(ready), wait
