"""Watch one folder and yield batches of COMPLETE files, in the style of ``watchfiles.watch``.

    watcher = Watcher.from_settings(settings)
    for paths in watcher.watch(stop_event):      # list[Path], never empty, no repeats within a batch
        handle(paths)

When is a file complete? Never while some process has it open for writing, when that can be known
(:mod:`histod.daemon.complete`: checked before any file is yielded, whatever made it ready). Besides:
    * Linux (inotify): on close-after-write (``FileClosedEvent``; IN_CLOSE_WRITE is sent only for a file that
      was opened for writing, so the service reading a file does not trigger it), or when it is renamed or moved
      into the folder (the atomic-rename upload: write ``x.part``, rename to ``x.png``). A regular file seen being
      written waits for its close; only if that never comes (events lost) is it taken once unchanged for
      ``close_timeout_s`` (and then only if it is not known to be still open: a writer that is only slow is
      waited for, with a ``watch.still_open`` warning).
    * Everywhere else, for the polling observer (NFS/SMB), for entries that are not regular files (symlinks,
      FIFOs, directories), for hard links and for everything found by a reconcile scan: once its ``lstat``
      (size, mtime, inode, type) is unchanged for ``stable_ms``.

Reconcile: at start, after an observer restart, after an inotify queue overflow and every
``reconcile_interval_s`` the folder is listed and every matching entry is queued: through the stability rule,
except a regular file in close-write mode that is open for writing, or whose writers cannot be known and that
changed less than ``close_timeout_s`` ago: that one waits for its close-after-write (or ``close_timeout_s``
since it last changed), as a file seen being written does.
Only the periodic scan re-yields a path that was already yielded and is unchanged and still there, and only
when it was yielded at least one interval earlier (so that a file the consumer could not move is retried, but
files still queued in the consumer are not repeated at once); otherwise a path is yielded again only after it
changed (new inode, size or mtime). The consumer must still tolerate repeats.

Decisions:
    * The folder is a tree (one folder per case): subfolders are watched and walked, whatever their names (a
      folder named ``slides.png`` is a folder), except those matching an ignore pattern (``.upload/``: nothing
      in it is taken) and symlinked ones (never followed). A folder moved in brings complete files, like a
      renamed file; the files of a new folder are found by a scan of it, then by their events.
    * Symlinks, FIFOs and sockets whose names pass the filter are yielded once stable, without
      being followed or opened (only ``lstat``), so that the service can record them as failed with a reason
      (``symlink``, ``not_a_file``) and move them aside. Only regular files are opened here, read-only, without
      following a link and without reading, for the lease that tells whether a writer has them open.
    * The watch folder is resolved (``realpath``) once: yielded paths are under the resolved folder.
    * The observer (and its emitter threads) is checked on every loop; when one died, ``watch.observer_died``
      is logged, the observer is restarted and the folder reconciled; more than ``max_restarts`` deaths within
      ``restart_window_s`` raise :class:`~histod.errors.WatchError`.
    * If inotify cannot start (watch or instance limits), the polling observer is used instead, with a warning.
      Starting, checking and restarting the observer live in :mod:`histod.daemon.observer`.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
)

from histod.daemon.complete import open_for_writing
from histod.daemon.filters import ImageFilter
from histod.daemon.observer import OVERFLOW_LOGGER, OverflowHook, Supervisor
from histod.daemon.tree import walk
from histod.db.paths import path_text
from histod.errors import WatchError
from histod.logs import get_logger

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

    from histod.settings import Settings

_Sig = tuple[int, int, int, int]  # (st_mode, st_ino, st_size, st_mtime_ns) from lstat

_MAX_DRAIN = 100_000  # events handled per loop at most, so that stop_event is still looked at in a flood


@dataclass
class _Pending:
    sig: _Sig | None
    since: float  # monotonic time at which ``sig`` was first seen
    needs_close: bool  # close-write mode: a regular file seen being written; wait for its close
    rescan: bool  # queued by a reconcile scan: may be yielded again although already yielded
    warned: bool = False  # watch.still_open was logged


def _lstat_sig(path: Path) -> tuple[_Sig, os.stat_result]:
    st = os.lstat(path)
    return (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns), st


def _superseded_dropped(events: list[FileSystemEvent]) -> list[FileSystemEvent]:
    """``events`` without the creations and modifications of a file whose close-after-write or deletion comes
    later among them: what those would have done (an lstat, a lease) the later event decides anyway (the
    close makes the file ready, the deletion forgets it). At full load this halves the work per file: its
    creation and write come with their close, and the link and unlink of its move come together."""
    settled: set[bytes | str] = set()
    kept: list[FileSystemEvent] = []
    for event in reversed(events):
        if isinstance(event, FileClosedEvent | FileDeletedEvent):
            settled.add(event.src_path)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent) and event.src_path in settled:
            continue
        kept.append(event)
    kept.reverse()
    return kept


class Watcher:
    """One stoppable watch loop over ``watch_dir`` (see the module documentation)."""

    def __init__(
        self,
        watch_dir: Path,
        filter: ImageFilter,  # the watchfiles name, although it shadows a builtin
        *,
        polling: bool = False,
        poll_interval_ms: int = 1000,
        stable_ms: int = 1000,
        debounce_ms: int = 50,
        reconcile_interval_s: float = 60.0,
        close_timeout_s: float = 120.0,
        max_restarts: int = 5,
        restart_window_s: float = 300.0,
    ) -> None:
        self.watch_dir = Path(os.path.realpath(watch_dir))
        self.filter = filter
        self.stable_s = max(stable_ms, 0) / 1000
        self.debounce_s = max(debounce_ms, 0) / 1000
        self.reconcile_interval_s = reconcile_interval_s
        self.close_timeout_s = close_timeout_s
        self._log: Any = get_logger("histod.watch")
        self._observers = Supervisor(
            self.watch_dir,
            self._log,
            polling=polling,
            poll_interval_s=max(poll_interval_ms, 1) / 1000,
            max_restarts=max_restarts,
            restart_window_s=restart_window_s,
        )
        self._pending: dict[Path, _Pending] = {}
        self._ready: dict[Path, bool] = {}  # path -> from a reconcile scan (may repeat a yielded path)
        self._yielded: dict[Path, tuple[_Sig, float]] = {}  # path -> (lstat signature, monotonic time yielded)

    @classmethod
    def from_settings(cls, settings: Settings) -> Watcher:
        return cls(
            settings.resolved_watch_dir,
            ImageFilter.from_settings(settings),
            polling=settings.polling,
            poll_interval_ms=settings.poll_interval_ms,
            stable_ms=settings.stable_ms,
            debounce_ms=settings.debounce_ms,
            reconcile_interval_s=settings.reconcile_interval_s,
        )

    @property
    def observer(self) -> BaseObserver | None:
        """The watchdog observer now running (None outside :meth:`watch`)."""
        return self._observers.observer

    @property
    def mode(self) -> str:
        """``inotify`` (close-write), ``polling``, ``native`` (another OS's observer) or ``stopped``."""
        return self._observers.mode

    @property
    def polling(self) -> bool:
        """Whether the polling observer was asked for (inotify may still fall back to it: see :attr:`mode`)."""
        return self._observers.polling

    @property
    def poll_interval_s(self) -> float:
        return self._observers.poll_interval_s

    @property
    def restart_count(self) -> int:
        """Observer restarts since :meth:`watch` began (for tests and health reporting)."""
        return self._observers.restart_count

    # --- the loop -------------------------------------------------------------------------------------
    def watch(self, stop_event: threading.Event, on_started: Callable[[], None] | None = None) -> Iterator[list[Path]]:
        """Yield non-empty batches of complete paths until ``stop_event`` is set (checked at least every 0.25 s
        while the consumer is not holding the generator). ``on_started`` is called once the observer runs and the
        first scan has queued what was there. Raises WatchError when the folder cannot be watched."""
        if not self.watch_dir.is_dir():
            raise WatchError(f"watch folder {self.watch_dir} does not exist or is not a directory")
        self._reset()
        overflow = threading.Event()
        hook = OverflowHook(overflow)
        logging.getLogger(OVERFLOW_LOGGER).addHandler(hook)
        try:
            self._observers.start(stop_event, reason="start")
            self._log.info(
                "watch.started",
                watch_dir=str(self.watch_dir),
                mode=self.mode,
                stable_ms=round(self.stable_s * 1000),
                reconcile_interval_s=self.reconcile_interval_s,
            )
            self._reconcile("start")
            if on_started is not None:
                on_started()
            next_reconcile = time.monotonic() + self.reconcile_interval_s
            while not stop_event.is_set():
                if not self._observers.alive():
                    self._log.error("watch.observer_died", watch_dir=str(self.watch_dir), mode=self.mode)
                    self._observers.start(stop_event, reason="observer_died")
                    if stop_event.is_set():
                        break
                    self._reconcile("restart")
                self._gather()
                if overflow.is_set():
                    overflow.clear()
                    self._log.warning("watch.overflowed", watch_dir=str(self.watch_dir))
                    for pending in self._pending.values():
                        pending.needs_close = False  # its close-write may be among the lost events
                    self._reconcile("overflow")
                now = time.monotonic()
                if now >= next_reconcile:
                    self._reconcile("periodic")
                    next_reconcile = now + self.reconcile_interval_s
                self._check_pending(now)
                batch = self._take_ready()
                if batch:
                    yield batch
        finally:
            logging.getLogger(OVERFLOW_LOGGER).removeHandler(hook)
            self._observers.stop()
            self._log.info("watch.stopped", watch_dir=str(self.watch_dir))

    def _reset(self) -> None:
        self._observers.reset()
        self._pending.clear()
        self._ready.clear()
        self._yielded.clear()

    # --- events ---------------------------------------------------------------------------------------
    def _gather(self) -> None:
        """Wait briefly for a first event, then handle what is queued. A file made complete by its events
        (close-after-write, a rename into the folder) is looked at at once; otherwise events are gathered for
        ``debounce_s`` before they are looked at."""
        tick = min(0.25, max(0.02, self.stable_s / 4))
        events = self._observers.events
        try:
            event = events.get(timeout=tick)
        except queue.Empty:
            return
        deadline = time.monotonic() + self.debounce_s
        drained = 0
        while True:
            queued = [event]
            while drained + len(queued) < _MAX_DRAIN:
                try:
                    queued.append(events.get_nowait())
                except queue.Empty:
                    break
            drained += len(queued)
            for event in _superseded_dropped(queued):
                self._on_event(event)
            remaining = deadline - time.monotonic()
            if self._ready or remaining <= 0 or drained >= _MAX_DRAIN:
                return
            try:
                event = events.get(timeout=remaining)
            except queue.Empty:
                return

    def _under(self, raw: bytes | str) -> Path | None:
        """The event's path when it is somewhere under the watch folder (not the folder itself)."""
        if not raw:
            return None
        path = Path(os.fsdecode(raw))
        return path if self.watch_dir in path.parents else None

    def _taken(self, path: Path) -> bool:
        return self.filter.in_tree(self.watch_dir, path)

    def _walked(self, folder: Path) -> bool:
        """A folder under the watch folder whose files are taken (no part of its path is ignored)."""
        return not any(self.filter.ignored(part) for part in folder.relative_to(self.watch_dir).parts)

    def _on_event(self, event: FileSystemEvent) -> None:
        src = self._under(event.src_path)
        folder = isinstance(event, DirDeletedEvent | DirMovedEvent)
        if isinstance(event, FileDeletedEvent | DirDeletedEvent):
            if src is not None:
                self._forget(src, folder=folder)
        elif isinstance(event, FileMovedEvent | DirMovedEvent):
            if src is not None:
                self._forget(src, folder=folder)
            dest = self._under(event.dest_path)
            if dest is None:
                return
            if folder:
                if self._walked(dest):
                    self._scan_folder(dest, arrived=True)
            elif self._taken(dest):
                self._mark_ready(dest)  # a rename is atomic: what arrives by rename is complete
        elif src is None:
            return
        elif isinstance(event, DirCreatedEvent):
            if self._walked(src):
                self._scan_folder(src, arrived=False)  # what was written before the new folder was watched
        elif not self._taken(src):
            return
        elif isinstance(event, FileClosedEvent):
            self._mark_ready(src)
        elif isinstance(event, FileCreatedEvent):
            self._track(src, written=True, rescan=False, created=True)
        elif isinstance(event, FileModifiedEvent):
            self._track(src, written=True, rescan=False)

    def _scan_folder(self, folder: Path, *, arrived: bool) -> None:
        """A folder that appeared (created, or moved in with its files: ``arrived``, complete like a renamed
        file): queue the files in it."""
        entries, _ = walk(folder, self.filter.ignored)
        for path, _st in entries:
            if self._taken(path):
                if arrived:
                    self._mark_ready(path)
                else:
                    self._track(path, written=False, rescan=False)

    def _forget(self, path: Path, *, folder: bool = False) -> None:
        """Forget ``path`` and, for a ``folder``, everything under it."""
        known: dict[Path, Any]
        for known in (self._pending, self._ready, self._yielded):
            known.pop(path, None)
            for inside in [p for p in known if path in p.parents] if folder else []:
                del known[inside]

    def _mark_ready(self, path: Path, *, rescan: bool = False) -> None:
        self._pending.pop(path, None)
        self._ready[path] = self._ready.get(path, False) or rescan

    def _track(self, path: Path, *, written: bool, rescan: bool, created: bool = False) -> None:
        """Queue ``path`` for the stability rule (or, in close-write mode, to wait for its close). ``written``: an
        event says it is being written (``created``: the event is its creation); otherwise a scan found it."""
        try:
            sig, st = _lstat_sig(path)
        except FileNotFoundError:
            self._forget(path)
            return
        except OSError:
            sig, st = None, None
        if st is not None and stat.S_ISDIR(st.st_mode):
            return  # a folder is walked into, never taken
        # in close-write mode a regular, singly linked file being written will send its close
        regular = st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink == 1
        wait_close = written and self._observers.close_write and regular
        since = time.monotonic()
        if self._observers.close_write and regular and st is not None and (created or not written):
            writing = open_for_writing(path)
            if created and writing is False:
                # no writer: it came complete (a hard link, a file in a folder moved in) or is already closed
                if path in self._ready:
                    return
                wait_close = False
            elif not written:
                # found by a scan, not by an event: it may have been opened for writing before the watch began
                wait_close = writing is not False
                if writing is None:  # cannot be known: its close, or close_timeout_s since it last changed
                    since -= max(0.0, time.time() - st.st_mtime)
        if written and path in self._ready:
            del self._ready[path]  # written again after its close: wait for the next close
        elif path in self._ready:
            self._ready[path] = self._ready[path] or rescan
            return
        pending = self._pending.get(path)
        if pending is None:
            self._pending[path] = _Pending(sig, since, wait_close, rescan)
        else:
            pending.needs_close = pending.needs_close or wait_close
            pending.rescan = pending.rescan or rescan

    def _check_pending(self, now: float) -> None:
        for path, pending in list(self._pending.items()):
            try:
                sig, _ = _lstat_sig(path)
            except FileNotFoundError:
                self._forget(path)
                continue
            except OSError:
                continue
            if sig != pending.sig:
                pending.sig, pending.since = sig, now
                continue
            quiet = now - pending.since
            if pending.needs_close:
                if quiet >= max(self.close_timeout_s, self.stable_s):
                    if open_for_writing(path):  # its writer is still there, only slow: keep waiting
                        if not pending.warned:
                            self._log.warning("watch.still_open", path=path_text(path), quiet_s=round(quiet, 1))
                        pending.since, pending.warned = now, True
                        continue
                    self._log.warning("watch.close_write_missing", path=path_text(path), quiet_s=round(quiet, 1))
                    self._mark_ready(path, rescan=pending.rescan)
            elif quiet >= self.stable_s:
                self._mark_ready(path, rescan=pending.rescan)

    def _take_ready(self) -> list[Path]:
        batch: list[Path] = []
        now = time.monotonic()
        for path, rescan in self._ready.items():
            try:
                sig, st = _lstat_sig(path)
            except OSError:
                continue  # gone again (or unreachable): its next event or scan brings it back
            if stat.S_ISDIR(st.st_mode):
                continue  # a folder now: walked into, never taken
            # already yielded, unchanged and still there: only a periodic scan repeats it, and only once it has
            # waited a whole interval (a file yielded moments ago is most likely still queued in the consumer)
            previous = self._yielded.get(path)
            if (
                previous is not None
                and previous[0] == sig
                and (not rescan or now - previous[1] < self.reconcile_interval_s)
            ):
                continue
            if stat.S_ISREG(st.st_mode) and open_for_writing(path):  # whatever said it was complete
                self._pending[path] = _Pending(sig, now, self._observers.close_write, rescan)
                continue
            self._yielded[path] = (sig, now)
            batch.append(path)
        self._ready.clear()
        return batch

    # --- reconcile ------------------------------------------------------------------------------------
    def _reconcile(self, reason: str) -> None:
        """Walk the tree; queue every matching entry (through the stability rule)."""
        if not self.watch_dir.is_dir():
            self._log.warning("watch.reconcile_failed", watch_dir=str(self.watch_dir), error="not a folder")
            return
        entries, _ = walk(self.watch_dir, self.filter.ignored)
        present = {path for path, _st in entries if self._taken(path)}
        # only the periodic scan repeats paths already yielded and unchanged (a retry for files the consumer
        # could not move); after a start, restart or overflow, new and changed entries are enough
        rescan = reason == "periodic"
        queued = 0
        for path in present:
            if path in self._pending:
                self._pending[path].rescan |= rescan
            elif path in self._ready:
                self._ready[path] |= rescan
            else:
                self._track(path, written=False, rescan=rescan)
                queued += 1
        for path in [p for p in self._yielded if p not in present]:
            del self._yielded[path]
        self._log.debug("watch.reconciled", reason=reason, found=len(present), queued=queued)
