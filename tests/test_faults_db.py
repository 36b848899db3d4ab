"""Database contention against the running service: an auditor's long read transaction neither blocks nor loses
writes (WAL: readers see their snapshot, the writer goes on); another writer holding the database locked past
the busy timeout makes the batch retry, not vanish. (tests/test_service.py tests record()'s retry alone; here it
is the whole service.)"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from histod.daemon import record
from histod.db.models import Move
from histod.db.session import open_database, reading, transaction
from histod.errors import DatabaseError
from histod.settings import Settings
from tests.faults_support import account, knob, report, tiny_png, wait_for
from tests.test_service_support import classified, moves, row_count, running_service, service_settings

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

FILES = knob("DB_FILES", 200)
BUSY_MS = 200
"""the busy_timeout_ms setting of these services (10 s by default), so that "past the busy timeout" takes moments"""


def _drop(watch: Path, prefix: str, count: int, start: int = 0) -> list[str]:
    names = [f"{prefix}{i:04d}.png" for i in range(count)]
    for i, name in enumerate(names):
        (watch / name).write_bytes(tiny_png(start + i))
    return names


def count_refusals(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[DatabaseError]:
    """Patch ``module.transaction`` so that every transaction the database refuses is counted, then re-raised."""
    seen: list[DatabaseError] = []
    real = transaction  # what the module imported

    @contextmanager
    def counting(factory: sessionmaker[Session]) -> Iterator[Session]:
        try:
            with real(factory) as session:
                yield session
        except DatabaseError as exc:
            seen.append(exc)
            raise

    monkeypatch.setattr(module, "transaction", counting)
    return seen


@pytest.fixture
def refused(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[DatabaseError]]:
    """Every transaction of the batch steps that the database refused (counted, then re-raised)."""
    yield count_refusals(monkeypatch, record)


def _first_file_done(settings: Settings) -> bool:
    """One row and its `moves` row: the service is idle again, so that the lock taken next meets a new batch."""
    return row_count(settings) == 1 and len(moves(settings)) == 1


def _db_path(settings: Settings) -> Path:
    return settings.data_dir / "histod.db"


def test_an_auditors_long_read_transaction_neither_blocks_nor_loses_writes(
    tiny_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir, batch_size=8, stable_ms=50, busy_timeout_ms=BUSY_MS)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    thread, stop, errors = running_service(settings)
    auditor: sqlite3.Connection | None = None
    try:
        names = _drop(watch, "before", 1)
        wait_for(lambda: _first_file_done(settings) or errors, 60, what="the first file, moved and its move saved")
        auditor = sqlite3.connect(_db_path(settings), isolation_level=None, check_same_thread=False)
        auditor.execute("BEGIN")
        (seen_at_start,) = auditor.execute("SELECT count(*) FROM results").fetchone()
        names += _drop(watch, "audited", FILES, start=1)
        wait_for(
            lambda: (row_count(settings) == 1 + FILES and not any(watch.iterdir())) or errors,
            120,
            what=f"{FILES} files recorded while the auditor reads",
        )
        (still_seen,) = auditor.execute("SELECT count(*) FROM results").fetchone()
        assert (seen_at_start, still_seen) == (1, 1)  # the auditor's snapshot is stable
        auditor.execute("COMMIT")
        (after,) = auditor.execute("SELECT count(*) FROM results").fetchone()
        assert after == 1 + FILES
        assert thread.is_alive() and errors == []
    finally:
        if auditor is not None:
            auditor.close()
        stop.set()
        thread.join(60)
    assert errors == []
    tally = account(settings, names)
    report(capsys, "db-reader", tally, rounds=1)
    tally.check()


def test_a_writer_holding_the_lock_past_the_busy_timeout_delays_the_batch_not_loses_it(
    tiny_run_dir: Path,
    tmp_path: Path,
    refused: list[DatabaseError],
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir, batch_size=8, stable_ms=50, busy_timeout_ms=BUSY_MS)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    thread, stop, errors = running_service(settings)
    writer: sqlite3.Connection | None = None
    try:
        names = _drop(watch, "before", 1)
        wait_for(lambda: _first_file_done(settings) or errors, 60, what="the first file, moved and its move saved")
        writer = sqlite3.connect(_db_path(settings), isolation_level=None, check_same_thread=False)
        writer.execute("BEGIN IMMEDIATE")  # another writer: holds the write lock
        names += _drop(watch, "locked", 20, start=1)
        wait_for(lambda: len(refused) >= 3 or errors, 60, what="the batch refused three times (busy timeout)")
        assert row_count(settings) == 1  # nothing written while locked, and nothing taken either
        writer.execute("ROLLBACK")
        wait_for(
            lambda: (row_count(settings) == 21 and not any(watch.iterdir())) or errors,
            120,
            what="the refused batch recorded once the lock is gone",
        )
        assert thread.is_alive() and errors == []
    finally:
        if writer is not None:
            writer.close()
        stop.set()
        thread.join(60)
    assert errors == []
    tally = account(settings, names)
    report(capsys, "db-locked", tally, rounds=1, refused_transactions=len(refused))
    tally.check()


def test_a_writer_holding_the_lock_past_every_retry_leaves_the_batch_for_later_not_lost(
    tiny_run_dir: Path,
    tmp_path: Path,
    refused: list[DatabaseError],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Locked for longer than record()'s whole retry schedule: the batch gives up, the service keeps running,
    the files stay in the watch folder, and they are recorded (once) after the lock is gone."""
    settings = service_settings(tmp_path, tiny_run_dir, batch_size=8, stable_ms=50, busy_timeout_ms=BUSY_MS)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    thread, stop, errors = running_service(settings)
    writer: sqlite3.Connection | None = None
    attempts = len(record.RECORD_RETRIES) + 1
    try:
        names = _drop(watch, "before", 1)
        wait_for(lambda: _first_file_done(settings) or errors, 60, what="the first file, moved and its move saved")
        writer = sqlite3.connect(_db_path(settings), isolation_level=None, check_same_thread=False)
        writer.execute("BEGIN EXCLUSIVE")
        names += _drop(watch, "locked", 20, start=1)
        wait_for(lambda: len(refused) > attempts or errors, 120, what="a batch refused past its every retry")
        assert row_count(settings) == 1
        assert sorted(p.name for p in watch.iterdir()) == sorted(names[1:])  # still there, nothing deleted
        writer.execute("ROLLBACK")
        wait_for(
            lambda: (row_count(settings) == 21 and not any(watch.iterdir())) or errors,
            120,
            what="the given-up batch recorded once the lock is gone",
        )
        assert thread.is_alive() and errors == []
    finally:
        if writer is not None:
            writer.close()
        stop.set()
        thread.join(60)
    assert errors == []
    tally = account(settings, names)
    report(capsys, "db-locked-past-retries", tally, rounds=1, refused_transactions=len(refused))
    tally.check()


