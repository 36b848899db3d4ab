"""Intake: take one file from the watch folder, read its bytes once and hash them.

The same bytes are later decoded and classified, so the recorded sha256 is exactly what the model saw.
Nothing here follows a symbolic link or blocks on a FIFO (histod.imaging.read_file).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from histod.daemon.complete import open_for_writing
from histod.daemon.filters import ImageFilter
from histod.daemon.mover import Identity, identity
from histod.daemon.tree import walk
from histod.errors import ImageError
from histod.imaging import read_file

READ_ATTEMPTS = 3
"""reads of a file that changes while it is read, before it is left for its next change"""


@dataclass(frozen=True)
class Taken:
    """One file taken for classification: its bytes, or why they could not be read."""

    path: Path
    received_at: datetime
    data: bytes | None
    sha256: str | None
    size_bytes: int | None
    error: ImageError | None = None
    identity: Identity | None = None
    """the entry that was read (lstat before and after the read agree): only that entry is moved"""


def take(path: Path, received_at: datetime, *, max_bytes: int) -> Taken | None:
    """Read ``path``; None when it no longer exists (already moved, or removed by its owner), or when it kept
    changing while it was read (it is not complete: its next change brings it back)."""
    for _ in range(READ_ATTEMPTS):
        before = identity(path)
        taken = _read(path, received_at, max_bytes)
        if taken is None:
            return None
        if identity(path) == before:
            return replace(taken, identity=before)
    return None


def _read(path: Path, received_at: datetime, max_bytes: int) -> Taken | None:
    try:
        data = read_file(path, max_bytes=max_bytes, follow_symlinks=False)
    except ImageError as exc:
        if exc.reason == "missing":
            return None
        sha: str | None = None
        size: int | None = None
        if exc.reason == "empty":
            sha, size = hashlib.sha256(b"").hexdigest(), 0
        elif exc.reason == "too_large":
            size = _size(path)
        return Taken(path, received_at, None, sha, size, exc)
    return Taken(path, received_at, data, hashlib.sha256(data).hexdigest(), len(data))


def _size(path: Path) -> int | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


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
