"""Move a recorded file to processed/ or failed/YYYY-MM-DD/, never overwriting anything.

Targets are chosen before the result row is committed (the row stores them) and are unique: a name is
free when nothing is at that path and no other result claims it. The move itself is a hard link to the
target (which fails rather than replace) followed by removing the original, so a crash between the two
leaves both names on one inode, which :func:`move_file` recognises and finishes. Across filesystems the
file is copied to a hidden temporary name, linked into place and the original removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from histod.db.models import MOVE_REPLACED, MOVE_VANISHED, Move, utcnow
from histod.db.paths import display, path_text

_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}

Identity = tuple[int, int, int, int]
"""(st_dev, st_ino, st_size, st_mtime_ns) of an entry, by lstat: the file that was read is the file moved"""


class SourceReplacedError(Exception):
    """The entry at the source is no longer the one that was read (another inode, size or mtime): nothing moved."""


def identity_of(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def identity(path: Path) -> Identity | None:
    """The entry's :data:`Identity` now; None when nothing is there (or it cannot be looked at)."""
    try:
        return identity_of(os.lstat(path))
    except OSError:
        return None


def dated_dir(root: Path, when: datetime) -> Path:
    return root / when.strftime("%Y-%m-%d")


NAME_MAX = 255
"""the longest file name (one path component) Linux file systems take, in bytes of the file-system encoding"""


def name_bytes(name: str) -> int:
    return len(os.fsencode(name))


def fit_name(stem: str, tail: str = "") -> str:
    """``stem + tail``, the stem cut at a character boundary so that the whole fits in NAME_MAX bytes."""
    room = NAME_MAX - name_bytes(tail)
    if name_bytes(stem) <= room:
        return stem + tail
    kept: list[str] = []
    used = 0
    for ch in stem:
        used += name_bytes(ch)
        if used > room:
            break
        kept.append(ch)
    return "".join(kept) + tail


def candidates(folder: Path, name: str) -> Callable[[int], Path]:
    """``name``, then ``stem-1.ext``, ``stem-2.ext``, ... in ``folder``; each cut to fit in NAME_MAX bytes (the
    stem is shortened, the suffix kept)."""
    dot = name.rfind(".")
    stem, suffix = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    if name_bytes(suffix) > NAME_MAX // 4:  # not an extension: a dot somewhere in a long name
        stem, suffix = name, ""

    def nth(n: int) -> Path:
        return folder / fit_name(stem, suffix if n == 0 else f"-{n}{suffix}")

    return nth


def plan_target(folder: Path, name: str, claimed: Callable[[Path], bool]) -> Path:
    """The first free name for ``name`` in ``folder``: nothing on disk there and not ``claimed``."""
    nth = candidates(folder, name)
    n = 0
    while True:
        path = nth(n)
        if not os.path.lexists(path) and not claimed(path):
            return path
        n += 1


def plan_tree_target(
    folder: Path, parts: Sequence[str], taken: Callable[[Path], bool], pending_dirs: Collection[Path] = ()
) -> Path:
    """The target of a file found at ``parts`` (its path below the watch folder, as shown) under ``folder``:
    each folder of ``parts`` where nothing but a folder is (on disk) and no file target is ``taken``, else its
    next free name (``case-1``); then the first free name for the file (:func:`plan_target`) that is not one of
    ``pending_dirs``, the folders that targets planned but not yet moved lie in."""
    base = folder
    for part in parts[:-1]:
        nth = candidates(base, part)
        n = 0
        while taken(nth(n)) or (os.path.lexists(nth(n)) and not stat.S_ISDIR(os.lstat(nth(n)).st_mode)):
            n += 1
        base = nth(n)
    return plan_target(base, parts[-1], lambda p: taken(p) or p in pending_dirs)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _same_content(src: Path, dst: Path) -> bool:
    try:
        with src.open("rb") as a, dst.open("rb") as b:
            while True:
                x, y = a.read(1 << 20), b.read(1 << 20)
                if x != y:
                    return False
                if not x:
                    return True
    except OSError:
        return False


