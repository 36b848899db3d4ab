"""The service's pipeline: the stages every file goes through, in their order, driven from this one module.

    watcher -> inbox -> batch: what is queued now (waiting for more only while the service is behind)
      1. intake   read the file once, sha256 of exactly those bytes   decode pool, one task per file
      2. decode   the model's inputs from the same bytes              (the same task)       histod.daemon.intake
      3. infer    one predict call per batch                          the infer thread      histod.daemon.infer
      4. record   ONE transaction per batch                           the main thread       histod.daemon.record
      5. move     move each file, save the moves, one log line each   the main thread       histod.daemon.mover

    an image larger than the model's tiles, after intake:
      tiles       tile by tile, one image at a time                   the tiles thread      histod.daemon.tiled
                  then record and move as above, in a transaction of its own

Decode of batch n+1 overlaps inference of batch n, and both overlap the recording and moving of earlier ones; at
most PIPELINE_DEPTH batches are between intake and record, and batches are recorded in the order they began.
A field or a slide (histod.daemon.tiled) leaves its batch after intake and is recorded when its tiles are done,
while the batches go on beside it; a stop while it is classified leaves it in the watch folder, unrecorded.
:class:`Pipeline` drives, the stage modules do; its main-thread methods own every piece of state that spans
batches (files in flight, targets reserved by moves not yet made, moves to retry, batches the database refused,
files to take again), so no other thread touches them. One place per stage reports to :class:`Stats`.

A path already in flight that arrives again waits until its batch is done (then it is looked at afresh: a
moved file is gone, new content is a new event). A file replaced after it was read (renamed over, or dropped
again while its move waits for a retry) is not moved under the result of what was read: that result gets a
final ``source replaced`` move, and the new content is taken again as a new event.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from histod.daemon import intake, record
from histod.daemon.infer import Predictor, infer
from histod.daemon.intake import Arrival, Item
from histod.daemon.mover import PlannedMove, identity, move, write_beside
from histod.daemon.record import Destination, Served
from histod.daemon.stats import Stats
from histod.daemon.tiled import classify_tiled
from histod.daemon.tree import remove_if_empty
from histod.db.models import MOVE_REPLACED, MOVE_VANISHED, STATUS_FAILED, Move, utcnow
from histod.db.paths import path_text, text_path
from histod.errors import DatabaseError
from histod.logs import get_logger

if TYPE_CHECKING:
    from types import TracebackType

    from histod.daemon.claims import Claims
    from histod.daemon.metrics import Metrics
    from histod.settings import Settings
    from histod.tiling import Scale

log: Any = get_logger("histod.service")

PIPELINE_DEPTH = 3
"""batches at most between intake and record (one decoding, one inferring, one waiting for the main thread)"""

MOVE_RETRY_S = (5.0, 15.0, 60.0, 300.0)
"""seconds before a failed move is tried again (the file stays in the watch folder meanwhile)"""

DEFER_RETRY_S = (2.0, 5.0, 15.0, 60.0)
"""seconds before a batch the database refused (locked past every retry, disk I/O) is taken again"""


@dataclass
class _Retry:
    planned: PlannedMove
    attempts: int
    due: float


@dataclass(eq=False)
class Batch:
    """Files between intake and record: each file's intake+decode task, then the batch's inference."""

    arrivals: list[Arrival]
    reads: list[Future[Item | None]] = field(default_factory=list)
    inferred: Future[list[Item]] = field(default_factory=Future)


class Pipeline:
    """The stages in order (see the module documentation). Use as a context manager: it owns the decode pool and
    the infer thread. :meth:`pump` is one turn of the service's loop; :meth:`process` runs arrivals to the end."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        predictor: Predictor,
        served: Served,
        *,
        claims: Claims | None = None,
        clock: Callable[[], float] = time.monotonic,
        stats: Stats | None = None,
        scale: Scale | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.predictor = predictor
        self.served = served
        self.claims = claims
        """several services on one database: each file is claimed before it is read (histod.daemon.claims)"""
        self.clock = clock
        self.stats = stats if stats is not None else Stats()
        self.scale = scale
        """the model's scale (histod.tiling.Scale): images larger than its tiles are tiled; None: all whole"""
        self.stop = stop if stop is not None else threading.Event()
        """the service's stop: an image being tiled when it is set is left unrecorded, for the next start"""
        self.heartbeat: Callable[[], None] = lambda: None
        """called while a batch waits for a locked database (the service sets it to its watchdog ping)"""
        self.on_recorded: Callable[[int], None] = lambda n: None
        """called with the number of files each record transaction took (`serve --once` counts them)"""
        self.metrics: Metrics | None = None
        """the service's Prometheus metrics (histod.daemon.metrics), told of each batch, row and move"""
        self.guard: Callable[[], None] = lambda: None
        """called before each record and before moving: raises DatabaseError when the database file was deleted
        or replaced (histod.db.session.FileGuard), so that nothing is moved for rows no one can read"""
        self.to = Destination(settings.processed_dir, settings.failed_dir, settings.resolved_watch_dir)
        self.inbox: queue.SimpleQueue[Arrival | None] = queue.SimpleQueue()
        """arrivals, and None when a batch's inference is done (a wake-up for the main thread)"""
        self.flight: deque[Batch] = deque()
        self.working: set[Path] = set()
        """paths of the batches in flight, until their moves are done"""
        self.held: dict[Path, datetime] = {}
        """arrivals of a path that was in flight: submitted again once its batch is done"""
        self.reserved: set[Path] = set()
        """targets of recorded files not yet moved: no other file is planned there"""
        self.retrying: dict[Path, _Retry] = {}
        self.unsaved: list[tuple[Move, Path | None]] = []
        """Move rows the database refused (locked), with the file whose claim goes with them: saved again with
        the next ones"""
        self.deferred: dict[Path, datetime] = {}
        """files of batches the database refused: still in the watch folder, taken again after a while"""
        self.deferred_attempts = 0
        self.deferred_due = 0.0
        self.again: dict[Path, datetime] = {}
        """files whose name now holds other content than what was read: taken again as new events"""
        self.emptied: set[Path] = set()
        """case folders (below the watch folder) that moves took files out of: removed once empty and quiet"""
        self.tidy_due = 0.0
        self.tiling: dict[Path, tuple[Arrival, Future[Item | None]]] = {}
        """fields and slides in the tiles thread, by path (their paths stay in ``working``)"""
        self.tiles_done: dict[Path, tuple[int, int]] = {}
        """tiles done and to do of each image in the tiles thread (the periodic report shows them)"""
        self.heatmaps: dict[Path, bytes] = {}
        """heat-map PNGs of tiled images recorded and not yet moved, by source path"""
        self.files = 0
        self._behind = False
        self._carry: Arrival | None = None
        self._decode = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="histod-decode")
        self._infer = ThreadPoolExecutor(1, thread_name_prefix="histod-infer")
        self._tiles = ThreadPoolExecutor(1, thread_name_prefix="histod-tiles")

    def __enter__(self) -> Pipeline:
        warm_up = getattr(self.predictor, "warm_up", None)
        if warm_up is not None:
            self._infer.submit(warm_up)  # while the watcher starts: the first file finds the model ready
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._decode.shutdown(wait=True, cancel_futures=True)
        self._infer.shutdown(wait=True, cancel_futures=True)
        self._tiles.shutdown(wait=True, cancel_futures=True)

    # --- driving -----------------------------------------------------------------------------------------
    def submit(self, arrivals: Iterable[tuple[Path, datetime]]) -> None:
        """Queue ``arrivals`` (paths, each with the time it was found) for the next batches."""
        for path, received_at in arrivals:
            self.inbox.put(Arrival(path, received_at))

    def pump(self, wait_s: float) -> None:
        """One turn: finish the batches whose inference is done (record, move), then start the next batch if
        there is room; wait up to ``wait_s`` when there was nothing to do."""
        if self._finish_ready():
            wait_s = 0.0
        if len(self.flight) >= PIPELINE_DEPTH:
            wait_for_future([self.flight[0].inferred], timeout=wait_s)
            return
        arrivals = self._collect(wait_s)
        if arrivals:
            self._start(arrivals)

    def finish_flight(self) -> None:
        """Finish every batch in flight and every image in the tiles thread, starting none (a stop: what was not
        started stays in the folder, and so does an image whose tiling the stop cut short)."""
        while self.flight or self.tiling:
            pending: list[Future[Any]] = [self.flight[0].inferred] if self.flight else []
            pending += [future for _, future in self.tiling.values()]
            wait_for_future(pending, return_when=FIRST_COMPLETED)
            self._finish_ready()

    def drain(self, stop: Any = None) -> None:
        """Run until everything submitted is recorded and moved (or ``stop`` is set: then the batches in flight
        finish and the rest stays in the watch folder)."""
        while (self.flight or self.tiling or self._carry is not None or not self.inbox.empty()) and not (
            stop and stop.is_set()
        ):
            self.pump(0.05)
        self.finish_flight()

    def process(self, arrivals: Sequence[tuple[Path, datetime]]) -> int:
        """Run ``arrivals`` through every stage; returns how many files were recorded or moved meanwhile."""
        before = self.files
        self.submit(arrivals)
        self.drain()
        return self.files - before

    # --- batching: what is queued, and waiting for more only while behind ----------------------------------
    def _collect(self, wait_s: float) -> list[Arrival]:
        """The next batch: the first arrival (waiting up to ``wait_s`` for it), then what is already queued, up to
        batch_size files whose sizes fit in max_batch_bytes (a single larger file goes alone). Only while the
        service is behind (its last batch was full) does a batch wait up to batch_timeout_ms for companions."""
        first = self._carry if self._carry is not None else self._next(wait_s)
        self._carry = None
        if not isinstance(first, Arrival):
            return []
        settings = self.settings
        batch, total = [first], _size(first.path)
        deadline = time.monotonic() + settings.batch_timeout_ms / 1000 if self._behind else 0.0
        while len(batch) < settings.batch_size:
            got = self._next(deadline - time.monotonic())
            if got is True:
                continue  # a wake-up: the batch that finished is recorded at the next turn
            if got is False:
                break
            size = _size(got.path)
            if total + size > settings.max_batch_bytes:
                self._carry = got
                break
            batch.append(got)
            total += size
        self._behind = len(batch) >= settings.batch_size or self._carry is not None
        return batch

    def _next(self, timeout: float) -> Arrival | bool:
        """The next arrival; True for a wake-up, False when nothing came within ``timeout``."""
        try:
            got = self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return False
        return True if got is None else got

    # --- 1-2. intake and decode: one task per file in the decode pool ----------------------------------------
    def _start(self, arrivals: list[Arrival]) -> None:
        """Claim the files (several services), hand each to the decode pool and the batch to the infer thread."""
        fresh: dict[Path, Arrival] = {}
        for arrival in arrivals:
            path = arrival.path
            if path in self.working:
                self.held.setdefault(path, arrival.received_at)  # its batch in flight goes first
                continue
            if path in self.retrying and not self._replaced_while_waiting(path):
                continue  # its move is retried later
            fresh.setdefault(path, arrival)
            self.deferred.pop(path, None)
            self.again.pop(path, None)
        started = list(fresh.values())
        if started and self.claims is not None:
            try:
                held = self.claims.claim(fresh.keys())  # another service's files are dropped here
            except DatabaseError as exc:
                self.defer(started, exc)
                return
            started = [a for a in started if a.path in held]
        if not started:
            return
        self.working.update(a.path for a in started)
        s, size = self.settings, self.predictor.image_size
        batch = Batch(started)
        batch.reads = [
            self._decode.submit(
                intake.prepare, a, size, max_bytes=s.max_file_bytes, max_pixels=s.max_pixels, scale=self.scale
            )
            for a in started
        ]
        batch.inferred = self._infer.submit(self._infer_batch, batch)
        batch.inferred.add_done_callback(lambda _done: self.inbox.put(None))
        self.flight.append(batch)

    # --- 3. infer: the infer thread, one batch at a time, in order ------------------------------------------
    def _infer_batch(self, batch: Batch) -> list[Item]:
        items = [item for item in (read.result() for read in batch.reads) if item is not None]
        self.stats.add("intake", len(items), sum(i.read_s for i in items))
        self.stats.add("decode", len(items), sum(i.decode_s for i in items))
        start = time.perf_counter()
        infer(items, self.predictor)
        self.stats.add("infer", len(items), time.perf_counter() - start)
        return items

    # --- 4. record: the main thread, one transaction per batch ------------------------------------------------
    def _finish_ready(self) -> bool:
        """Record and move every batch whose inference is done, in one transaction: a service that is behind
        records several batches at once. Then each image whose tiles are done, in a transaction of its own."""
        ready: list[Batch] = []
        while self.flight and self.flight[0].inferred.done():
            ready.append(self.flight.popleft())
        if ready:
            self._finish(ready)
        tiled = [path for path, (_, future) in self.tiling.items() if future.done()]
        for path in tiled:
            self._finish_tiled(path)
        return bool(ready or tiled)

    def _finish(self, batches: list[Batch]) -> None:
        items = [item for batch in batches for item in batch.inferred.result()]
        arrivals = [arrival for batch in batches for arrival in batch.arrivals]
        if self.claims is not None:
            read = {item.path for item in items}
            self.claims.release_quietly([a.path for a in arrivals if a.path not in read])  # gone before it was read
        tiling = {item.path: item for item in items if item.for_tiles}
        if tiling:
            for path in self._recorded_before(list(tiling.values())):
                del tiling[path]  # its row is committed: only its move is left (record_batch finds the row)
        if tiling:
            items = [item for item in items if item.path not in tiling]
            for arrival in arrivals:
                if arrival.path in tiling:
                    self._start_tiling(arrival, tiling[arrival.path])
            arrivals = [a for a in arrivals if a.path not in tiling]
        self._complete(items, arrivals, batches)

    def _complete(self, items: list[Item], arrivals: list[Arrival], batches: list[Batch]) -> None:
        """Record ``items`` in one transaction, move them, and let their paths go."""
        try:
            planned = self._record(items) if items else []
        except DatabaseError as exc:
            self._done(arrivals)
            self.defer(arrivals, exc)
            return
        self.deferred_attempts = 0
        self._move(planned, attempts=0)
        self.files += len(planned)
        self.on_recorded(len(planned))
        self._done(arrivals)
        if self.metrics is not None:
            self._measure(batches, planned)
        if not (self.flight and self.flight[0].inferred.done()):
            self._save([])  # no transaction is due soon to take the moves rows along

    # --- tiles: an image larger than the model's tiles, in the tiles thread, one at a time -----------------------
    def _recorded_before(self, items: list[Item]) -> set[Path]:
        """Images recorded by an earlier run and never moved: not tiled again (a slide takes minutes)."""
        try:
            return record.recorded_before(self.factory, items)
        except DatabaseError:
            return set()  # tiled again; the record transaction then finds the row as it does for any file

    def _start_tiling(self, arrival: Arrival, item: Item) -> None:
        assert self.scale is not None
        path, s = item.path, self.settings

        def progress(done: int, total: int) -> None:
            self.tiles_done[path] = (done, total)

        future = self._tiles.submit(
            classify_tiled,
            item,
            self.predictor,
            self.scale,
            max_pixels=s.max_pixels,
            max_bytes=s.max_file_bytes,
            stop=self.stop.is_set,
            progress=progress,
            heatmap_min_tiles=s.heatmap_min_tiles if s.heatmaps else None,
        )
        future.add_done_callback(lambda _done: self.inbox.put(None))
        self.tiling[path] = (arrival, future)

    def _finish_tiled(self, path: Path) -> None:
        arrival, future = self.tiling.pop(path)
        self.tiles_done.pop(path, None)
        item = future.result()
        if item is None:  # stopped, or the file changed meanwhile: nothing recorded, the file stays
            if self.claims is not None:
                self.claims.release_quietly([path])
            self._done([arrival])
            return
        self.stats.add("tiles", 1, item.decode_s)
        if item.heatmap is not None:
            self.heatmaps[path] = item.heatmap
            item.heatmap = None
        self._complete([item], [arrival], [])

    def _measure(self, batches: list[Batch], planned: list[PlannedMove]) -> None:
        metrics = self.metrics
        assert metrics is not None
        for batch in batches:
            metrics.batch(len(batch.arrivals))
        for p in planned:
            if not p.line.get("recovered"):  # a row of an earlier run, only moved now: counted by that run
                metrics.file_done(p.line["status"], p.line["label"], p.line["reason"], p.line["ms"] / 1000)
        metrics.queue_depth(len(self.working) + len(self.held) + len(self.deferred))

    def _record(self, items: list[Item]) -> list[PlannedMove]:
        self.guard()
        start = time.perf_counter()
        planned = record.record_batch(
            self.factory,
            items,
            served=self.served,
            host=self.settings.host,
            to=self.to,
            reserved=self.reserved,
            moves=self.unsaved,
            on_wait=self.heartbeat,
            claims=self.claims,
        )
        self.unsaved = []
        self.stats.add("record", len(items), time.perf_counter() - start)
        return planned

    def _done(self, arrivals: list[Arrival]) -> None:
        for arrival in arrivals:
            self.working.discard(arrival.path)
            if arrival.path in self.held:
                self.inbox.put(Arrival(arrival.path, self.held.pop(arrival.path)))

    # --- 5. move, save the moves, log: the main thread ----------------------------------------------------------
    def _move(self, planned: Sequence[PlannedMove], *, attempts: int) -> None:
        """Move each file and log its line; the moves rows wait in ``unsaved`` for the next transaction."""
        if not planned:
            return
        start = time.perf_counter()
        self.guard()
        if self.claims is not None:
            try:  # only the holder moves: a claim taken over meanwhile leaves the file to its new holder
                mine = self.claims.ensure([p.source for p in planned])
            except DatabaseError as exc:
                for p in planned:
                    self._retry_later(p, attempts, path_text(p.target), f"claim not confirmed: {exc}")
                return
            planned = [p for p in planned if p.source in mine]
        for p in planned:
            m = move(p)
            final = m.ok or m.error == MOVE_VANISHED  # the claim goes with the row: nothing more to do here
            self.unsaved.append((m, p.source if final else None))
            line = {"path": path_text(p.source), **p.line}
            if m.ok:
                self.reserved.discard(p.target)
                self.emptied.add(p.source.parent)  # the watch folder itself is never removed (tidy)
                png = self.heatmaps.pop(p.source, None)
                if png is not None:
                    line["heatmap"] = write_beside(text_path(m.path), ".heatmap.png", png)
                # a failed image is a warning, so that `journalctl -p warning` lists it
                emit = log.warning if p.line.get("status") == STATUS_FAILED else log.info
                emit("image.stored", **line, stored=m.path)
                if self.metrics is not None:
                    self.metrics.move_done()
            elif m.error == MOVE_VANISHED:
                self.reserved.discard(p.target)
                self.heatmaps.pop(p.source, None)
                log.warning("image.vanished", **line, stored=None)
            elif m.error == MOVE_REPLACED:  # the content read is gone; what is there now is a new event
                self.reserved.discard(p.target)
                self.heatmaps.pop(p.source, None)
                self.again[p.source] = utcnow()
                log.warning("image.replaced", **line, stored=None)
            else:
                self._retry_later(p, attempts, m.path, m.error)
                if self.metrics is not None:
                    self.metrics.move_failed(m.error or "unknown")
        if self.metrics is not None:
            self.metrics.moves_pending(len(self.retrying))
        self.stats.add("move", len(planned), time.perf_counter() - start)

    def _save(self, moves: Sequence[tuple[Move, Path | None]]) -> None:
        """Save the moves rows not yet saved, and ``moves``, in a transaction of their own; kept for the next try
        when the database refuses them. Each comes with the file whose claim the same transaction releases
        (None: none, or keep it)."""
        pending = [*self.unsaved, *moves]
        if not pending:
            return
        ok = record.save_moves(
            self.factory, [m for m, _ in pending], claims=self.claims, sources=[s for _, s in pending]
        )
        self.unsaved = [] if ok else pending

    def _retry_later(self, p: PlannedMove, attempts: int, target: str, error: str | None) -> None:
        wait = MOVE_RETRY_S[min(attempts, len(MOVE_RETRY_S) - 1)]
        self.retrying[p.source] = _Retry(p, attempts + 1, self.clock() + wait)
        log.error("image.move_failed", path=path_text(p.source), **p.line, target=target, error=error, retry_in_s=wait)

    # --- between batches: retries, files taken again, tidying, the claims heartbeat -------------------------------
    def housekeeping(self) -> None:
        self.retry_deferred()
        self.retry_moves()
        self.take_again()
        self.tidy()
        self.sweep()

    def defer(self, arrivals: Sequence[tuple[Path, datetime]], error: DatabaseError) -> None:
        """The database refused these files for a passing reason (locked past every retry, I/O): nothing was
        recorded or moved, so keep their paths and take them again later rather than stop the service. Any
        other database error (a constraint, a broken schema, a deleted database file) is raised: retrying
        cannot help."""
        if not isinstance(error.__cause__, OperationalError):
            raise error
        for path, received in arrivals:
            self.deferred.setdefault(path, received)
        if self.claims is not None:
            self.claims.forget(path for path, _ in arrivals)
        wait = DEFER_RETRY_S[min(self.deferred_attempts, len(DEFER_RETRY_S) - 1)]
        self.deferred_attempts += 1
        self.deferred_due = self.clock() + wait
        log.error("batch.deferred", files=len(self.deferred), error=str(error), retry_in_s=wait)

    def retry_deferred(self) -> None:
        """Take the deferred files again once due (see :meth:`defer`)."""
        if self.deferred and self.clock() >= self.deferred_due:
            self.submit(self.deferred.items())
            self.deferred.clear()

    def take_again(self) -> None:
        """Take the files whose name was taken by other content while they waited (see :meth:`_move`)."""
        if self.again:
            self.submit(self.again.items())
            self.again.clear()

    def retry_moves(self, *, force: bool = False) -> None:
        """Save the moves rows the database refused (unless a batch in flight will take them along), then try
        again the moves that failed, once due (``force``: all of them now)."""
        if self.unsaved and (force or not self.flight):
            self._save([])
        now = self.clock()
        due = [r for r in self.retrying.values() if force or r.due <= now]
        for r in due:
            del self.retrying[r.planned.source]
        for r in due:
            self._move([r.planned], attempts=r.attempts)
        if due:
            self._save([])

    def _replaced_while_waiting(self, path: Path) -> bool:
        """A file arrived under the name of one whose move waits for a retry. The same entry: False (the retry
        moves it). Another one: the waiting result is closed as replaced, and True (the arrival is new)."""
        planned = self.retrying[path].planned
        now = identity(path)
        if planned.identity is None or now is None or now == planned.identity:
            return False
        del self.retrying[path]
        self.reserved.discard(planned.target)
        closed = Move(
            result_id=planned.result_id, at=utcnow(), ok=False, path=path_text(planned.target), error=MOVE_REPLACED
        )
        self._save([(closed, None)])
        log.warning("image.replaced", path=path_text(path), **planned.line, stored=None)
        return True

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
                log.debug("folder.removed", folder=path_text(folder))
                if folder.parent != root:
                    self.emptied.add(folder.parent)

    def sweep(self) -> None:
        """Several services on one database: the claims heartbeat (histod.daemon.claims.Claims.beat). Files taken
        over from a service that stopped renewing its claims are taken again (or, when no longer in the watch
        folder, their moves settled) here."""
        if self.claims is None:
            return
        try:
            taken = self.claims.beat()
            if self.metrics is not None:
                self.metrics.claims_held(len(self.claims.confirmed))
            present = [p for p in taken if os.path.lexists(p)]
            gone = [p for p in taken if p not in set(present)]
            if gone:
                record.settle_claimed(self.factory, gone, self.claims)
        except DatabaseError as exc:
            log.error("heartbeat.failed", error=str(exc))
            return
        now = utcnow()
        self.submit(Arrival(p, now) for p in present)


def _size(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0
