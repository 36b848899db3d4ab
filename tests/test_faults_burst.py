"""A burst of 10,000 small files dropped at once into the watched folder of a running `histod serve`: all are
processed, exactly once.

To go past the inotify queue for certain (max_queued_events is 16384 here and may not be raised on a shared
machine), the service is frozen with SIGSTOP while the files are written: each file queues a create and a
close-write event, so 10,000 files queue ~20,000 events and the kernel drops the rest (IN_Q_OVERFLOW). After
SIGCONT the service must notice the overflow and reconcile the folder."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults_support import account, knob, log_events, report, start_serve, stop_serve, tiny_png, wait_for
from tests.test_service_support import row_count, service_settings

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

FILES = knob("BURST_FILES", 10_000)


def _queue_limit() -> int | None:
    try:
        return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    except (OSError, ValueError):
        return None


def test_a_burst_past_the_inotify_queue_is_processed_exactly_once(
    tiny_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    log = tmp_path / "serve.log"
    names = ["probe.png", *(f"b{i:05d}.png" for i in range(FILES))]
    data = [tiny_png(i) for i in range(FILES)]
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = start_serve(tmp_path, tiny_run_dir, log, batch_size=32)
        (watch / "probe.png").write_bytes(tiny_png(-1))
        wait_for(lambda: row_count(settings) == 1, 60, what="the probe file (the watcher is running)")
        os.kill(proc.pid, signal.SIGSTOP)  # the observer cannot drain the inotify queue now
        try:
            for name, content in zip(names[1:], data, strict=True):
                (watch / name).write_bytes(content)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        dropped = time.monotonic()
        wait_for(
            lambda: row_count(settings) >= len(names) and not any(watch.iterdir()),
            400,
            interval=0.5,
            what=f"all {len(names)} files recorded and moved",
        )
        seconds = time.monotonic() - dropped
        stop_serve(proc, log)
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(10)
    tally = account(settings, names)
    overflows = log_events(log, "watch.overflowed")
    report(
        capsys,
        "burst",
        tally,
        rounds=1,
        seconds=round(seconds, 1),
        files_per_s=round(FILES / seconds),
        inotify_overflows=overflows,
        max_queued_events=_queue_limit(),
    )
    tally.check()
    assert tally.status["classified"] == len(names)
