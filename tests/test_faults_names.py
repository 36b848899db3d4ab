"""Names from the real world through the running service: names of 244-255 bytes (the longest a file system
takes), a name dropped twice (its stored name gets a suffix), moves across file systems (a hidden temporary
name beside the target), and a file that cannot be moved at all (it shows in `histod report` and in the exit
status of `serve --once`)."""

from __future__ import annotations

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
