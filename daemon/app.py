"""Start and stop the service: open the database (migrating it), load the model, register it, run the loop
(or one pass with ``once``), write reports, talk to systemd. The CLI installs the signal handlers that set
``stop`` (before it imports this module; histod.stopping catches SIGTERM from the process's first line). A stop
set during start-up ends it after the step in progress (migrating, loading the model, settling moves): each
step is complete or not begun, nothing is taken from the folder, and ``service.stopped`` is logged. Nothing here
imports TensorFlow unless the keras engine is chosen."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histod.daemon.filters import ImageFilter
from histod.daemon.loop import run_loop, run_once
from histod.daemon.metrics import Metrics, database_probe, serving
from histod.daemon.notify import notify, watchdog_period
from histod.daemon.pipeline import Pipeline
from histod.daemon.record import Served, settle_moves
from histod.daemon.reports import write_report
from histod.db import chain, queries
from histod.db.models import utcnow
from histod.db.paths import path_text
from histod.db.session import (
    Checkpointer,
    FileGuard,
    close_database,
    open_database,
    shared_database,
    sqlite_path,
    transaction,
)
from histod.errors import ConfigError, DatabaseError, ModelError, WatchError
from histod.logs import get_logger
from histod.runs import load_metrics
from histod.tiling import Scale

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from histod.daemon.claims import Claims
    from histod.settings import Settings

log: Any = get_logger("histod.service")

REPORT_RETRY_S = 60.0
"""seconds before a periodic report the database refused is tried again (its window is kept)"""


@dataclass(frozen=True)
class ServeResult:
    files: int
    started: datetime
    stopped: datetime
    start_up_only: bool = False
    """stopped during start-up: the folder was not looked at (and the database may not exist)"""
    unmoved: int = 0
    """files recorded but still waiting for a move when the service stopped (their moves failed)"""


def _stopped_in_start_up(started: datetime, after: str) -> ServeResult:
    """A stop requested before the loop began: the steps done so far are complete; nothing else is begun."""
    notify("STOPPING=1")
    stopped = utcnow()
    log.info(
        "service.stopped",
        files=0,
        seconds=round((stopped - started).total_seconds(), 2),
        during="start-up",
        after=after,
    )
    return ServeResult(0, started, stopped, start_up_only=True)


def _prepare_folders(settings: Settings) -> Path:
    watch_dir = settings.resolved_watch_dir
    for folder in (settings.data_dir, watch_dir, settings.processed_dir, settings.failed_dir, settings.reports_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {folder}: {exc.strerror}") from exc
    if not watch_dir.is_dir():
        raise WatchError(f"watch folder {watch_dir} is not a directory")
    return Path(os.path.realpath(watch_dir))


@contextmanager
def _single_instance(folders: list[Path], *, shared: bool = False) -> Iterator[None]:
    """One service per data folder and per watch folder: a second one would classify the same files twice. The
    lock is an flock on each folder itself (its directory inode), not on a file in it: nothing that can be
    deleted while the service runs lets a second one in. Not with a shared (PostgreSQL) database: there the
    services claim each file through the database (histod.daemon.claims)."""
    if shared:
        yield
        return
    fds: list[int] = []
    seen: set[tuple[int, int]] = set()
    try:
        for folder in folders:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds.append(fd)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise ConfigError(f"another `histod serve` is using {folder} (it holds the folder's lock)") from exc
            except OSError as exc:
                raise ConfigError(f"cannot lock {folder} against a second service: {exc.strerror}") from exc
        yield
    finally:
        for fd in fds:
            os.close(fd)  # closing the last descriptor releases its lock


def _register(factory: sessionmaker[Session], classifier: Any, run_dir: Path, kind: str) -> Served:
    with transaction(factory) as session:
        record = queries.register_model(
            session,
            sha256=classifier.sha256,
            run_id=classifier.run.run_id,
            run_path=str(run_dir.resolve()),
            engine=kind,
            image_size=int(classifier.image_size),
            threshold=float(classifier.threshold),
            metrics=load_metrics(run_dir),
        )
        return Served(record.id, record.sha256, record.run_id, kind, float(classifier.threshold))


def _claims(factory: sessionmaker[Session], settings: Settings) -> Claims | None:
    """Claims when the database is shared (PostgreSQL); None for SQLite, where the folder lock keeps a second
    service away and claims would only add writes under SQLite's one write lock."""
    if not shared_database(settings.resolved_database_url):
        return None
    from histod.daemon.claims import Claims

    return Claims(
        factory,
        worker_id=settings.worker_id,
        expiry_s=settings.claim_expiry_s,
        heartbeat_s=settings.claim_heartbeat_s,
    )


