"""Real-world trouble around the service's own files: a second service on the same data folder after whatever
could be deleted was deleted; the database (or its WAL) deleted while the service runs; a file still being
written when the service starts. Real `histod serve` processes, real SQLite, real folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults_support import account, log_events, report, serve_env, start_serve, stop_serve, tail, tiny_png
from tests.test_service_support import row_count, service_settings, wait_for

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
        second = subprocess.Popen(
            _serve_args(tmp_path, tiny_run_dir),
            cwd=tmp_path,
            env=serve_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i, name in enumerate(names):
            (watch / name).write_bytes(tiny_png(i))
        wait_for(lambda: second.poll() is not None or row_count(settings) >= len(names), 120, what="the second")
        code = second.poll()
        _, err = second.communicate(timeout=60) if code is not None else (b"", b"")
        assert code == 2, f"a second service ran beside the first (exit {code})"
        assert "another `histod serve` is using" in err.decode(), err.decode()[-2000:]
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
