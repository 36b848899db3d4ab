"""Names from the real world through the running service: names of 244-255 bytes (the longest a file system
takes), a name dropped twice (its stored name gets a suffix), moves across file systems (a hidden temporary
name beside the target), and a file that cannot be moved at all (it shows in `histod report` and in the exit
status of `serve --once`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from histod.cli import cli
from histod.db.models import utcnow
from tests.faults_support import account, report, serve_env, tiny_png, wait_for
from tests.test_service_support import row_count, rows, running_service, service_settings

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

NAME_MAX = 255


@pytest.fixture
def far_data(tmp_path: Path) -> Iterator[Path]:
    """A data folder on another file system than the watch folder (/dev/shm), so that moves copy to a temporary
    name and link it; the watch folder itself when there is no second file system."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        yield tmp_path / "data"
        return
    folder = Path(tempfile.mkdtemp(dir=shm, prefix="histod-names-"))
    try:
        yield folder / "data"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _long_names() -> list[str]:
    names = [
        "a" * (NAME_MAX - 4) + ".png",  # 255 bytes
        "b" * (NAME_MAX - 5) + ".png",  # 254
        "c" * (244 - 4) + ".png",  # 244: `.{name}.histod.tmp` is 256
        "é" * 125 + ".png",  # 254 bytes in 129 characters
        "d" * (NAME_MAX - 5) + ".jpeg",  # 255 with a longer suffix
    ]
    assert all(244 <= len(os.fsencode(n)) <= NAME_MAX for n in names)
    return names


