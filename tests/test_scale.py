"""Several `histod serve` processes, one watch folder, one PostgreSQL database: each file classified exactly once,
also when one of them is killed with SIGKILL mid-way (its claims expire and the others take them over), and the
audit chain still verifies. Real subprocesses, real folders, a real server (tests/postgres_support.py); every
count comes from the database's rows and the folders' files. Each test prints one ``SCALE ...`` summary line."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from histod.cli import cli
from histod.db.session import reading
from histod.settings import Settings
from tests.faults_support import account, knob, log_events, start_serve, stop_serve, tail, tiny_png
from tests.test_service_support import factory_for, service_settings, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(600)]

FILES = knob("SCALE_FILES", 3000)
KILL_FILES = knob("SCALE_KILL_FILES", 1200)
WORKERS = 3


def _drop(watch: Path, names: Sequence[str], size: int = 16) -> None:
    """Distinct tiny PNGs, each written under a hidden name and renamed into place (the atomic upload)."""
    for i, name in enumerate(names):
        part = watch / f".{name}.part"
        part.write_bytes(tiny_png(i, size))
        part.rename(watch / name)


def _start_workers(root: Path, run_dir: Path, url: str, **extra: object) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """WORKERS services on the same data folder (on PostgreSQL the folder's lock file gives way), each with its
    own log; returns once every one is READY."""
    workers = []
    for k in range(1, WORKERS + 1):
        log = root / f"w{k}.log"
        env: dict[str, Any] = {"DATABASE_URL": url, "WORKER_ID": f"w{k}", "HOST": f"w{k}", **extra}
        proc = start_serve(root, run_dir, log, **env)
        workers.append((proc, log))
    for proc, log in workers:

        def ready(p: subprocess.Popen[bytes] = proc, lg: Path = log) -> bool:
            return bool(log_events(lg, "service.ready")) or p.poll() is not None

        wait_for(ready, 120, what="READY")
        assert proc.poll() is None, f"a worker died at start:\n{tail(log)}"
    return workers


def _facts(settings: Settings) -> dict[str, object]:
    """What the database says: results, distinct paths and contents, successful moves per result, claims left."""
    with reading(factory_for(settings)) as s:

        def one(sql: str) -> int:
            return int(s.execute(text(sql)).scalar_one())

        per_worker: dict[str, int] = dict(
            s.execute(text("SELECT host, count(*) FROM results GROUP BY host ORDER BY host")).all()
        )
        return {
            "results": one("SELECT count(*) FROM results"),
            "distinct_paths": one("SELECT count(DISTINCT original_path) FROM results"),
            "distinct_sha256": one("SELECT count(DISTINCT sha256) FROM results"),
            "ok_moves": one("SELECT count(*) FROM moves WHERE ok"),
            "results_moved_once": one(
                "SELECT count(*) FROM (SELECT result_id FROM moves WHERE ok GROUP BY result_id HAVING count(*) = 1) m"
            ),
            "results_moved_twice": one(
                "SELECT count(*) FROM (SELECT result_id FROM moves WHERE ok GROUP BY result_id HAVING count(*) > 1) m"
            ),
            "claims_left": one("SELECT count(*) FROM claims"),
            "per_worker": ",".join(f"{h}:{n}" for h, n in per_worker.items()),
        }


def _done(settings: Settings, count: int) -> bool:
    with reading(factory_for(settings)) as s:
        moved = int(s.execute(text("SELECT count(DISTINCT result_id) FROM moves WHERE ok")).scalar_one())
    return moved >= count and not any(settings.resolved_watch_dir.iterdir())


def _verify(url: str) -> str:
    got = CliRunner().invoke(cli, ["audit", "verify", "--db", url])
    assert got.exit_code == 0, got.output
    return got.output


def _summary(capsys: pytest.CaptureFixture[str], name: str, **facts: object) -> None:
    line = f"SCALE {name}: " + " ".join(f"{k}={v}" for k, v in facts.items())
    with capsys.disabled():
        print(f"\n{line}")


def _expect_exactly_once(facts: dict[str, object], files: int) -> None:
    assert facts["results"] == facts["distinct_paths"] == facts["distinct_sha256"] == files, facts
    assert facts["ok_moves"] == facts["results_moved_once"] == files, facts
    assert facts["results_moved_twice"] == 0 and facts["claims_left"] == 0, facts


def test_three_services_classify_each_file_exactly_once(
    tiny_run_dir: Path, tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir, database_url=postgres_url)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    names = [f"s{i:05d}.png" for i in range(FILES)]
    workers = _start_workers(tmp_path, tiny_run_dir, postgres_url)
    try:
        started = time.monotonic()
        _drop(watch, names)
        wait_for(lambda: _done(settings, FILES), 400, 0.2, what=f"all {FILES} files recorded and moved")
        seconds = time.monotonic() - started
        for proc, log in workers:
            stop_serve(proc, log)
    finally:
        for proc, _ in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    facts = _facts(settings)
    tally = account(settings, names)
    verdict = _verify(postgres_url)
    _summary(capsys, "3 workers", files=FILES, **facts, left=len(tally.left), seconds=round(seconds, 1))
    _expect_exactly_once(facts, FILES)
    tally.check()
    assert tally.status["classified"] == FILES
    assert f"ok: {FILES} results, chain intact" in verdict
    assert len(str(facts["per_worker"]).split(",")) >= 2, facts  # the work was shared


def _claims_of(settings: Settings, worker: str) -> list[str]:
    with reading(factory_for(settings)) as s:
        return list(s.scalars(text("SELECT path FROM claims WHERE worker LIKE :w"), {"w": f"{worker}/%"}))


def test_a_killed_services_claims_are_taken_over_and_each_file_still_classified_once(
    tiny_run_dir: Path, tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir, database_url=postgres_url)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    names = [f"k{i:05d}.png" for i in range(KILL_FILES)]
    workers = _start_workers(tmp_path, tiny_run_dir, postgres_url, CLAIM_EXPIRY_S=2, CLAIM_HEARTBEAT_S=0.5)
    victim = workers[1][0]
    held: list[str] = []
    try:
        _drop(watch, names)

        def caught_holding() -> bool:
            """Freeze the victim (SIGSTOP) and look: when it holds claims, kill it right there, else let it go on."""
            nonlocal held
            victim.send_signal(signal.SIGSTOP)
            held = _claims_of(settings, "w2")
            if held and _rows_so_far(settings) >= KILL_FILES // 5:
                victim.kill()  # SIGKILL while stopped: no handler, no cleanup, claims left behind
                return True
            victim.send_signal(signal.SIGCONT)
            return False

        wait_for(caught_holding, 120, 0.01, what="the victim holding claims a fifth of the way in")
        victim.wait(30)
        at_kill = _rows_so_far(settings)
        # the victim may die holding claims on files another service already finished (it took them from a late
        # event, then found them gone): those files count as done at once, but their claims are only taken over
        # and released one expiry and a heartbeat later, so wait for that too before stopping the others
        wait_for(
            lambda: _done(settings, KILL_FILES) and not _claims_of(settings, "w2"),
            400,
            0.2,
            what=f"all {KILL_FILES} files recorded and moved, and the killed service's claims taken over",
        )
        for proc, log in workers:
            if proc is not victim:
                stop_serve(proc, log)
    finally:
        for proc, _ in workers:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait(10)
    facts = _facts(settings)
    tally = account(settings, names)
    _verify(postgres_url)
    taken_over = sum(log_events(log, "claim.taken_over") for proc, log in workers if proc is not victim)
    _summary(
        capsys,
        "kill",
        files=KILL_FILES,
        killed="w2",
        rows_at_kill=at_kill,
        victim_claims_at_kill=len(held),
        taken_over=taken_over,
        **facts,
        left=len(tally.left),
    )
    assert victim.returncode == -signal.SIGKILL
    _expect_exactly_once(facts, KILL_FILES)
    tally.check()
    assert held and taken_over >= len(held)  # every claim the victim died with was taken over


def _rows_so_far(settings: Settings) -> int:
    with reading(factory_for(settings)) as s:
        return int(s.execute(text("SELECT count(*) FROM results")).scalar_one())
