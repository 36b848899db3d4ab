"""`histod serve`'s loop: the watcher's paths are batched (up to batch_size, waiting at most batch_timeout_ms)
and each batch goes through the steps of histod.daemon.steps; :class:`Service` holds the little state that
spans batches (targets claimed by moves in flight, moves to retry). See histod.daemon.app for start-up.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from histod.daemon.intake import scan
from histod.daemon.steps import (
    VANISHED,
    PlannedMove,
    Predictor,
    Served,
    classify,
    intake,
    move,
    record,
    save_moves,
)
from histod.db.models import Move, utcnow
from histod.errors import DatabaseError, WatchError
from histod.logs import get_logger

if TYPE_CHECKING:
    from histod.settings import Settings

log: Any = get_logger("histod.service")

MOVE_RETRY_S = (5.0, 15.0, 60.0, 300.0)
"""seconds before a failed move is tried again (the file stays in the watch folder meanwhile)"""

DEFER_RETRY_S = (2.0, 5.0, 15.0, 60.0)
"""seconds before a batch the database refused (locked past every retry, disk I/O) is taken again"""


@dataclass
class _Retry:
    planned: PlannedMove
    attempts: int
    due: float


class Service:
    """The state that spans batches; :meth:`process` runs one batch through every step."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        predictor: Predictor,
        served: Served,
        pool: ThreadPoolExecutor,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.predictor = predictor
        self.served = served
        self.pool = pool
        self.clock = clock
        self.claimed: set[Path] = set()
        self.retrying: dict[Path, _Retry] = {}
        self.heartbeat: Callable[[], None] = lambda: None
        """called while a batch waits for a locked database (the service sets it to its watchdog ping)"""
        self.unsaved: list[Move] = []
        """Move rows the database refused (locked): saved again with the next ones"""
        self.deferred: dict[Path, datetime] = {}
        """files of batches the database refused: still in the watch folder, taken again after a while"""
        self.deferred_attempts = 0
        self.deferred_due = 0.0
        self.files = 0

    def process(self, arrivals: Sequence[tuple[Path, datetime]]) -> int:
        """Run one batch; returns how many files were recorded or moved."""
        first: dict[Path, datetime] = {}
        for path, received in arrivals:
            if path not in self.retrying:
                first.setdefault(path, received)
                self.deferred.pop(path, None)
        arrivals = list(first.items())
        if not arrivals:
            return 0
        fresh, recover = intake(arrivals, self.factory, max_bytes=self.settings.max_file_bytes, pool=self.pool)
        planned = list(recover)
        if fresh:
            outcomes = classify(fresh, self.predictor, self.pool, max_pixels=self.settings.max_pixels)
            planned += record(
                self.factory,
                outcomes,
                served=self.served,
                host=self.settings.host,
                processed_dir=self.settings.processed_dir,
                failed_dir=self.settings.failed_dir,
                claimed=self.claimed,
                on_wait=self.heartbeat,
            )
        self._move(planned, attempts=0)
        self.files += len(planned)
        return len(planned)

    def defer(self, arrivals: Sequence[tuple[Path, datetime]], error: DatabaseError) -> None:
        """The database refused this batch for a passing reason (locked past every retry, I/O): nothing was
        recorded or moved, so keep its paths and take them again later rather than stop the service. Any
        other database error (a constraint, a broken schema) is raised: retrying cannot help."""
        if not isinstance(error.__cause__, OperationalError):
            raise error
        for path, received in arrivals:
            self.deferred.setdefault(path, received)
        wait = DEFER_RETRY_S[min(self.deferred_attempts, len(DEFER_RETRY_S) - 1)]
        self.deferred_attempts += 1
        self.deferred_due = self.clock() + wait
        log.error("batch.deferred", files=len(self.deferred), error=str(error), retry_in_s=wait)

    def retry_deferred(self) -> None:
        """Take the deferred files again once due (see :meth:`defer`)."""
        if not self.deferred or self.clock() < self.deferred_due:
            return
        batch = list(self.deferred.items())
        self.deferred.clear()
        for start in range(0, len(batch), self.settings.batch_size):
            chunk = batch[start : start + self.settings.batch_size]
            try:
                self.process(chunk)
            except DatabaseError as exc:
                self.defer(batch[start:], exc)
                return
        self.deferred_attempts = 0

    def retry_moves(self, *, force: bool = False) -> None:
        if self.unsaved:
            self._save([])
        now = self.clock()
        due = [r for r in self.retrying.values() if force or r.due <= now]
        for r in due:
            del self.retrying[r.planned.source]
        for r in due:
            self._move([r.planned], attempts=r.attempts)

    def _save(self, moves: Sequence[Move]) -> None:
        """Record ``moves`` with any refused earlier; kept (as fresh rows) for the next try when refused again."""
        pending = [*self.unsaved, *moves]
        if save_moves(self.factory, pending):
            self.unsaved = []
        else:
            self.unsaved = [
                Move(result_id=m.result_id, at=m.at or utcnow(), ok=m.ok, path=m.path, error=m.error) for m in pending
            ]

    def _move(self, planned: Sequence[PlannedMove], *, attempts: int) -> None:
        moves = [move(p) for p in planned]
        self._save(moves)
        for p, m in zip(planned, moves, strict=True):
            line = {"path": str(p.source), **p.line}
            if m.ok:
                self.claimed.discard(p.target)
                log.info("image", **line, stored=m.path)
            elif m.error == VANISHED:
                self.claimed.discard(p.target)
                log.warning("image.vanished", **line, stored=None)
            else:
                wait = MOVE_RETRY_S[min(attempts, len(MOVE_RETRY_S) - 1)]
                self.retrying[p.source] = _Retry(p, attempts + 1, self.clock() + wait)
                log.error("image.move_failed", **line, target=m.path, error=m.error, retry_in_s=wait)


