"""One watchdog observer over one folder, restarted when it dies: the part of the watch loop that talks to
watchdog. :class:`~histod.daemon.watch.Watcher` decides when a file is complete; this module only keeps an
observer running and hands its events over through a queue.

* Linux: inotify with full events (a file moved in from outside arrives as a move, not as a create), which
  reports close-after-write; no modification events are asked for (:data:`CLOSE_WRITE_EVENTS`). If inotify
  cannot start (watch or instance limits), the polling observer is used instead, with a warning.
* ``polling``: ``PollingObserverVFS`` over ``lstat`` (NFS/SMB), so a symlink is seen as a link, never followed.
* An observer counts as dead when its thread or one of its emitter threads ended. Restarts are budgeted: more
  than ``max_restarts`` within ``restart_window_s`` raise :class:`~histod.errors.WatchError`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
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
    FileSystemEventHandler,
)

from histod.errors import WatchError

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]
CLOSE_WRITE_EVENTS = [event for event in EVENTS if event is not FileModifiedEvent]
"""inotify's: a write needs no event of its own where its close-after-write comes (IN_MODIFY came for every
write() call, IN_ATTRIB for every link of a move); whether a file is still open is asked of the kernel anyway
(histod.daemon.complete), and a file that changes while it waits is followed by lstat"""
OVERFLOW_LOGGER = "watchdog.observers.inotify_c"


class _QueueHandler(FileSystemEventHandler):
    """Runs in the observer thread: only hands events over, so it cannot fail."""

    def __init__(self, events: queue.SimpleQueue[FileSystemEvent]) -> None:
        self._events = events

    def dispatch(self, event: FileSystemEvent) -> None:
        self._events.put(event)


class OverflowHook(logging.Handler):
    """watchdog reports an inotify queue overflow only as a log warning; turn it into a flag."""

    def __init__(self, flag: threading.Event) -> None:
        super().__init__(level=logging.WARNING)
        self._flag = flag

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._flag.set()


class Supervisor:
    """Keeps one observer of ``watch_dir`` running; its events arrive in :attr:`events`."""

    def __init__(
        self,
        watch_dir: Path,
        log: Any,
        *,
        polling: bool,
        poll_interval_s: float,
        max_restarts: int,
        restart_window_s: float,
    ) -> None:
        self.watch_dir = watch_dir
        self.polling = polling
        self.poll_interval_s = poll_interval_s
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self._log = log
        self.observer: BaseObserver | None = None
        self.close_write = False  # the running observer reports close-after-write
        self.events: queue.SimpleQueue[FileSystemEvent] = queue.SimpleQueue()  # replaced at each (re)start
        self._restarts: deque[float] = deque()
        self.restart_count = 0  # restarts since the last reset

    @property
    def mode(self) -> str:
        """``inotify`` (close-write), ``polling``, ``native`` (another OS's observer) or ``stopped``."""
        if self.observer is None:
            return "stopped"
        if self.close_write:
            return "inotify"
        return "polling" if "Polling" in type(self.observer).__name__ else "native"

    def reset(self) -> None:
        self.events = queue.SimpleQueue()
        self._restarts.clear()
        self.restart_count = 0

    def start(self, stop_event: threading.Event, *, reason: str) -> None:
        """Start (``reason="start"``) or restart the observer. A first start that fails raises WatchError; a
        restart that fails is retried with a growing pause until it works, ``stop_event`` is set, or the restart
        budget is spent (WatchError)."""
        if self.observer is not None:
            self.stop()
        while not stop_event.is_set():
            if reason != "start":
                now = time.monotonic()
                self._restarts.append(now)
                while self._restarts and now - self._restarts[0] > self.restart_window_s:
                    self._restarts.popleft()
                if len(self._restarts) > self.max_restarts:
                    raise WatchError(
                        f"the watcher of {self.watch_dir} died {len(self._restarts)} times within "
                        f"{self.restart_window_s:.0f} s; giving up"
                    )
                self.restart_count += 1
            if not self.watch_dir.is_dir():
                raise WatchError(f"watch folder {self.watch_dir} disappeared or is not a directory")
            try:
                self._start_once()
            except OSError as exc:
                if reason == "start":
                    raise WatchError(f"cannot watch {self.watch_dir}: {exc}") from exc
                self._log.error("watch.restart_failed", watch_dir=str(self.watch_dir), error=str(exc))
                stop_event.wait(min(0.1 * 2 ** len(self._restarts), 5.0))
                continue
            if reason != "start":
                self._log.warning("watch.observer_restarted", watch_dir=str(self.watch_dir), mode=self.mode)
            return

    def alive(self) -> bool:
        observer = self.observer
        if observer is None or not observer.is_alive():
            return False
        return all(emitter.is_alive() for emitter in list(observer.emitters))

    def stop(self) -> None:
        if self.observer is not None:
            _stop(self.observer)
        self.observer = None
        self.close_write = False

    def _make(self, polling: bool) -> tuple[BaseObserver, bool]:
        if polling:
            from watchdog.observers.polling import PollingObserverVFS

            # lstat: a symlink in the folder is seen as a link, never followed
            return PollingObserverVFS(os.lstat, os.scandir, polling_interval=self.poll_interval_s), False
        if sys.platform == "linux":
            from watchdog.observers.inotify import InotifyObserver

            # full events: a file moved in from outside arrives as a move (complete), not as a create
            return InotifyObserver(generate_full_events=True), True
        else:
            from watchdog.observers import Observer

            return Observer(), False

    def _start_once(self) -> None:
        polling = self.polling
        for attempt in range(2):
            observer: BaseObserver | None = None
            try:
                observer, close_write = self._make(polling)
                self.events = queue.SimpleQueue()
                wanted = CLOSE_WRITE_EVENTS if close_write else EVENTS
                observer.schedule(_QueueHandler(self.events), str(self.watch_dir), recursive=True, event_filter=wanted)
                observer.start()
            except OSError as exc:
                if observer is not None:
                    _stop(observer)
                limits = (errno.ENOSPC, errno.EMFILE, errno.ENFILE)
                if attempt == 0 and not polling and exc.errno in limits:
                    self._log.warning(
                        "watch.inotify_unavailable",
                        error=str(exc),
                        hint="raise fs.inotify.max_user_watches / max_user_instances; using the polling observer",
                    )
                    polling = True
                    continue
                raise
            self.observer, self.close_write = observer, close_write
            return


def _stop(observer: BaseObserver) -> None:
    with contextlib.suppress(Exception):
        observer.stop()
    with contextlib.suppress(RuntimeError):
        observer.join(timeout=2.0)
