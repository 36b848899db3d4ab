"""End to end: `histod serve` as systemd runs it (Type=notify, WatchdogSec=) talks the sd_notify protocol.

The test plays the service manager: it binds the datagram socket named by $NOTIFY_SOCKET, sets
$WATCHDOG_USEC, starts `histod serve` as a subprocess, and checks READY=1 (then that the watch is really
live: a dropped image gets classified), WATCHDOG=1 keep-alives, and on SIGTERM STOPPING=1 and exit status 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from histod.synthetic import write_images

DEADLINE_READY_S = 120.0  # interpreter start, migrations, model load on a busy 2-core machine
DEADLINE_S = 30.0


class Manager:
    """The service manager's side of $NOTIFY_SOCKET: collects every message, waits with deadlines."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, state: str, deadline_s: float, proc: subprocess.Popen[bytes], after: int = 0) -> None:
        """Wait until ``state`` has been received more than ``after`` times (fail early if proc exits)."""
        end = time.monotonic() + deadline_s
        while self.messages.count(state) <= after:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{state} not received within {deadline_s} s; got {self.messages}")
            self.sock.settimeout(min(left, 0.5))
            try:
                self.messages.extend(self.sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                if proc.poll() is not None and state not in self.messages:
                    raise AssertionError(f"histod serve exited {proc.returncode} before {state}") from None

    def drain(self) -> None:
        self.sock.settimeout(0)
        while True:
            try:
                self.messages.extend(self.sock.recv(4096).decode().split("\n"))
            except (BlockingIOError, TimeoutError):
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path / "notify.sock")
    yield m
    m.close()


def test_serve_ready_watchdog_stopping(tiny_run_dir: Path, tmp_path: Path, manager: Manager) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HISTOD_", "NOTIFY_", "WATCHDOG_"))}
    env.update(
        HISTOD_DATA_DIR=str(data),
        HISTOD_MODEL=str(tiny_run_dir),
        HISTOD_LOG_FORMAT="json",
        HISTOD_STABLE_MS="100",
        NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
        WATCHDOG_USEC="2000000",  # WatchdogSec=2: keep-alives at least every second
    )
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "histod", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
    )
    try:
        manager.wait_for("READY=1", DEADLINE_READY_S, proc)

        # READY=1 means the watch is live: an image dropped now is taken without a restart or a rescan.
        staged = write_images(tmp_path / "staging", 1, size=48)[0]
        staged.rename(data / "prediction" / staged.name)
        end = time.monotonic() + DEADLINE_S
        while not list((data / "processed").rglob(staged.name)):
            assert time.monotonic() < end, "the image dropped after READY=1 was not processed"
            assert proc.poll() is None, f"histod serve exited {proc.returncode}"
            time.sleep(0.05)

        pings = manager.messages.count("WATCHDOG=1")
        manager.wait_for("WATCHDOG=1", DEADLINE_S, proc, after=pings)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE_S) == 0
        manager.drain()
        assert "STOPPING=1" in manager.messages
        assert manager.messages.index("READY=1") < manager.messages.index("STOPPING=1")
    except BaseException:
        log.flush()
        print((tmp_path / "serve.log").read_text(errors="replace")[-4000:])
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
