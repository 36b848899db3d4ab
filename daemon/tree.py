"""The watch folder is a tree: labs drop one folder per case. Walking it (every scan), and removing the case
folders the service emptied. Symlinked folders are never walked; a folder whose name matches an ignore pattern
(a hidden upload in progress) is not walked either."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path


def walk(root: Path, skip_folder: Callable[[str], bool]) -> tuple[list[tuple[Path, os.stat_result]], list[Path]]:
    """Every entry under ``root`` that is not a folder (files, symlinks, FIFOs), with its lstat; and every folder
    walked into. A folder that vanishes or cannot be listed while it is walked is left out."""
    entries: list[tuple[Path, os.stat_result]] = []
    folders: list[Path] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            listing = os.scandir(folder)
        except OSError:
            continue
        with listing:
            for entry in listing:
                path = folder / entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    entries.append((path, st))
                elif not skip_folder(entry.name):
                    folders.append(path)
                    stack.append(path)
    return entries, folders


def remove_if_empty(folder: Path, root: Path, *, quiet_s: float, now: float) -> bool | None:
    """Remove ``folder`` (somewhere under ``root``, never ``root`` itself) if it is an empty folder that has not
    changed for ``quiet_s`` seconds (an upload between two files of a case must not lose its folder). True:
    removed; None: not yet (changed too recently); False: never (not empty, gone, not a folder)."""
    if folder == root or root not in folder.parents:
        return False
    try:
        st = folder.lstat()
        if not stat.S_ISDIR(st.st_mode):
            return False
        if now - st.st_mtime < quiet_s:
            return None
        folder.rmdir()  # fails unless empty
    except OSError:
        return False
    return True
