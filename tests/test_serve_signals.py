"""`histod serve` and the signals that stop it, on a real process (the tiny run of tests/conftest.py).

SIGHUP stops it as cleanly as SIGTERM: the batch in flight is finished, nothing is lost, status 0. A SIGTERM
repeated while it stops (``timeout``, a supervisor that signals the whole process group, an impatient operator)
changes nothing: the stop stays clean, status 0, never click's "Aborted!".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from histod.synthetic import write_images
from tests.test_service_support import files_under, rows, service_settings, wait_for

IMAGES = 150


class Serving:
    """A `histod serve` subprocess whose stderr is collected line by line as it comes."""

    def __init__(self, root: Path, run_dir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HISTOD_", "NOTIFY_", "WATCHDOG_"))}
        env.update(HISTOD_BATCH_SIZE="2", HISTOD_STABLE_MS="0", HISTOD_LOG_FORMAT="json")
        args = ["serve", "--data-dir", str(root / "data"), "--model", str(run_dir)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "histod", *args],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, name="serve-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.decode(errors="replace"))

    def said(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def wait(self) -> int:
        code = self.proc.wait(60)
        self._reader.join(10)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]


@pytest.fixture
def serving(tmp_path: Path, tiny_run_dir: Path) -> Iterator[list[Serving]]:
    started: list[Serving] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


def _start_mid_stream(root: Path, run_dir: Path, started: list[Serving]) -> Serving:
    """IMAGES files in the folder; return once the service has moved its first one."""
    settings = service_settings(root, run_dir)
    write_images(settings.resolved_watch_dir, IMAGES, size=48)
    s = Serving(root, run_dir)
    started.append(s)
    processed = settings.processed_dir
    wait_for(lambda: (processed.exists() and any(processed.rglob("*.png"))) or s.proc.poll() is not None, 60)
    assert s.proc.poll() is None, s.output[-2000:]
    return s


def _nothing_lost(root: Path, run_dir: Path) -> None:
    settings = service_settings(root, run_dir)
    recorded = [r.name for r in rows(settings)]
    waiting = files_under(settings.resolved_watch_dir)
    assert len(recorded) == len(set(recorded)), "a file was classified twice"
    assert len(recorded) + len(waiting) == IMAGES, "a file was lost"
    assert len(recorded) > 0


def test_sighup_mid_stream_is_a_clean_stop(serving: list[Serving], tmp_path: Path, tiny_run_dir: Path) -> None:
    s = _start_mid_stream(tmp_path, tiny_run_dir, serving)
    s.proc.send_signal(signal.SIGHUP)
    assert s.wait() == 0, s.output[-3000:]
    assert s.said("SIGHUP, finishing the batch in flight")
    assert "service.stopped" in {e["event"] for e in s.events()}
    _nothing_lost(tmp_path, tiny_run_dir)


def test_a_second_sigterm_while_it_stops_changes_nothing(
    serving: list[Serving], tmp_path: Path, tiny_run_dir: Path
) -> None:
    s = _start_mid_stream(tmp_path, tiny_run_dir, serving)
    s.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: s.said("finishing the batch in flight") or s.proc.poll() is not None, 60, 0.001)
    if s.proc.poll() is None:
        s.proc.send_signal(signal.SIGTERM)
    assert s.wait() == 0, s.output[-3000:]
    assert "Aborted!" not in s.output
    assert "service.stopped" in {e["event"] for e in s.events()}
    _nothing_lost(tmp_path, tiny_run_dir)


def _loaded(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # it has exited
        return False


def test_a_second_sigterm_during_start_up_changes_nothing(
    serving: list[Serving], tmp_path: Path, tiny_run_dir: Path
) -> None:
    """The first SIGTERM lands while the process still imports (before the serve command's handler exists); the
    service then stops after the start-up step in progress, the rest of its imports, which is when the second
    one comes."""
    s = Serving(tmp_path, tiny_run_dir)
    serving.append(s)
    wait_for(lambda: _loaded(s.proc.pid, "_pydantic_core") or s.proc.poll() is not None, 60, 0.002, "the imports")
    s.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: s.said("SIGTERM during start-up, stopping") or s.proc.poll() is not None, 60, 0.001)
    assert s.proc.poll() is None, s.output[-3000:]
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait() == 0, s.output[-3000:]
    assert "Aborted!" not in s.output
    (stopped,) = [e for e in s.events() if e["event"] == "service.stopped"]
    assert stopped["during"] == "start-up"