def test_defer_keeps_a_passing_database_error_and_raises_any_other(tiny_run_dir: Path, tmp_path: Path) -> None:
    """Only a refusal that may pass (OperationalError: locked, busy, I/O) is deferred; an integrity or schema
    error would fail again on every retry, so it still stops the service with its message."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    from histod.daemon.pipeline import DEFER_RETRY_S, Pipeline
    from histod.db.models import utcnow

    now = [100.0]
    settings = service_settings(tmp_path, tiny_run_dir)
    none: Any = None
    service = Pipeline(settings, none, none, none, clock=lambda: now[0])
    batch = [(tmp_path / "a.png", utcnow()), (tmp_path / "b.png", utcnow())]
    locked = DatabaseError("database write failed: locked")
    locked.__cause__ = OperationalError("INSERT", {}, Exception("database is locked"))
    service.defer(batch, locked)
    assert set(service.deferred) == {p for p, _ in batch} and service.deferred_due == 100.0 + DEFER_RETRY_S[0]
    broken = DatabaseError("database write failed: NOT NULL")
    broken.__cause__ = IntegrityError("INSERT", {}, Exception("NOT NULL constraint failed"))
    with pytest.raises(DatabaseError, match="NOT NULL"):
        service.defer(batch, broken)


def test_a_move_row_refused_by_a_locked_database_is_saved_with_the_next_ones(tmp_path: Path) -> None:
    """The file is moved, but the database refuses its `moves` row: the service keeps the row and saves it at its
    next step, instead of leaving the moves table without it until the next start."""
    from histod.daemon.pipeline import Pipeline
    from histod.db import queries

    path = tmp_path / "locked.db"
    factory = open_database(f"sqlite:///{path}", busy_timeout_ms=50)
    with transaction(factory) as s:
        model = queries.register_model(
            s, sha256="e" * 64, run_id="r", run_path="/r", engine="litert", image_size=48, threshold=0.5, metrics={}
        )
    served = record.Served(model.id, model.sha256, "r", "litert", 0.5)
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    image.write_bytes(tiny_png(7))
    (planned,) = record.record_batch(
        factory,
        [classified(image, 0.7)],
        served=served,
        host="h",
        to=record.Destination(tmp_path / "processed", tmp_path / "failed"),
        reserved=set(),
    )
    none: Any = None
    service = Pipeline(service_settings(tmp_path, tmp_path), factory, none, served)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    service._move([planned], attempts=0)
    assert planned.target.is_file() and not image.exists()  # the move itself happened
    service._save([])  # refused by the lock
    assert len(service.unsaved) == 1
    writer.execute("ROLLBACK")
    writer.close()
    service.retry_moves()
    assert service.unsaved == []
    with reading(factory) as s:
        saved = [(m.result_id, m.ok, m.path) for m in s.scalars(select(Move))]
    assert saved == [(planned.result_id, True, str(planned.target))]


def test_a_periodic_report_refused_by_a_locked_database_does_not_stop_the_service(
    tiny_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report is written from the loop; a lock held past the busy timeout at report time must not raise out
    of the loop and stop `histod serve`: the report waits for a later tick, and files keep being served."""
    from histod.daemon import reports

    refused_reports = count_refusals(monkeypatch, reports)
    settings = service_settings(
        tmp_path, tiny_run_dir, batch_size=8, stable_ms=50, report_interval_s=0.3, busy_timeout_ms=BUSY_MS
    )
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    thread, stop, errors = running_service(settings)
    writer: sqlite3.Connection | None = None
    try:
        names = _drop(watch, "before", 1)
        wait_for(lambda: _first_file_done(settings) or errors, 60, what="the first file, moved and its move saved")
        writer = sqlite3.connect(_db_path(settings), isolation_level=None, check_same_thread=False)
        writer.execute("BEGIN IMMEDIATE")
        wait_for(lambda: refused_reports or errors, 60, what="a report refused by the lock")
        writer.execute("ROLLBACK")
        names += _drop(watch, "after", 5, start=1)
        wait_for(
            lambda: (row_count(settings) == 6 and not any(watch.iterdir())) or errors or not thread.is_alive(),
            60,
            what="files served after the refused report",
        )
        assert thread.is_alive() and errors == []
    finally:
        if writer is not None:
            writer.close()
        stop.set()
        thread.join(60)
    assert errors == []
    account(settings, names).check()


