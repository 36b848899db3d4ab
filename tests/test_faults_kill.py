"""kill -9 of `histod serve` at seeded random points while files stream in, then restart: every file ends with
exactly one final row and exactly one stored file; nothing is left in the watch folder."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from histod.daemon.mover import move_file
from tests.faults_support import account, knob, log_events, report, start_serve, stop_serve, tail, tiny_png, wait_for
from tests.test_service_support import row_count, service_settings

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

FILES = knob("KILL_FILES", 1000)
ROUNDS = knob("KILL_ROUNDS", 10)
SEED = knob("SEED", 20261126)


def _stream(watch: Path, count: int, stop: threading.Event, rng: random.Random) -> None:
    """Write ``count`` distinct tiny PNGs: half written in place (close-write), half as ``.part`` + rename (the
    atomic upload), in bursts of 1-10 with pauses of 0-100 ms (~100 files/s, so the stream lasts ~10 s and the
    kills land while files are still arriving)."""
    i = 0
    while i < count and not stop.is_set():
        for _ in range(rng.randint(1, 10)):
            if i >= count:
                break
            name, data = f"k{i:04d}.png", tiny_png(i)
            if i % 2:
                (watch / name).write_bytes(data)
            else:
                part = watch / f"{name}.part"
                part.write_bytes(data)
                part.rename(watch / name)
            i += 1
        stop.wait(rng.uniform(0.0, 0.1))  # pacing of the writer, not a wait for the service


def test_kill_9_at_random_points_while_files_stream_in(
    tiny_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED)
    settings = service_settings(tmp_path, tiny_run_dir)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    log = tmp_path / "serve.log"
    names = [f"k{i:04d}.png" for i in range(FILES)]
    stop = threading.Event()
    writer = threading.Thread(target=_stream, args=(watch, FILES, stop, random.Random(rng.random())), daemon=True)
    # seeded kill points: after `gap` more rows than at the previous kill (a different phase each round)
    gaps = [rng.randint(1, max(2, 2 * FILES // (ROUNDS + 1))) for _ in range(ROUNDS)]
    kills: list[int] = []
    mid_stream = 0
    started_at = 0  # where the log of the newest start begins
    procs: list[subprocess.Popen[bytes]] = []
    try:
        writer.start()
        proc = start_serve(tmp_path, tiny_run_dir, log)
        procs.append(proc)
        for gap in gaps:
            target = min(row_count(settings) + gap, FILES)

            def reached(t: int = target, p: subprocess.Popen[bytes] = proc) -> bool:
                return row_count(settings) >= t or p.poll() is not None

            wait_for(reached, 120, what=f"{target} rows before a kill")
            assert proc.poll() is None, f"serve died on its own; log tail:\n{tail(log)}"
            proc.kill()  # SIGKILL: no handler, no cleanup
            proc.wait(30)
            mid_stream += writer.is_alive()
            kills.append(row_count(settings))
            started_at = log.stat().st_size
            proc = start_serve(tmp_path, tiny_run_dir, log)
            procs.append(proc)
        writer.join(120)
        assert not writer.is_alive()
        wait_for(
            lambda: row_count(settings) >= FILES and not any(watch.iterdir()),
            300,
            what=f"all {FILES} files recorded and moved",
        )
        # a SIGTERM before the last start-up installed its handler would end it by the default action (-15)
        wait_for(lambda: log_events(log, "service.ready", after=started_at), 60, what="the last start to be ready")
        stop_serve(proc, log)
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    tally = account(settings, names)
    report(
        capsys, "kill", tally, rounds=len(kills), kills_at_rows="/".join(map(str, kills)), kills_mid_stream=mid_stream
    )
    tally.check()
    assert len(kills) == ROUNDS
    assert tally.status["classified"] == FILES


@pytest.mark.parametrize("crash", ["after the copy", "after the link"])
def test_a_move_across_filesystems_killed_midway_leaves_no_temporary_behind(tmp_path: Path, crash: str) -> None:
    """processed/ on another filesystem: move_file copies to a hidden temporary, links it into place, removes the
    original. A kill after the copy (or after the link) must not leave ``.<name>.histod-<pid>.tmp`` for good: the
    retry after the restart removes it."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second filesystem (/dev/shm)")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        src = tmp_path / "a.png"
        src.write_bytes(tiny_png(1))
        target = Path(other) / "2026-11-26" / "a.png"
        target.parent.mkdir()
        left = target.with_name(".a.png.histod.tmp")  # what the killed attempt wrote
        shutil.copy2(src, left)
        if crash == "after the link":
            os.link(left, target)
        assert move_file(src, target) == target
        assert sorted(p.name for p in target.parent.iterdir()) == ["a.png"]
        assert target.read_bytes() == tiny_png(1) and not src.exists()
