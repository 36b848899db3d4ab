"""The service's state across batches: :class:`Service` runs each batch through the steps of histod.daemon.steps
and holds what spans batches (targets claimed by moves in flight, moves to retry, batches the database refused,
files to take again). histod.daemon.loop feeds it; histod.daemon.app starts it.

A file replaced after it was read (renamed over, or dropped again while its move waits for a retry) is not
moved under the result of what was read: that result gets a final ``source replaced`` move, and the new content
is taken again as a new event.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from histod.daemon.mover import identity
from histod.daemon.steps import (
    REPLACED,
    VANISHED,
    PlannedMove,
    Predictor,
    Served,
    classify,
    intake,
    move,
    record,
    save_moves,
    settle_claimed,
)
from histod.daemon.tree import remove_if_empty
from histod.db.models import Move, utcnow
from histod.db.paths import path_text
from histod.errors import DatabaseError
from histod.logs import get_logger

if TYPE_CHECKING:
    from histod.daemon.claims import Claims
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


def by_bytes(arrivals: Sequence[tuple[Path, datetime]], limit: int) -> list[list[tuple[Path, datetime]]]:
    """``arrivals`` in order, cut into runs whose files' sizes (lstat, now) add up to at most ``limit`` bytes; a
    file larger than ``limit`` is a run of its own. The bytes of a run are in memory together (read, hashed,
    decoded), so this bounds what one batch holds."""
    runs: list[list[tuple[Path, datetime]]] = []
    total = 0
    for arrival in arrivals:
        try:
            size = os.lstat(arrival[0]).st_size
        except OSError:
            size = 0
        if not runs or total + size > limit:
            runs.append([])
            total = 0
        runs[-1].append(arrival)
        total += size
    return runs


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
        claims: Claims | None = None,
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
        self.guard: Callable[[], None] = lambda: None
        """called before each record and before moving: raises DatabaseError when the database file was deleted
        or replaced (histod.db.session.FileGuard), so that nothing is moved for rows no one can read"""
        self.claims = claims
        """several services on one database: each file is claimed before it is read (histod.daemon.claims)"""
        self.unsaved: list[tuple[Move, Path | None]] = []
        """Move rows the database refused (locked), with the file whose claim goes with them: saved again with
        the next ones"""
        self.deferred: dict[Path, datetime] = {}
        """files of batches the database refused: still in the watch folder, taken again after a while"""
        self.deferred_attempts = 0
        self.deferred_due = 0.0
        self.emptied: set[Path] = set()
        """case folders (below the watch folder) that moves took files out of: removed once empty and quiet"""
        self.tidy_due = 0.0
        self.again: dict[Path, datetime] = {}
        """files whose name now holds other content than what was read: taken again as new events"""
        self.files = 0

    def process(self, arrivals: Sequence[tuple[Path, datetime]]) -> int:
        """Run one batch; returns how many files were recorded or moved."""
        first: dict[Path, datetime] = {}
        for path, received in arrivals:
            if path in self.retrying and not self._replaced_while_waiting(path):
                continue  # its move is retried later
            first.setdefault(path, received)
            self.deferred.pop(path, None)
            self.again.pop(path, None)
        arrivals = list(first.items())
        if arrivals and self.claims is not None:
            held = self.claims.take(p for p, _ in arrivals)  # another service's files are dropped here
            arrivals = [a for a in arrivals if a[0] in held]
        if not arrivals:
            return 0
        return sum(self._steps(chunk) for chunk in by_bytes(arrivals, self.settings.max_batch_bytes))

    def _steps(self, arrivals: Sequence[tuple[Path, datetime]]) -> int:
        """intake -> classify -> record -> move for files whose bytes fit in memory together."""
        fresh, recover = intake(arrivals, self.factory, max_bytes=self.settings.max_file_bytes, pool=self.pool)
        if self.claims is not None:
            read = {t.path for t in fresh} | {m.source for m in recover}
            self.claims.release_quietly([p for p, _ in arrivals if p not in read])  # gone before it was read
        planned = list(recover)
        if fresh:
            outcomes = classify(fresh, self.predictor, self.pool, max_pixels=self.settings.max_pixels)
            del fresh  # the files' bytes: decoded, no longer needed while the batch waits for the database
            self.guard()
            planned += record(
                self.factory,
                outcomes,
                served=self.served,
                host=self.settings.host,
                processed_dir=self.settings.processed_dir,
                failed_dir=self.settings.failed_dir,
                claimed=self.claimed,
                on_wait=self.heartbeat,
                claims=self.claims,
                watch_dir=self.settings.resolved_watch_dir,
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
        if self.claims is not None:
            self.claims.forget(p for p, _ in arrivals)
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

    def take_again(self) -> None:
        """Process the files whose name was taken by other content while they waited (see :meth:`_move`)."""
        batch = list(self.again.items())
        self.again.clear()
        for start in range(0, len(batch), self.settings.batch_size):
            chunk = batch[start : start + self.settings.batch_size]
            try:
                self.process(chunk)
            except DatabaseError as exc:
                self.defer(chunk, exc)

    def tidy(self) -> None:
        """Remove the case folders that moves emptied, once they have been empty and unchanged for
        reconcile_interval_s (an upload between two files of a case keeps its folder); then their parents."""
        if not self.emptied or self.clock() < self.tidy_due:
            return
        self.tidy_due = self.clock() + 1.0
        root, now = self.settings.resolved_watch_dir, time.time()
        for folder in sorted(self.emptied, key=lambda p: -len(p.parts)):
            removed = remove_if_empty(folder, root, quiet_s=self.settings.reconcile_interval_s, now=now)
            if removed is None:
                continue
            self.emptied.discard(folder)
            if removed:
                log.debug("watch.folder_removed", folder=path_text(folder))
                if folder.parent != root:
                    self.emptied.add(folder.parent)

    def _replaced_while_waiting(self, path: Path) -> bool:
        """A file arrived under the name of one whose move waits for a retry. The same entry: False (the retry
        moves it). Another one: the waiting result is closed as replaced, and True (the arrival is new)."""
        planned = self.retrying[path].planned
        now = identity(path)
        if planned.identity is None or now is None or now == planned.identity:
            return False
        del self.retrying[path]
        self.claimed.discard(planned.target)
        self._save(
            [
                (
                    Move(
                        result_id=planned.result_id,
                        at=utcnow(),
                        ok=False,
                        path=path_text(planned.target),
                        error=REPLACED,
                    ),
                    None,
                )
            ]
        )
        log.warning("image.replaced", path=path_text(path), **planned.line, stored=None)
        return True

    def retry_moves(self, *, force: bool = False) -> None:
        if self.unsaved:
            self._save([])
        now = self.clock()
        due = [r for r in self.retrying.values() if force or r.due <= now]
        for r in due:
            del self.retrying[r.planned.source]
        for r in due:
            self._move([r.planned], attempts=r.attempts)

    def sweep(self) -> None:
        """Several services on one database: the claims heartbeat (histod.daemon.claims.Claims.beat). Files taken
        over from a service that stopped renewing its claims are processed (or, when no longer in the watch
        folder, their moves settled) here."""
        if self.claims is None:
            return
        try:
            taken = self.claims.beat()
            present = [p for p in taken if os.path.lexists(p)]
            gone = [p for p in taken if p not in set(present)]
            if gone:
                settle_claimed(self.factory, gone, self.claims)
        except DatabaseError as exc:
            log.error("claims.heartbeat_failed", error=str(exc))
            return
        now = utcnow()
        for start in range(0, len(present), self.settings.batch_size):
            chunk = [(p, now) for p in present[start : start + self.settings.batch_size]]
            try:
                self.process(chunk)
            except DatabaseError as exc:
                self.defer(chunk, exc)

    def _save(self, moves: Sequence[tuple[Move, Path | None]]) -> None:
        """Record ``moves`` with any refused earlier; kept (as fresh rows) for the next try when refused again.
        Each comes with the file whose claim the same transaction releases (None: none, or keep it)."""
        pending = [*self.unsaved, *moves]
        rows = [m for m, _ in pending]
        if save_moves(self.factory, rows, claims=self.claims, sources=[s for _, s in pending]):
            self.unsaved = []
        else:
            self.unsaved = [
                (Move(result_id=m.result_id, at=m.at or utcnow(), ok=m.ok, path=m.path, error=m.error), s)
                for m, s in pending
            ]

    def _retry_later(self, p: PlannedMove, attempts: int, target: str, error: str | None) -> None:
        wait = MOVE_RETRY_S[min(attempts, len(MOVE_RETRY_S) - 1)]
        self.retrying[p.source] = _Retry(p, attempts + 1, self.clock() + wait)
        log.error("image.move_failed", path=path_text(p.source), **p.line, target=target, error=error, retry_in_s=wait)

    def _move(self, planned: Sequence[PlannedMove], *, attempts: int) -> None:
        if planned:
            self.guard()
        if self.claims is not None and planned:
            try:  # only the holder moves: a claim taken over meanwhile leaves the file to its new holder
                mine = self.claims.ensure([p.source for p in planned])
            except DatabaseError as exc:
                for p in planned:
                    self._retry_later(p, attempts, path_text(p.target), f"claim not confirmed: {exc}")
                return
            planned = [p for p in planned if p.source in mine]
        moves = [move(p) for p in planned]
        final = [m.ok or m.error == VANISHED for m in moves]
        self._save([(m, p.source if done else None) for p, m, done in zip(planned, moves, final, strict=True)])
        for p, m in zip(planned, moves, strict=True):
            line = {"path": path_text(p.source), **p.line}
            if m.ok:
                self.claimed.discard(p.target)
                self.emptied.add(p.source.parent)  # the watch folder itself is never removed (tidy)
                log.info("image", **line, stored=m.path)
            elif m.error == VANISHED:
                self.claimed.discard(p.target)
                log.warning("image.vanished", **line, stored=None)
            elif m.error == REPLACED:  # the content read is gone; what is there now is a new event
                self.claimed.discard(p.target)
                self.again[p.source] = utcnow()
                log.warning("image.replaced", **line, stored=None)
            else:
                self._retry_later(p, attempts, m.path, m.error)