# --- the loop --------------------------------------------------------------------------------------------
def collect(
    inbox: queue.Queue[tuple[Path, datetime]], size: int, timeout_s: float, wait_s: float = 0.5
) -> list[tuple[Path, datetime]]:
    """Up to ``size`` arrivals: wait up to ``wait_s`` for the first, then up to ``timeout_s`` for the rest."""
    try:
        batch = [inbox.get(timeout=wait_s)]
    except queue.Empty:
        return []
    deadline = time.monotonic() + timeout_s
    while len(batch) < size:
        left = deadline - time.monotonic()
        try:
            batch.append(inbox.get(timeout=left) if left > 0 else inbox.get_nowait())
        except queue.Empty:
            break
    return batch


def run_loop(
    service: Service,
    watch: Callable[[threading.Event], Any],
    stop: threading.Event,
    *,
    on_tick: Callable[[], None],
) -> None:
    """Feed the watcher's batches through ``service`` until ``stop`` is set; the batch in flight finishes."""
    inbox: queue.Queue[tuple[Path, datetime]] = queue.Queue()
    died: list[BaseException] = []
    feeder_stop = threading.Event()

    def feed() -> None:
        try:
            for paths in watch(feeder_stop):
                now = utcnow()
                for path in paths:
                    inbox.put((path, now))
        except BaseException as exc:
            died.append(exc)

    thread = threading.Thread(target=feed, name="histod-watch", daemon=True)
    thread.start()
    settings = service.settings
    try:
        while not stop.is_set():
            on_tick()
            if died or not thread.is_alive():
                error = died[0] if died else None
                raise WatchError(f"the watcher stopped: {error}") from error
            # a short wait for the first file keeps ticks (READY, watchdog, reports) prompt
            batch = collect(inbox, settings.batch_size, settings.batch_timeout_ms / 1000, wait_s=0.1)
            if batch and not stop.is_set():
                try:
                    service.process(batch)
                except DatabaseError as exc:
                    service.defer(batch, exc)  # the files stay in the watch folder; raised unless passing
            elif batch:
                break  # stopping: what was not started stays in the watch folder for the next start
            service.retry_deferred()
            service.retry_moves()
    finally:
        feeder_stop.set()
        thread.join(timeout=5)


def run_once(
    service: Service, watch_dir: Path, accept: Callable[[Path], bool], stop: threading.Event, rounds: int = 5
) -> int:
    """Process what is in the watch folder now; files written in the last stable_ms are waited for (a few
    rounds at most, so a folder that never stops changing still ends). Returns the files handled."""
    settings = service.settings
    handled = 0
    for _ in range(rounds):
        paths, wait = scan(watch_dir, accept, settle_s=settings.stable_ms / 1000, now=time.time())
        for start in range(0, len(paths), settings.batch_size):
            if stop.is_set():
                return handled
            now = utcnow()
            handled += service.process([(p, now) for p in paths[start : start + settings.batch_size]])
        if wait is None or stop.wait(wait + 0.01):
            break
    service.retry_moves(force=True)
    return handled