def move_file(src: Path, dst: Path, *, expect: Identity | None = None) -> Path:
    """Move ``src`` to ``dst`` without overwriting; return where it went (``dst``, or the next free name when
    an unrelated file is already at ``dst``). Raises OSError (permissions, disk full); ``src`` is then intact.
    With ``expect`` (the identity of what was read), raises SourceReplacedError when another file is at ``src`` now,
    also when it is renamed over ``src`` while the move runs; and never removes a file that replaced ``src``.

    The usual case costs five system calls: lstat the source, link, lstat the link, lstat the source, unlink.
    The target's folder is made only when the link finds it missing, and what is already at ``dst`` is looked at
    only when the link finds something there."""
    src_st = os.lstat(src)
    if expect is not None and identity_of(src_st) != expect:
        raise SourceReplacedError(f"{src} is not the file that was read")
    if stat.S_ISDIR(src_st.st_mode):
        dst.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(dst):
            return _finish_or_rename(src, dst, src_st)
        src.rename(dst)  # a folder with an image's name: links are not possible; dst was free just now
        return dst
    for attempt in range(2):
        try:
            os.link(src, dst, follow_symlinks=False)
            break
        except FileExistsError:
            return _finish_or_rename(src, dst, src_st)
        except FileNotFoundError:
            # the link names both paths: the source gone is a vanished file, a missing folder is made
            if attempt or not os.path.lexists(src) or dst.parent.is_dir():
                raise
            dst.parent.mkdir(parents=True, exist_ok=True)
        except NotADirectoryError:
            if attempt:
                raise
            dst.parent.mkdir(parents=True, exist_ok=True)  # a file where a folder goes: raises what it is
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                return _copy_across(src, dst, src_st)
            if exc.errno in _NO_HARD_LINKS and not os.path.lexists(dst):
                src.rename(dst)
                return dst
            raise
    if not _same_file(os.lstat(dst), src_st):  # replaced between the lstat and the link: that is not ours
        dst.unlink()
        raise SourceReplacedError(f"{src} was replaced while it was moved")
    _unlink_if_same(src, src_st)
    return dst


def _finish_or_rename(src: Path, dst: Path, src_st: os.stat_result) -> Path:
    """Something is at ``dst`` already: an earlier move of this file that got as far as the link (or the copy),
    which is finished here; else an unrelated file, and ``src`` goes to the next free name."""
    with contextlib.suppress(FileNotFoundError):
        _temporary(dst).unlink()  # a copy left by a process killed in the middle of _copy_across
    dst_st = os.lstat(dst)
    regular = stat.S_ISREG(src_st.st_mode) and stat.S_ISREG(dst_st.st_mode)
    if _same_file(src_st, dst_st) or (
        regular
        and src_st.st_size == dst_st.st_size
        and src_st.st_mtime_ns == dst_st.st_mtime_ns
        and _same_content(src, dst)
    ):
        _unlink_if_same(src, src_st)  # an earlier move got as far as the link (or copy): finish it
        return dst
    return move_file(src, plan_target(dst.parent, dst.name, lambda _p: False), expect=identity_of(src_st))


def _unlink_if_same(src: Path, src_st: os.stat_result) -> None:
    """Remove ``src`` unless another file took its name since ``src_st`` (that one is a new arrival)."""
    try:
        if _same_file(os.lstat(src), src_st):
            src.unlink()
    except FileNotFoundError:
        pass


def _temporary(dst: Path) -> Path:
    """The hidden name a copy across filesystems is written under before it is linked to ``dst``. One name per
    target (targets are unique, and one service runs per data folder), so a retry after a crash finds and
    removes what the killed attempt left. A target name too long for ``.{name}.histod.tmp`` gets a digest of
    its name instead."""
    name = f".{dst.name}.histod.tmp"
    if name_bytes(name) > NAME_MAX:
        name = f".{hashlib.sha256(os.fsencode(dst.name)).hexdigest()[:40]}.histod.tmp"
    return dst.with_name(name)