def test_a_batch_waiting_for_a_locked_database_still_pings_the_watchdog(
    tiny_run_dir: Path,
    tmp_path: Path,
    refused: list[DatabaseError],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While record() waits out a lock (with the 10 s busy timeout, ~68 s in all: past WatchdogSec=60), the loop
    does not tick; the waits between attempts now send WATCHDOG=1, so systemd does not kill a healthy service."""
    address = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(address))
    sock.settimeout(0.1)
    messages: list[str] = []
    done = threading.Event()

    def drain() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                messages.append(sock.recv(4096).decode())

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    monkeypatch.setenv("NOTIFY_SOCKET", str(address))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    settings = service_settings(tmp_path, tiny_run_dir, batch_size=8, stable_ms=50, busy_timeout_ms=BUSY_MS)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    thread, stop, errors = running_service(settings)
    writer: sqlite3.Connection | None = None
    try:
        names = _drop(watch, "before", 1)
        wait_for(lambda: _first_file_done(settings) or errors, 60, what="the first file, moved and its move saved")
        writer = sqlite3.connect(_db_path(settings), isolation_level=None, check_same_thread=False)
        writer.execute("BEGIN IMMEDIATE")
        names += _drop(watch, "locked", 8, start=1)
        wait_for(lambda: refused or errors, 60, what="the batch's first refusal")
        before = len(messages)
        wait_for(lambda: len(refused) >= 4 or errors, 60, what="three more refusals of the same batch")
        pings = messages[before:].count("WATCHDOG=1")
        writer.execute("ROLLBACK")
        wait_for(lambda: (row_count(settings) == 9 and not any(watch.iterdir())) or errors, 60, what="the batch")
    finally:
        if writer is not None:
            writer.close()
        stop.set()
        thread.join(60)
        done.set()
        reader.join(5)
        sock.close()
    assert errors == []
    assert pings >= 2, messages
    account(settings, names).check()
