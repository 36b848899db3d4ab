"""The results database on a real SQLite file: migrations, pragmas, recording, duplicates, queries."""

from __future__ import annotations

import os
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.orm import Session, sessionmaker

from histod.db import queries
from histod.db.migrations import current_revision, head_revision, upgrade
from histod.db.models import STATUS_CLASSIFIED, STATUS_FAILED, ModelRecord, Move, Result
from histod.db.session import make_engine, open_database, reading, set_wal, transaction
from histod.errors import ConfigError, DatabaseError
from histod.settings import load_settings
from tests.test_service_support import wait_for

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _result(
    name: str, sha: str | None, *, status: str = STATUS_CLASSIFIED, at: datetime = T0, p: float = 0.7
) -> Result:
    ok = status == STATUS_CLASSIFIED
    return Result(
        original_path=f"/watch/{name}",
        name=name,
        sha256=sha,
        size_bytes=10,
        received_at=at,
        classified_at=at + timedelta(milliseconds=40),
        latency_ms=40.0,
        status=status,
        label=("Malignant" if p >= 0.5 else "Benign") if ok else None,
        p_malignant=p if ok else None,
        threshold=0.5 if ok else None,
        error_reason=None if ok else "corrupt",
        error=None if ok else "corrupt: bad",
        host="test",
        stored_path=f"/data/processed/{name}-{sha}-{at.timestamp()}",
    )


@pytest.fixture
def factory(tmp_path: Path) -> sessionmaker[Session]:
    return open_database(_url(tmp_path / "db" / "histod.db"))


def test_migrations_create_the_schema_on_an_empty_file_and_are_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "new" / "histod.db"
    engine = make_engine(_url(path))
    assert current_revision(engine) is None
    upgrade(engine)
    assert path.is_file()
    assert current_revision(engine) == head_revision() is not None
    tables = set(inspect(engine).get_table_names())
    assert {"models", "results", "moves", "reports", "alembic_version"} <= tables
    upgrade(engine)  # second time: nothing to do, nothing broken
    open_database(_url(path))
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from alembic_version")).scalar_one() == 1


def test_sqlite_pragmas_are_set_on_every_connection(tmp_path: Path) -> None:
    engine = make_engine(_url(tmp_path / "p.db"))
    with engine.connect() as conn:
        assert conn.execute(text("pragma journal_mode")).scalar_one() == "wal"
        assert conn.execute(text("pragma foreign_keys")).scalar_one() == 1
        assert conn.execute(text("pragma busy_timeout")).scalar_one() == 10_000
        assert conn.execute(text("pragma synchronous")).scalar_one() == 1  # NORMAL


def test_services_and_readers_opening_a_new_file_together_all_get_wal(tmp_path: Path) -> None:
    """Connections switching a fresh file to WAL at once. Without the retry in set_wal, 2 of 3 runs of 150 groups
    failed: one connection got "database is locked" at once (the cause of test_faults_hostile's stopped service,
    whose test helper opens the database while the service creates it)."""
    failures: list[BaseException] = []
    for i in range(300):
        url, start = f"sqlite:///{tmp_path / f'{i}.db'}", threading.Barrier(6)

        def connect(url: str = url, start: threading.Barrier = start) -> None:
            engine = make_engine(url)  # one engine each, like separate processes (an engine's first connect is
            start.wait()  # serialised by SQLAlchemy)
            try:
                with engine.connect() as c:
                    assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            except BaseException as exc:
                failures.append(exc)
            finally:
                engine.dispose()

        threads = [threading.Thread(target=connect) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert failures == []


class _LockedCursor:
    """A DB-API cursor whose journal-mode switch finds the database locked ``times`` times, then succeeds."""

    def __init__(self, times: int, message: str = "database is locked", code: int = sqlite3.SQLITE_BUSY) -> None:
        self.times, self.message, self.code, self.calls = times, message, code, 0

    def execute(self, sql: str) -> None:
        assert sql == "PRAGMA journal_mode = WAL"
        self.calls += 1
        if self.calls <= self.times:
            exc = sqlite3.OperationalError(self.message)
            exc.sqlite_errorcode = self.code  # as sqlite3 sets it on errors from the library
            raise exc


def test_set_wal_retries_a_locked_database_until_the_busy_timeout() -> None:
    slept: list[float] = []
    cursor = _LockedCursor(3)
    set_wal(cursor, 10_000, sleep=slept.append)
    assert cursor.calls == 4 and slept == [0.005, 0.01, 0.02]  # backs off, then succeeds
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        set_wal(_LockedCursor(10**6), 0, sleep=slept.append)  # no time left: the lock error is raised
    shared_cache = _LockedCursor(1, "database table is locked", sqlite3.SQLITE_LOCKED | (1 << 8))  # extended
    set_wal(shared_cache, 10_000, sleep=slept.append)
    assert shared_cache.calls == 2
    other = _LockedCursor(1, "disk I/O error, the message naming neither lock nor busy", sqlite3.SQLITE_IOERR)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        set_wal(other, 10_000, sleep=slept.append)  # not a lock: raised at once
    assert other.calls == 1


def test_a_bad_url_is_a_database_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError):
        make_engine("not a url")
    with pytest.raises(DatabaseError):
        open_database("nosuchdialect://x/y")


