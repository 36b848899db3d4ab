"""Real-world trouble around the service's own files: a second service on the same data folder after whatever
could be deleted was deleted; the database (or its WAL) deleted while the service runs; a file still being
written when the service starts. Real `histod serve` processes, real SQLite, real folders."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults_support import account, log_events, report, serve_env, start_serve, stop_serve, tail, tiny_png
from tests.test_service_support import row_count, rows, service_settings, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


def _serve_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "histod", "serve", "--data-dir", str(root / "data"), "--model", str(run_dir), *extra]


def test_a_second_service_is_refused_even_after_every_deletable_file_is_gone(
    tiny_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    log = tmp_path / "serve.log"
    first = start_serve(tmp_path, tiny_run_dir, log)
    second: subprocess.Popen[bytes] | None = None
    names = [f"l{i:03d}.png" for i in range(100)]
    try:
        wait_for(lambda: log_events(log, "service.ready") or first.poll() is not None, 60, what="the first service")
        assert first.poll() is None, tail(log)
        # whatever an administrator (or a clean-up job) could delete without stopping the service
        for entry in settings.data_dir.iterdir():
            if entry.is_file() and not entry.name.startswith("histod.db"):
                entry.unlink()
        log2 = tmp_path / "second.log"
        second = start_serve(tmp_path, tiny_run_dir, log2)
        for i, name in enumerate(names):
            (watch / name).write_bytes(tiny_png(i))
        wait_for(
            lambda: second.poll() is not None or log_events(log2, "service.ready"), 120, what="the second to start"
        )
        code = second.wait(10) if second.poll() is not None else None
        assert code == 2, f"a second service ran beside the first (exit {code})"
        assert "another `histod serve` is using" in tail(log2), tail(log2)
        wait_for(lambda: row_count(settings) == len(names) and not any(watch.iterdir()), 120, what="every file")
        stop_serve(first, log)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    tally = account(settings, names)
    report(capsys, "second service", tally, rounds=1, second_exit=code)
    tally.check()


def test_the_lock_holds_without_any_lock_file(tiny_run_dir: Path, tmp_path: Path) -> None:
    """Nothing in the data folder is a lock that can be deleted: the service leaves no lock file behind."""
    settings = service_settings(tmp_path, tiny_run_dir)
    settings.resolved_watch_dir.mkdir(parents=True)
    done = subprocess.run(
        _serve_args(tmp_path, tiny_run_dir, "--once"), cwd=tmp_path, env=serve_env(), capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert not [p.name for p in settings.data_dir.iterdir() if "lock" in p.name]


# --- the database deleted under the running service -----------------------------------------------------------
def _count(db: Path) -> int:
    """Rows as a fresh reader sees them (a new connection each time: never one that holds a deleted file open)."""
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
        return int(connection.execute("SELECT count(*) FROM results").fetchone()[0])


def _served_one(root: Path, run_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    settings = service_settings(root, run_dir)
    settings.resolved_watch_dir.mkdir(parents=True)
    proc = start_serve(root, run_dir, log)
    (settings.resolved_watch_dir / "first.png").write_bytes(tiny_png(0))
    wait_for(lambda: log_events(log, "image.stored") == 1 or proc.poll() is not None, 60, what="the first file, moved")
    assert proc.poll() is None, tail(log)
    return proc


@pytest.mark.parametrize("deleted", ["histod.db", "histod.db-wal"])
def test_a_database_file_deleted_under_the_service_stops_it_before_anything_moves(
    tiny_run_dir: Path, tmp_path: Path, deleted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir)
    watch, db = settings.resolved_watch_dir, settings.data_dir / "histod.db"
    log = tmp_path / "serve.log"
    proc = _served_one(tmp_path, tiny_run_dir, log)
    names = [f"after{i}.png" for i in range(5)]
    try:
        (settings.data_dir / deleted).unlink()
        for i, name in enumerate(names):
            (watch / name).write_bytes(tiny_png(1 + i))
        wait_for(lambda: proc.poll() is not None or not any(watch.iterdir()), 60, what="the service to notice")
        code = proc.poll()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    errors = [
        str(e["message"])
        for e in (json.loads(line) for line in tail(log, 20000).splitlines() if line.startswith("{"))
        if e["event"] == "error"
    ]
    assert code == 5, f"exit {code}; log tail:\n{tail(log)}"
    assert len(errors) == 1 and f"{deleted} was deleted" in errors[0], errors
    assert sorted(p.name for p in watch.iterdir()) == names  # nothing taken after the deletion was moved
    first = len([p for p in settings.processed_dir.rglob("*.png")])
    assert first == 1
    # the first file's row: in the deleted database (gone with it), or rescued from the deleted WAL
    assert _count(db) == (0 if deleted == "histod.db" else 1)
    again = subprocess.run(
        _serve_args(tmp_path, tiny_run_dir, "--once"), cwd=tmp_path, env=serve_env(), capture_output=True, check=False
    )
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    expected = names if deleted == "histod.db" else ["first.png", *names]
    assert _count(db) == len(expected)
    tally = account(settings, expected)
    if deleted == "histod.db":  # the first file was moved while its row went to the database now deleted
        assert [Path(p).name for p in tally.strays] == ["first.png"]
        tally.strays, tally.stored = [], tally.stored - 1
    report(capsys, f"{deleted} deleted", tally, rounds=2, exit_code=code)
    tally.check()


# --- a file still being written when the service starts ------------------------------------------------------
def _names(db: Path) -> list[str]:
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
        return [str(n) for (n,) in connection.execute("SELECT name FROM results ORDER BY id")]


def _wait_recorded(db: Path, name: str, proc: subprocess.Popen[bytes]) -> None:
    wait_for(lambda: name in _names(db) or proc.poll() is not None, 60, what=name)


def test_a_file_still_being_written_at_start_is_taken_once_complete(
    tiny_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A slow upload: the writer holds the file open, paused for longer than stable_ms, while `serve --once` runs
    and while the service starts (its start-up scan finds it). Neither takes it; it is classified once the writer
    closes it."""
    settings = service_settings(tmp_path, tiny_run_dir)
    watch, db = settings.resolved_watch_dir, settings.data_dir / "histod.db"
    watch.mkdir(parents=True)
    data = tiny_png(7, size=96)
    log = tmp_path / "serve.log"
    proc: subprocess.Popen[bytes] | None = None
    with (watch / "upload.png").open("wb") as upload:
        upload.write(data[: len(data) // 2])
        upload.flush()
        try:
            once = subprocess.run(
                _serve_args(tmp_path, tiny_run_dir, "--once"),
                cwd=tmp_path,
                env=serve_env(),
                capture_output=True,
                check=False,
            )
            assert once.returncode == 0, once.stderr.decode()[-2000:]
            assert _names(db) == [] and (watch / "upload.png").is_file()
            proc = start_serve(tmp_path, tiny_run_dir, log)
            wait_for(lambda: log_events(log, "service.ready") or proc.poll() is not None, 60, what="ready")
            for marker in ("marker1.png", "marker2.png"):  # two round trips: far past the start-up scan's window
                (watch / marker).write_bytes(tiny_png(len(marker)))
                _wait_recorded(db, marker, proc)
            assert proc.poll() is None, tail(log)
            assert "upload.png" not in _names(db) and (watch / "upload.png").is_file()
            upload.write(data[len(data) // 2 :])
        except BaseException:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
            raise
    try:
        wait_for(lambda: "upload.png" in _names(db) and not (watch / "upload.png").exists(), 60, what="the upload")
        stop_serve(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    (row,) = [r for r in rows(settings) if r.name == "upload.png"]
    assert row.status == "classified" and Path(row.stored_path).read_bytes() == data
    tally = account(settings, ["upload.png", "marker1.png", "marker2.png"])
    report(capsys, "written at start", tally, rounds=2)
    tally.check()