def _copy_across(src: Path, dst: Path, src_st: os.stat_result) -> Path:
    if not stat.S_ISREG(src_st.st_mode):
        raise OSError(errno.EXDEV, f"cannot move {src} (not a regular file) across filesystems")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(dst)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a copy left by a process killed in the middle of an earlier attempt
    try:
        shutil.copy2(src, tmp, follow_symlinks=False)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        if identity(src) != identity_of(src_st) or tmp.stat().st_size != src_st.st_size:
            raise SourceReplacedError(f"{src} was replaced while it was copied")
        os.link(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _unlink_if_same(src, src_st)
    return dst


# --- the move stage's one file ------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedMove:
    """A recorded file's move: the result it belongs to, where it is and where its row says it goes."""

    result_id: int
    source: Path
    target: Path
    line: dict[str, Any]
    """the file's canonical log line, completed once the move is done"""
    identity: Identity | None = None
    """the entry that was read: another one at ``source`` is not moved under this result (it is a new event)"""


def move(planned: PlannedMove) -> Move:
    """Move one file; the outcome is a Move row to save (never raises for an OS error)."""
    target = path_text(planned.target)
    error: str | None = None
    where = planned.target
    try:
        where = move_file(planned.source, planned.target, expect=planned.identity)
    except SourceReplacedError:
        error = MOVE_REPLACED
    except FileNotFoundError as exc:
        gone = exc.filename is not None and Path(exc.filename) == planned.source
        error = MOVE_VANISHED if gone else display(str(exc))
    except OSError as exc:
        error = display(str(exc))
    if error is not None:
        return Move(result_id=planned.result_id, at=utcnow(), ok=False, path=target, error=error)
    return Move(result_id=planned.result_id, at=utcnow(), ok=True, path=path_text(where), error=None)


def write_new(folder: Path, stem: str, suffix: str, data: bytes, *, exact: bool = False, first: int = 1) -> Path:
    """Write ``data`` to ``stem + suffix`` in ``folder`` (``stem-N`` + ``suffix`` when taken, N = ``first``,
    ``first + 1``, ...; FileExistsError instead with ``exact``), never over an existing file and never a part of it
    under the name: it is written to a hidden temporary first and linked into place (renamed where the file system
    has no hard links and the name is still free). Raises OSError."""
    hidden = f".{stem}{suffix}.{os.getpid()}.tmp"
    if name_bytes(hidden) > NAME_MAX:
        hidden = f".{hashlib.sha256(os.fsencode(stem + suffix)).hexdigest()[:40]}.{os.getpid()}.tmp"
    tmp = folder / hidden
    tmp.write_bytes(data)
    try:
        n = 0
        while True:
            path = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
            try:
                os.link(tmp, path)
            except FileExistsError:
                if exact:
                    raise
                n = first if n == 0 else n + 1
                continue
            except OSError:  # no hard links on this filesystem (some shares): rename, if the name is still free
                if path.exists():
                    if exact:
                        raise FileExistsError(path) from None
                    n = first if n == 0 else n + 1
                    continue
                tmp.replace(path)
            return path
    finally:
        tmp.unlink(missing_ok=True)


def write_beside(stored: Path, suffix: str, data: bytes) -> str | None:
    """Write ``data`` next to a moved file as its name + ``suffix`` (``-2``, ``-3``, ... before the suffix when
    taken; :func:`write_new`). Returns the path written, or None when it could not be (logged by the caller's
    line as null): a convenience beside the record, never part of it."""
    try:
        return path_text(write_new(stored.parent, stored.name, suffix, data, first=2))
    except OSError:
        return None