def test_duplicates_point_at_the_first_result_in_the_db_and_in_the_batch(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        (first,) = queries.record_results(s, [_result("a.png", "aaa")])
    with transaction(factory) as s:
        rows = queries.record_results(
            s, [_result("b.png", "bbb"), _result("a2.png", "aaa"), _result("b2.png", "bbb"), _result("x", None)]
        )
    assert [r.duplicate_of for r in rows] == [None, first.id, rows[0].id, None]
    with reading(factory) as s:
        assert queries.first_results(s, ["aaa", "bbb", "ccc"]) == {"aaa": first.id, "bbb": rows[0].id}


def test_find_unmoved_until_a_successful_move_is_recorded(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        (row,) = queries.record_results(s, [_result("a.png", "aaa")])
    with reading(factory) as s:
        found = queries.find_unmoved(s, "/watch/a.png", "aaa")
        assert found is not None and found.id == row.id
        assert queries.find_unmoved(s, "/watch/a.png", "other") is None
        assert queries.find_unmoved(s, "/watch/b.png", "aaa") is None
        assert queries.stored_path_taken(s, row.stored_path)
    with transaction(factory) as s:
        queries.record_moves(s, [Move(result_id=row.id, ok=False, path=row.stored_path, error="disk full")])
    with reading(factory) as s:
        assert queries.find_unmoved(s, "/watch/a.png", "aaa") is not None
        assert [r.id for r in queries.unmoved_results(s)] == [row.id]
    with transaction(factory) as s:
        queries.record_moves(s, [Move(result_id=row.id, ok=True, path=row.stored_path)])
    with reading(factory) as s:
        assert queries.find_unmoved(s, "/watch/a.png", "aaa") is None
        assert queries.unmoved_results(s) == []


def test_an_unreadable_file_without_a_digest_is_found_by_path(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        queries.record_results(s, [_result("fifo.png", None, status=STATUS_FAILED)])
    with reading(factory) as s:
        assert queries.find_unmoved(s, "/watch/fifo.png", None) is not None


def test_foreign_keys_are_enforced(factory: sessionmaker[Session]) -> None:
    bad = _result("a.png", "aaa")
    bad.model_id = 999
    with pytest.raises(DatabaseError), transaction(factory) as s:
        queries.record_results(s, [bad])
    with reading(factory) as s:
        assert queries.list_results(s) == []


def _register(session: Session, *, metrics: dict[str, object], run_path: str = "/runs/r1") -> ModelRecord:
    return queries.register_model(
        session,
        sha256="m" * 64,
        run_id="r1",
        run_path=run_path,
        engine="litert",
        image_size=64,
        threshold=0.5,
        metrics=metrics,
    )


def test_summary_list_results_and_reports(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        model = _register(s, metrics={"auc": 0.9})
        again = _register(s, metrics={}, run_path="/elsewhere")
        assert again.id == model.id and again.run_path == "/runs/r1"  # registered once, never updated
        rows = [
            _result("a", "1", p=0.9),
            _result("b", "2", p=0.1, at=T0 + timedelta(seconds=1)),
            _result("c", "1", p=0.8, at=T0 + timedelta(seconds=2)),
            _result("d", "3", status=STATUS_FAILED, at=T0 + timedelta(seconds=3)),
            _result("old", "4", p=0.2, at=T0 - timedelta(days=2)),
        ]
        for r in rows:
            r.model_sha256 = model.sha256 if r.status == STATUS_CLASSIFIED else None
        queries.record_results(s, rows)
    with reading(factory) as s:
        got = queries.summary(s, T0 - timedelta(hours=1), T0 + timedelta(hours=1))
        assert (got.total, got.classified, got.failed, got.duplicates) == (4, 3, 1, 1)
        assert got.by_label == {"Benign": 1, "Malignant": 2}
        assert got.by_reason == {"corrupt": 1}
        assert got.median_p == pytest.approx(0.8)
        assert got.mean_p == pytest.approx(0.6)
        assert got.latency_p50_ms == pytest.approx(40.0)
        assert got.models == ["m" * 64]
        assert got.throughput_per_s == pytest.approx(4 / 3.04)
        assert [r.name for r in queries.list_results(s, queries.ResultFilter(since=T0))] == ["a", "b", "c", "d"]
        assert [r.name for r in queries.list_results(s, queries.ResultFilter(label="benign"))] == ["b", "old"]
        assert [r.name for r in queries.list_results(s, queries.ResultFilter(status="failed"))] == ["d"]
        assert queries.list_results(s)[-1].received_at == T0 - timedelta(days=2)
        assert queries.list_results(s)[-1].received_at.tzinfo is not None
    with transaction(factory) as s:
        report = queries.add_report(s, got, host="h", model_sha256=model.sha256)
    assert report.id is not None and report.malignant == 2 and report.summary["total"] == 4


def test_target_lookups_use_an_index_not_a_table_scan(tmp_path: Path) -> None:
    """Each new file asks whether its target path and its (path, sha256) are taken; on a months-long audit
    database a table scan per file would make the service slower with every image it has ever seen."""
    factory = open_database(_url(tmp_path / "h.db"))
    plans = []
    with factory() as session:
        connection = session.connection()
        for query in (
            queries.stored_path_query("/data/processed/2026-11-26/a.png"),
            select(Result.id).where(
                Result.original_path == "/data/prediction/a.png",
                Result.sha256 == "0" * 64,
                Result.kind == "classification",
            ),
        ):
            sql = str(query.compile(connection, compile_kwargs={"literal_binds": True}))
            plans.append(" ".join(str(row[-1]) for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")))
    assert "USING INDEX uq_results_stored_path" in plans[0], plans[0]
    assert "USING INDEX ix_results_original_path" in plans[1] or "USING INDEX ix_results_sha256" in plans[1], plans[1]
    assert not any(" SCAN results" in f" {plan}" for plan in plans), plans


class _OpenedError(Exception):
    """Raised by the spy below once the service has opened its database: nothing after that is needed here."""


def test_the_busy_timeout_setting_reaches_every_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from histod import commands_report
    from histod.cli import cli
    from histod.daemon import app
    from histod.db import session as db_session

    monkeypatch.setenv("HISTOD_BUSY_TIMEOUT_MS", "1234")
    settings = load_settings(data_dir=tmp_path / "data", model=tmp_path / "no-model")
    assert settings.busy_timeout_ms == 1234
    opened: list[sessionmaker[Session]] = []
    real_open = db_session.open_database

    def spy(url: str, **kwargs: Any) -> sessionmaker[Session]:
        opened.append(real_open(url, **kwargs))
        return opened[-1]

    def service_spy(url: str, **kwargs: Any) -> sessionmaker[Session]:
        spy(url, **kwargs)
        raise _OpenedError  # before the (missing) model is loaded

    # the service opens (and migrates) the SQLite file with it
    monkeypatch.setattr(app, "open_database", service_spy)
    with pytest.raises(_OpenedError):
        app.serve(settings, threading.Event())
    assert (settings.data_dir / "histod.db").is_file()
    # `histod audit review` (writes) and `histod results` (read-only) too
    monkeypatch.setattr(db_session, "open_database", spy)
    with transaction(opened[0]) as s:
        (row,) = queries.record_results(s, [_result("a.png", "a")])
    db = ["--data-dir", str(settings.data_dir)]
    got = CliRunner().invoke(cli, ["audit", "review", str(row.id), "--label", "Benign", "--reviewer", "A", *db])
    assert got.exit_code == 0, got.output
    readers = [commands_report.open_reader(settings)]
    assert len(opened) == 2
    for factory in [*opened, *readers]:
        with reading(factory) as s:
            assert s.execute(text("pragma busy_timeout")).scalar_one() == 1234
    with pytest.raises(ConfigError, match="busy_timeout_ms"):
        load_settings(busy_timeout_ms=60_000)


def test_stored_paths_are_valid_text_and_give_the_exact_bytes_back() -> None:
    import random

    from histod.db.paths import display, path_text, text_path

    rng = random.Random(20)
    raws = [b"/w/caf\xe9.png", b"/w/a\\b.png", b"/w/a\\xe9.png", b"/w/\\\xff\\x.png", b"bytes:/w/x.png", b"/w/ok.png"]
    raws += [b"/w/" + bytes(rng.randrange(1, 256) for _ in range(12)).replace(b"/", b"_") for _ in range(200)]
    texts = [path_text(os.fsdecode(raw)) for raw in raws]
    for raw, stored in zip(raws, texts, strict=True):
        stored.encode("utf-8")  # storable
        assert os.fsencode(text_path(stored)) == raw
    assert len(set(texts)) == len(set(raws))  # one to one
    assert path_text("/w/ok.png") == "/w/ok.png"
    assert path_text(os.fsdecode(b"/w/caf\xe9.png")) == "bytes:/w/caf\\xe9.png"
    assert display(os.fsdecode(b"caf\xe9 \xc3\xa9.png")) == "caf\\xe9 é.png"


def test_the_head_read_from_the_scripts_is_alembics_and_a_database_at_it_needs_no_alembic(tmp_path: Path) -> None:
    """Start-up asks the database's alembic_version against the head the scripts declare, without importing
    Alembic; a new database is not at it, a migrated one is."""
    from histod.db.migrations import at_declared_head, declared_head

    assert declared_head() == head_revision()
    engine = make_engine(_url(tmp_path / "h.db"))
    assert not at_declared_head(engine)
    upgrade(engine)
    assert at_declared_head(engine)


def test_without_autocheckpoint_the_wal_grows_until_a_checkpointer_copies_it_into_the_database(tmp_path: Path) -> None:
    """The service's connections leave the WAL's checkpoints to a Checkpointer thread: its writes stay in the WAL
    (the database file does not grow) until the Checkpointer copies them in."""
    from histod.db.session import Checkpointer, close_database, sqlite_path

    url = _url(tmp_path / "c.db")
    factory = open_database(url, autocheckpoint=False)
    path = sqlite_path(url)
    assert path is not None
    with reading(factory) as session:
        assert session.execute(text("PRAGMA wal_autocheckpoint")).scalar_one() == 0
    before = path.stat().st_size
    with transaction(factory) as session:
        queries.record_results(session, [_result(f"f{i}.png", f"{i:064x}") for i in range(8_000)])
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size > 1000 * 4096  # past SQLite's default autocheckpoint (1,000 pages)
    assert path.stat().st_size == before  # and nothing checkpointed
    checkpointer = Checkpointer(path, interval_s=0.05).start()
    try:
        wait_for(lambda: checkpointer.checkpoints >= 1, 30, what="a checkpoint")
    finally:
        checkpointer.stop()
    assert path.stat().st_size > before
    with reading(factory) as session:
        assert session.scalar(select(func.count()).select_from(Result)) == 8_000
    close_database(factory)
