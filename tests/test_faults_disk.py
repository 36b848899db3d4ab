"""Disk trouble under the running service: processed/ full (a 64 KiB tmpfs with a filler file) or read-only (a
read-only tmpfs), both mounted in a private mount namespace (``unshare -m``) that only the `histod serve`
subprocess sees, so nothing on the shared machine changes. Every failed move is recorded in the ``moves``
table with the OS error, the files stay in the watch folder (nothing deleted, no partial copy left behind),
and once the trouble is gone (the tmpfs is unmounted inside the namespace, as an administrator would give the
volume back) the retries move every file, exactly once.

A simulated variant (os.link raising ENOSPC in-process) is in tests/test_service.py."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.faults_support import account, knob, log_events, report, start_serve, stop_serve, tail, tiny_png, wait_for
from tests.test_service_support import moves, row_count, rows, service_settings

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

FILES = knob("DISK_FILES", 50)


def _can_mount() -> bool:
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs unshare -m and mount (root with CAP_SYS_ADMIN)")


def _in_namespace(pid: int, *command: str) -> str:
    done = subprocess.run(["nsenter", "-t", str(pid), "-m", *command], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@needs_mount
@pytest.mark.parametrize(
    ("trouble", "error"), [("full", "No space left on device"), ("read-only", "Read-only file system")]
)
def test_processed_full_or_read_only_keeps_the_files_records_the_failures_and_retries(
    tiny_run_dir: Path, tmp_path: Path, trouble: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir)
    watch, processed = settings.resolved_watch_dir, settings.processed_dir
    watch.mkdir(parents=True)
    processed.mkdir(parents=True)
    target = shlex.quote(str(processed))
    if trouble == "full":
        setup = f"mount -t tmpfs -o size=64k tmpfs {target} && (head -c 1M /dev/zero > {target}/filler || true)"
    else:
        setup = f"mount -t tmpfs -o ro,size=64k tmpfs {target}"
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{setup} && exec "$@"', "sh"]
    log = tmp_path / "serve.log"
    names = [f"d{i:03d}.png" for i in range(FILES)]
    proc = start_serve(tmp_path, tiny_run_dir, log, prefix=prefix)
    try:
        for i, name in enumerate(names):
            (watch / name).write_bytes(tiny_png(i))
        wait_for(
            lambda: (
                (row_count(settings) == FILES and len({m.result_id for m in moves(settings)}) == FILES)
                or proc.poll() is not None
            ),
            120,
            what="every file recorded, and a move attempted for each",
        )
        assert proc.poll() is None, tail(log)
        failed = moves(settings)
        assert failed and all(not m.ok and error in (m.error or "") for m in failed), failed[:3]
        assert sorted(p.name for p in watch.iterdir()) == names  # every file still where it was
        inside = _in_namespace(proc.pid, "find", str(processed), "-type", "f").split()
        assert inside == ([str(processed / "filler")] if trouble == "full" else [])  # no partial copy
        _in_namespace(proc.pid, "umount", str(processed))  # the trouble is over
        wait_for(
            lambda: not any(watch.iterdir()) or proc.poll() is not None,
            120,
            what="the retries to move every file",
        )
        stop_serve(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    tally = account(settings, names)
    failed_attempts = sum(1 for m in moves(settings) if not m.ok)
    report(capsys, f"disk-{trouble}", tally, rounds=1, failed_move_attempts=failed_attempts)
    tally.check()
    assert all(r.status == "classified" for r in rows(settings))
    assert failed_attempts >= FILES
    assert log_events(log, "image.move_failed") == failed_attempts  # and each was logged as an error
