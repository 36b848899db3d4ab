"""A file replaced (renamed over) after the service read it and before it moved it: while the batch waits for a
database another connection holds locked, and while the file's first move waits for a retry. The content read
keeps its row, with a final `source replaced` move; the new content is a new event: its own row, classified,
moved. Every stored file has the sha256 of its row. In-process serve() with the live watcher, real SQLite."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from histod.daemon import record
from histod.db.models import MOVE_REPLACED, MOVE_VANISHED, STATUS_CLASSIFIED, utcnow
from histod.errors import DatabaseError
from histod.settings import Settings
from tests.faults_support import tiny_png, wait_for
from tests.test_faults_db import count_refusals
from tests.test_service_support import moves, row_count, rows, running_service, service_settings

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


@pytest.fixture
def refused(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[DatabaseError]]:
    yield count_refusals(monkeypatch, record)


def _replace(path: Path, data: bytes) -> None:
    """The upload of a new version under the same name: written aside, then renamed over the old one."""
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    part.rename(path)


def _check(settings: Settings, old: bytes, new: bytes, capsys: pytest.CaptureFixture[str], fault: str) -> None:
    """Two rows for slide.png: the content read first, its file replaced (a final move, nothing stored); the new
    content, classified and stored. Every stored file is its row's content; nothing is left to move."""
    recorded = [r for r in rows(settings) if r.name == "slide.png"]
    by_sha = {r.sha256: r for r in recorded}
    first, second = by_sha.get(hashlib.sha256(old).hexdigest()), by_sha.get(hashlib.sha256(new).hexdigest())
    assert first is not None and second is not None, [(r.id, r.sha256) for r in recorded]
    assert len(recorded) == 2
    assert second.status == STATUS_CLASSIFIED and Path(second.stored_path).read_bytes() == new
    done = [m for m in moves(settings) if m.result_id == first.id]
    assert done and done[-1].error == MOVE_REPLACED and not any(m.ok for m in done)
    assert not Path(first.stored_path).exists()
    assert [m.ok for m in moves(settings) if m.result_id == second.id][-1]
    assert not any(settings.resolved_watch_dir.iterdir())
    by_stored = {r.stored_path: r for r in rows(settings)}
    stored = [p for p in settings.processed_dir.rglob("*") if p.is_file()]
    mismatched = [p for p in stored if hashlib.sha256(p.read_bytes()).hexdigest() != by_stored[str(p)].sha256]
    assert not mismatched and Path(second.stored_path) in stored
    line = f"FAULTS {fault}: rows=2 replaced=1 stored={len(stored)} stored_unlike_their_row={len(mismatched)}"
    with capsys.disabled():
        print(f"\n{line}")


def test_a_file_replaced_while_its_batch_waits_for_the_database_is_a_new_event(
    tiny_run_dir: Path, tmp_path: Path, refused: list[DatabaseError], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir, stable_ms=50, busy_timeout_ms=200)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    old, new = tiny_png(1), tiny_png(2)
    thread, stop, errors = running_service(settings)
    writer: sqlite3.Connection | None = None
    try:
        (watch / "warm-up.png").write_bytes(tiny_png(0))
        wait_for(lambda: (row_count(settings) == 1 and len(moves(settings)) == 1) or errors, 60, what="warm-up")
        writer = sqlite3.connect(settings.data_dir / "histod.db", isolation_level=None, check_same_thread=False)
        writer.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
        (watch / "slide.png").write_bytes(old)
        wait_for(lambda: refused or errors, 60, what="the batch read, classified and waiting for the lock")
        _replace(watch / "slide.png", new)
        writer.execute("ROLLBACK")
        wait_for(lambda: (row_count(settings) == 3 and not any(watch.iterdir())) or errors, 60, what="both moved")
        wait_for(lambda: len(moves(settings)) >= 3, 30, what="the moves recorded")
    finally:
        if writer is not None:
            writer.close()
        stop.set()
        thread.join(60)
    assert errors == []
    _check(settings, old, new, capsys, "replaced while locked")


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_name_dropped_again_while_its_move_waits_for_a_retry_is_a_new_event(
    tiny_run_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    database: str,
    request: pytest.FixtureRequest,
) -> None:
    """Also with PostgreSQL, where the service holds a claim on the file throughout."""
    url = request.getfixturevalue("postgres_url") if database == "postgres" else None
    settings = service_settings(tmp_path, tiny_run_dir, stable_ms=50, database_url=url)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    settings.processed_dir.mkdir(parents=True)
    blocker = settings.processed_dir / utcnow().strftime("%Y-%m-%d")
    blocker.write_bytes(b"in the way")  # every move fails (a real OS error) until it is removed
    old, new = tiny_png(1), tiny_png(2)
    thread, stop, errors = running_service(settings)
    try:
        (watch / "slide.png").write_bytes(old)
        wait_for(lambda: (moves(settings) and not moves(settings)[0].ok) or errors, 60, what="a failed first move")
        _replace(watch / "slide.png", new)  # the same name again, while the move waits for its retry
        wait_for(lambda: row_count(settings) == 2 or errors, 60, what="the new content taken as a new event")
        blocker.unlink()
        wait_for(
            lambda: (not any(watch.iterdir()) and any(m.ok for m in moves(settings))) or errors,
            60,
            what="the new content moved",
        )
    finally:
        stop.set()
        thread.join(60)
    assert errors == []
    _check(settings, old, new, capsys, f"dropped again during a move retry ({database})")


def test_files_replaced_or_removed_while_the_service_was_down(
    tiny_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The service died between its commit and its moves; meanwhile one file was replaced and one removed. The
    next start closes both rows (replaced, vanished), and the new content is a new event."""
    from tests.test_service import _once, _record_without_moving

    settings = service_settings(tmp_path, tiny_run_dir)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    old, new = tiny_png(1), tiny_png(2)
    (watch / "slide.png").write_bytes(old)
    (watch / "removed.png").write_bytes(tiny_png(3))
    _record_without_moving(settings, [watch / "slide.png", watch / "removed.png"])
    _replace(watch / "slide.png", new)
    (watch / "removed.png").unlink()
    _once(settings)
    _check(settings, old, new, capsys, "replaced while down")
    (removed,) = [r for r in rows(settings) if r.name == "removed.png"]
    assert [m.error for m in moves(settings) if m.result_id == removed.id] == [MOVE_VANISHED]