def _release(claims: Claims) -> None:
    """Give the claims back at a clean stop (files left then go to another service at once, not after expiry)."""
    try:
        count = claims.release_all()
    except DatabaseError as exc:
        log.warning("claims.not_released", error=str(exc), note="they expire and are taken over")
        return
    if count:
        log.info("claims.released", count=count)


def tiling_progress(pipeline: Pipeline) -> list[dict[str, Any]]:
    """The images being classified tile by tile now, with their tiles done and to do (the periodic report)."""
    out = []
    for path in list(pipeline.tiling):
        done, total = pipeline.tiles_done.get(path, (0, 0))
        out.append({"path": path_text(path), "tiles_done": done, "tiles_total": total})
    return out


class _Reporter:
    """Writes a report every ``interval`` seconds (and a last one at shutdown)."""

    def __init__(
        self, factory: sessionmaker[Session], settings: Settings, model_sha256: str, metrics: Metrics | None = None
    ) -> None:
        self.factory = factory
        self.settings = settings
        self.model_sha256 = model_sha256
        self.metrics = metrics
        self.since = utcnow()
        self.due = time.monotonic() + settings.report_interval_s
        self.in_progress: Callable[[], list[dict[str, Any]]] = list
        """the images being tiled when a report is written (histod.daemon.app.tiling_progress)"""

    def write(self) -> None:
        until = utcnow()
        write_report(
            self.factory,
            self.settings.reports_dir,
            self.since,
            until,
            host=self.settings.host,
            model_sha256=self.model_sha256,
            in_progress=self.in_progress(),
        )
        if self.metrics is not None:
            self.metrics.report_written()
        self.since = until
        self.due = time.monotonic() + self.settings.report_interval_s

    def tick(self) -> None:
        if time.monotonic() >= self.due:
            try:
                self.write()
            except DatabaseError as exc:  # e.g. locked past the busy timeout: the same window, a little later
                wait = min(REPORT_RETRY_S, self.settings.report_interval_s)
                self.due = time.monotonic() + wait
                log.error("report.failed", error=str(exc), retry_in_s=wait)


def serve(settings: Settings, stop: threading.Event, *, once: bool = False) -> ServeResult:
    """Run the service until ``stop`` is set (or, with ``once``, until the folder has been processed)."""
    started = utcnow()
    if settings.model is None:
        raise ConfigError("no model: pass --model RUN_DIR or set HISTOD_MODEL (train one with `histod train`)")
    if stop.is_set():
        return _stopped_in_start_up(started, "nothing")
    watch_dir = _prepare_folders(settings)
    # absolute paths from here on: rows record where files came from and went, whatever the working folder
    settings = settings.model_copy(update={"data_dir": settings.data_dir.absolute(), "watch_dir": watch_dir})
    folders = [settings.data_dir, watch_dir]
    with _single_instance(folders, shared=shared_database(settings.resolved_database_url)):
        return _serve(settings, watch_dir, stop, once=once, started=started)


def _serve(settings: Settings, watch_dir: Path, stop: threading.Event, *, once: bool, started: datetime) -> ServeResult:
    assert settings.model is not None
    key = chain.load_key(settings.audit_key_file)  # refused before anything is written: the key must be private
    url = settings.resolved_database_url
    path = sqlite_path(url)
    factory = open_database(url, busy_timeout_ms=settings.busy_timeout_ms, autocheckpoint=path is None)
    chain.use_key(factory, key)
    checkpointer = Checkpointer(path, busy_timeout_ms=settings.busy_timeout_ms).start() if path is not None else None
    try:
        return _run(settings, factory, watch_dir, stop, once=once, started=started)
    finally:
        if checkpointer is not None:
            checkpointer.stop()
        close_database(factory)