def test_names_up_to_the_longest_the_file_system_takes_are_moved(
    tiny_run_dir: Path, tmp_path: Path, far_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    watch = tmp_path / "prediction"
    watch.mkdir()
    settings = service_settings(tmp_path, tiny_run_dir, data_dir=far_data, watch_dir=watch, stable_ms=100)
    names = _long_names()
    thread, stop, errors = running_service(settings)
    try:
        for i, name in enumerate(names):
            (watch / name).write_bytes(tiny_png(i))
        wait_for(lambda: (row_count(settings) == len(names) and not any(watch.iterdir())) or errors, 60, what="all")
        # the same names again: their stored names get a suffix, which must still fit
        for i, name in enumerate(names):
            (watch / name).write_bytes(tiny_png(100 + i))
        wait_for(
            lambda: (row_count(settings) == 2 * len(names) and not any(watch.iterdir())) or errors, 60, what="again"
        )
    finally:
        stop.set()
        thread.join(60)
    assert errors == []
    recorded = rows(settings)
    assert all(len(os.fsencode(Path(r.stored_path).name)) <= NAME_MAX for r in recorded)
    assert len({r.stored_path for r in recorded}) == 2 * len(names)
    assert not [p for p in settings.processed_dir.rglob(".*")]  # no temporary left behind
    tally = account(settings, names)
    tally.duplicated = [d for d in tally.duplicated if not d.startswith(tuple(names))]  # each name twice, on purpose
    report(capsys, "long names", tally, rounds=2, cross_fs=far_data.parent != tmp_path)
    assert tally.rows == tally.stored == 2 * len(names)
    assert not (tally.lost or tally.left or tally.strays or tally.unmoved), tally


def test_a_file_that_cannot_be_moved_shows_in_the_report_and_in_the_exit_status(
    tiny_run_dir: Path, tmp_path: Path
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    (watch / "stuck.png").write_bytes(tiny_png(1))
    # processed/<today> is a file: nothing can be moved into it (a real OS error, ENOTDIR/EEXIST, every time)
    settings.processed_dir.mkdir(parents=True)
    blocker = settings.processed_dir / utcnow().strftime("%Y-%m-%d")
    blocker.write_bytes(b"in the way")
    args = [sys.executable, "-m", "histod", "serve", "--once", "--data-dir", str(settings.data_dir)]
    done = subprocess.run(
        [*args, "--model", str(tiny_run_dir)], cwd=tmp_path, env=serve_env(), capture_output=True, check=False
    )
    assert done.returncode == 7, (done.returncode, done.stderr.decode()[-2000:])
    assert "1 file waits for a move" in done.stderr.decode()
    assert "unmoved     1 waiting for a move (File exists 1)" in done.stdout.decode()
    assert (watch / "stuck.png").is_file() and row_count(settings) == 1
    shown = CliRunner().invoke(cli, ["report", "--data-dir", str(settings.data_dir)])
    assert shown.exit_code == 0, shown.output
    assert "unmoved     1 waiting for a move (File exists 1)" in shown.stdout
    blocker.unlink()  # the obstacle is gone: the next pass only moves it
    done = subprocess.run(
        [*args, "--model", str(tiny_run_dir)], cwd=tmp_path, env=serve_env(), capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    shown = CliRunner().invoke(cli, ["report", "--data-dir", str(settings.data_dir)])
    assert "unmoved     0 waiting for a move" in shown.stdout
    assert not any(watch.iterdir()) and row_count(settings) == 1


# --- names that are not valid UTF-8 ---------------------------------------------------------------------------
LATIN1 = b"caf\xe9.png"  # what an old SMB client writes for "café.png"
LOOKALIKE = "caf\\xe9.png"  # a valid name that reads like the escaped form of LATIN1
BROKEN = b"\xff\xfe scan.jpg"


def _raw(watch: Path, name: bytes) -> bytes:
    return os.fsencode(watch) + b"/" + name


def _drop_bytes(watch: Path, name: bytes, data: bytes) -> None:
    fd = os.open(_raw(watch, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_names_that_are_not_utf8_get_a_row_and_move(
    tiny_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from histod.db.paths import path_text, text_path

    settings = service_settings(tmp_path, tiny_run_dir, stable_ms=100)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    # present before the start (the start-up scan) and dropped while it runs (the live watcher)
    _drop_bytes(watch, LATIN1, tiny_png(1))
    thread, stop, errors = running_service(settings)
    try:
        wait_for(lambda: row_count(settings) == 1 or errors, 60, what="the file present at start")
        _drop_bytes(watch, BROKEN, tiny_png(2))
        (watch / LOOKALIKE).write_bytes(tiny_png(3))
        wait_for(lambda: (row_count(settings) == 3 and not any(watch.iterdir())) or errors, 60, what="all three")
    finally:
        stop.set()
        thread.join(60)
    assert errors == [], errors
    recorded = rows(settings)
    by_raw = {os.fsencode(text_path(r.original_path)): r for r in recorded}  # the stored form is lossless
    assert set(by_raw) == {_raw(watch, LATIN1), _raw(watch, BROKEN), _raw(watch, LOOKALIKE.encode())}
    latin1, broken, lookalike = (by_raw[_raw(watch, n)] for n in (LATIN1, BROKEN, LOOKALIKE.encode()))
    assert latin1.name == lookalike.name == "caf\\xe9.png" and broken.name == "\\xff\\xfe scan.jpg"  # as shown
    assert latin1.original_path == path_text(watch / os.fsdecode(LATIN1)) != lookalike.original_path
    assert lookalike.original_path == str(watch / LOOKALIKE)  # a valid name is stored as it is
    assert len({r.stored_path for r in recorded}) == 3
    for row in recorded:
        assert row.status == "classified" and Path(row.stored_path).is_file()
    tally = account(settings, [latin1.name, broken.name])
    tally.duplicated = [d for d in tally.duplicated if d != latin1.name]  # two files show as caf\xe9.png
    report(capsys, "non-utf8 names", tally, rounds=1)
    assert tally.rows == tally.stored == 3
    assert not (tally.lost or tally.duplicated or tally.left or tally.strays or tally.unmoved), tally
    for fmt in ("table", "csv", "json"):
        listed = CliRunner().invoke(cli, ["results", "--format", fmt, "--data-dir", str(settings.data_dir)])
        assert listed.exit_code == 0, listed.output
        names = [r["name"] for r in json.loads(listed.stdout)] if fmt == "json" else listed.stdout
        assert "caf\\xe9.png" in names, listed.output
    summary = CliRunner().invoke(cli, ["report", "--data-dir", str(settings.data_dir)])
    assert summary.exit_code == 0 and "images      3" in summary.stdout, summary.output


def test_a_service_started_with_such_a_name_waiting_runs(tiny_run_dir: Path, tmp_path: Path) -> None:
    """The name is in the folder at every start (a restart loop under systemd, until its start limit)."""
    settings = service_settings(tmp_path, tiny_run_dir)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    _drop_bytes(watch, LATIN1, tiny_png(1))
    args = [sys.executable, "-m", "histod", "serve", "--once", "--data-dir", str(settings.data_dir)]
    for _ in range(2):
        done = subprocess.run(
            [*args, "--model", str(tiny_run_dir)], cwd=tmp_path, env=serve_env(), capture_output=True, check=False
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        _drop_bytes(watch, LATIN1, tiny_png(2))  # the same name once more: a new event
        assert row_count(settings) >= 1
    assert [r.name for r in rows(settings)] == ["caf\\xe9.png", "caf\\xe9.png"]
