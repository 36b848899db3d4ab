"""Helpers for the fault-injection suite (tests/test_faults_*.py; no tests here): tiny distinct images, `histod
serve` subprocesses, and the exactly-once accounting every fault test ends with.

The accounting counts rows in the database and files in the folders; logs are never evidence. Each fault test
prints one summary line (``FAULTS <fault>: files=... rounds=... lost=0 duplicated=0 ...``) that
docs/reliability.md copies. Sizes come from environment knobs so that a developer can scale a run up or down;
the defaults are the sizes docs/reliability.md reports.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histod.settings import Settings
from tests.test_service_support import files_under, moves, rows, service_settings, wait_for

__all__ = [
    "Tally",
    "account",
    "knob",
    "report",
    "serve_env",
    "start_serve",
    "stop_serve",
    "tiny_png",
    "wait_for",
]


def knob(name: str, default: int) -> int:
    """An integer size knob: ``HISTOD_FAULTS_<NAME>`` or ``default``."""
    return int(os.environ.get(f"HISTOD_FAULTS_{name}", default))


def tiny_png(i: int, size: int = 32) -> bytes:
    """A distinct ``size`` x ``size`` RGB PNG for each ``i`` (random noise seeded by ``i``: no two are alike)."""
    rng = np.random.default_rng(1_000_003 + i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# --- the service as a subprocess ------------------------------------------------------------------------
def serve_env(**settings: object) -> dict[str, str]:
    """The environment of a `histod serve` subprocess: small batches, short waits, JSON logs."""
    values: dict[str, object] = {
        "BATCH_SIZE": 8,
        "BATCH_TIMEOUT_MS": 20,
        "STABLE_MS": 100,
        "RECONCILE_INTERVAL_S": 30,
        "REPORT_INTERVAL_S": 3600,
        "HOST": "faults",
        "LOG_FORMAT": "json",
    }
    values.update({k.upper(): v for k, v in settings.items()})
    env = {k: v for k, v in os.environ.items() if not k.startswith("HISTOD_")}
    env.update({f"HISTOD_{k}": str(v) for k, v in values.items()})
    return env


def start_serve(
    root: Path, run_dir: Path, log: Path, *, prefix: Iterable[str] = (), **settings: object
) -> subprocess.Popen[bytes]:
    """Start `histod serve` on ``root/data`` (its output appended to ``log``: never a pipe nobody reads)."""
    args = [sys.executable, "-m", "histod", "serve", "--data-dir", str(root / "data"), "--model", str(run_dir)]
    with log.open("ab") as out:
        return subprocess.Popen([*prefix, *args], cwd=root, env=serve_env(**settings), stdout=out, stderr=out)


def stop_serve(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM, then expect a clean exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"histod serve did not stop on SIGTERM; log tail:\n{tail(log)}") from None
    assert code == 0, f"histod serve exited with {code}; log tail:\n{tail(log)}"


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def log_events(log: Path, event: str, after: int = 0) -> int:
    """How many log lines from byte ``after`` on carry ``event`` (only to REPORT what happened, e.g. an inotify
    overflow, or to wait for a start-up; never as evidence that a file was handled)."""
    if not log.exists():
        return 0
    with log.open("rb") as fh:
        fh.seek(after)
        text = fh.read().decode(errors="replace")
    return sum(1 for line in text.splitlines() if f'"event": "{event}"' in line)


# --- exactly once -------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """What the database and the folders say about ``expected`` names (one file each)."""

    files: int
    rows: int = 0
    stored: int = 0
    lost: list[str] = field(default_factory=list)
    """names with no row, or whose row's stored file is missing"""
    duplicated: list[str] = field(default_factory=list)
    """names with more than one row, or more than one stored file"""
    left: list[str] = field(default_factory=list)
    """entries still in the watch folder"""
    strays: list[str] = field(default_factory=list)
    """files under processed/ or failed/ that no row names"""
    unmoved: list[str] = field(default_factory=list)
    """rows without a successful move at their stored path"""
    status: Counter[str] = field(default_factory=Counter)

    def check(self) -> None:
        problems = {
            "lost": self.lost,
            "duplicated": self.duplicated,
            "left in the watch folder": self.left,
            "stray stored files": self.strays,
            "rows without a recorded move": self.unmoved,
        }
        bad = {k: v[:10] for k, v in problems.items() if v}
        assert not bad, f"{bad} (files {self.files}, rows {self.rows}, stored {self.stored})"
        assert self.rows == self.files == self.stored


def account(settings: Settings, expected: Iterable[str]) -> Tally:
    """Count rows and files for ``expected`` (file names dropped into the watch folder, each once)."""
    names = list(expected)
    recorded = rows(settings)
    tally = Tally(files=len(names), rows=len(recorded))
    per_name = Counter(r.name for r in recorded)
    stored = [*_entries(settings.processed_dir), *_entries(settings.failed_dir)]
    tally.stored = len(stored)
    stored_set = {str(p) for p in stored}
    by_stored = Counter(r.stored_path for r in recorded)
    ok_moves = {(m.result_id, m.path) for m in moves(settings) if m.ok}
    for name in names:
        n = per_name.get(name, 0)
        if n == 0:
            tally.lost.append(name)
        elif n > 1:
            tally.duplicated.append(name)
    unexpected = set(per_name) - set(names)
    tally.duplicated += sorted(f"unexpected row {n!r}" for n in unexpected)
    for r in recorded:
        tally.status[r.status] += 1
        if r.stored_path not in stored_set:
            tally.lost.append(f"{r.name} (row {r.id}: nothing at {r.stored_path})")
        if (r.id, r.stored_path) not in ok_moves:
            tally.unmoved.append(f"{r.name} (row {r.id})")
    tally.duplicated += [f"stored twice: {p}" for p, n in by_stored.items() if n > 1]
    tally.strays = sorted(p for p in stored_set if by_stored.get(p, 0) == 0)
    watch = settings.resolved_watch_dir
    tally.left = sorted(str(p.relative_to(watch)) for p in _entries(watch))
    return tally


def _entries(folder: Path) -> list[Path]:
    """Everything under ``folder`` that is not a folder (files, links, FIFOs), at any depth; symlinked folders
    are entries, never walked."""
    if not folder.exists():
        return []
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        found += [base / f for f in filenames]
        found += [base / d for d in dirnames if (base / d).is_symlink()]
    return sorted(found)


def report(capsys: pytest.CaptureFixture[str], fault: str, tally: Tally, rounds: int, **extra: object) -> str:
    """Print the summary line to the terminal (past pytest's capture) and to $HISTOD_FAULTS_SUMMARY if set."""
    parts = [f"files={tally.files}", f"rounds={rounds}", f"lost={len(tally.lost)}"]
    parts += [f"duplicated={len(tally.duplicated)}", f"left={len(tally.left)}"]
    parts += [f"{k}={v}" for k, v in sorted(tally.status.items())]
    parts += [f"{k}={v}" for k, v in extra.items()]
    line = f"FAULTS {fault}: " + " ".join(parts)
    with capsys.disabled():
        print(f"\n{line}")
    out = os.environ.get("HISTOD_FAULTS_SUMMARY")
    if out:
        with Path(out).open("a") as fh:
            fh.write(line + "\n")
    return line


def settings_for(root: Path, run_dir: Path, **overrides: object) -> Settings:
    return service_settings(root, run_dir, **overrides)


def reasons(settings: Settings) -> Mapping[str, str | None]:
    return {r.name: r.error_reason for r in rows(settings)}


def processed_and_failed(settings: Settings) -> int:
    return len(files_under(settings.processed_dir)) + len(files_under(settings.failed_dir))