def _run(
    settings: Settings,
    factory: sessionmaker[Session],
    watch_dir: Path,
    stop: threading.Event,
    *,
    once: bool,
    started: datetime,
) -> ServeResult:
    assert settings.model is not None
    guard = FileGuard(factory, settings.resolved_database_url)
    if stop.is_set():
        return _stopped_in_start_up(started, "database")

    from histod.daemon.classifier import load_classifier

    classifier = load_classifier(settings.model, kind=settings.engine, threads=settings.threads)
    if classifier.name == "litert" and classifier.run.parity == "failed" and not settings.allow_parity_failure:
        raise ModelError(
            f"{settings.model}: its model.tflite failed the export parity check against model.keras (metrics.json "
            "parity); serve it anyway with --allow-parity-failure, or model.keras with --engine keras"
        )
    if stop.is_set():
        return _stopped_in_start_up(started, "model")
    served = _register(factory, classifier, settings.model, settings.engine)
    claims = _claims(factory, settings)
    settle_moves(factory, shared=claims is not None)
    if stop.is_set():
        return _stopped_in_start_up(started, "settle_moves")
    metrics = Metrics()
    metrics.model(served.sha256, served.run_id, served.engine)
    metrics.database_check(database_probe(factory))
    reporter = _Reporter(factory, settings, served.sha256, metrics)
    log.info(
        "service.started",
        watch_dir=str(watch_dir),
        database=settings.resolved_database_url,
        model=served.sha256[:12],
        run_id=served.run_id,
        engine=settings.engine,
        threshold=served.threshold,
        once=once,
        worker=claims.worker if claims is not None else None,
    )
    scale = Scale.of(classifier.run)
    with Pipeline(settings, factory, classifier, served, claims=claims, scale=scale, stop=stop) as pipeline:
        pipeline.guard = guard.check
        pipeline.metrics = metrics
        reporter.in_progress = lambda: tiling_progress(pipeline)
        try:
            if once:
                run_once(pipeline, watch_dir, ImageFilter.from_settings(settings), stop)
            else:
                with serving(metrics, settings.metrics_address, settings.metrics_port):
                    _run_forever(pipeline, settings, watch_dir, stop, reporter)
        finally:
            notify("STOPPING=1")
            try:
                if guard.intact():  # not into a database file that was deleted or replaced
                    reporter.write()
            finally:
                if pipeline.retrying:
                    log.warning("moves.pending", files=sorted(path_text(p) for p in pipeline.retrying))
                if claims is not None:
                    _release(claims)
    stopped = utcnow()
    stages = {k: {"files": c.files, "seconds": round(c.seconds, 4)} for k, c in pipeline.stats.snapshot().items()}
    seconds = round((stopped - started).total_seconds(), 2)
    log.info("service.stopped", files=pipeline.files, seconds=seconds, stages=stages)
    return ServeResult(pipeline.files, started, stopped, unmoved=len(pipeline.retrying))


def _run_forever(
    pipeline: Pipeline, settings: Settings, watch_dir: Path, stop: threading.Event, reporter: _Reporter
) -> None:
    from histod.daemon.watch import Watcher

    watcher = Watcher.from_settings(settings)
    watching = threading.Event()
    period = min(watchdog_period() or 2.0, 2.0)
    last_ping = 0.0
    ready = False

    def started() -> None:  # the watcher's thread: the observer runs and the first scan is done
        watching.set()
        pipeline.inbox.put(None)  # wake the loop: READY now, not at its next tick

    def ping() -> None:
        nonlocal last_ping
        now = time.monotonic()
        if ready and now - last_ping >= period:
            notify("WATCHDOG=1")
            last_ping = now
            if reporter.metrics is not None:
                observer = watcher.observer
                reporter.metrics.watcher(observer is not None and observer.is_alive())
                notify(f"STATUS={reporter.metrics.status_line()}")

    def tick() -> None:
        nonlocal ready
        if not ready and watching.is_set():
            ready = True
            notify("READY=1")
            if reporter.metrics is not None:
                reporter.metrics.ready()
            log.info("service.ready", watch_dir=str(watch_dir), mode=watcher.mode)
        ping()
        reporter.tick()

    # a batch waiting for a locked database (up to ~68 s with the default 10 s busy timeout) still pings the watchdog
    pipeline.heartbeat = ping
    run_loop(pipeline, lambda halt: watcher.watch(halt, on_started=started), stop, on_tick=tick)
