"""kill -9 of `histod serve` at a chosen point between the stages of a batch, then restart: every file ends with
exactly one final row and exactly one stored file, and nothing is left in the watch folder.

The points (histod.daemon.pipeline):

- ``recorded``: the batch's transaction is committed, none of its files moved yet;
- ``moved``: files moved, their moves rows not yet saved (they go with the next transaction);
- ``in flight``: inside a record transaction, not committed, with later batches still decoding and inferring
  behind it (each inference is slowed by 100 ms so that they queue up).

The kill is SIGKILL sent by the service process to itself from a launcher that wraps the stage function (written
by the test next to the data folder): nothing else of the service is changed. What the database and the folders
held at the kill is checked, so that a kill that landed elsewhere fails the test.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults_support import account, knob, log_events, report, start_serve, stop_serve, tail, tiny_png, wait_for
from tests.test_service_support import moves, row_count, rows, service_settings

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

FILES = knob("STAGES_FILES", 48)

LAUNCHER = '''
import json, os, signal, sys, time
from pathlib import Path

POINT, AFTER, MARK = {point!r}, {after!r}, Path({mark!r})

from histod.daemon import pipeline, record

calls = 0
state = {{}}


def die(note):
    MARK.write_text(json.dumps(note))
    os.kill(os.getpid(), signal.SIGKILL)


if POINT == "recorded":
    record_batch = record.record_batch

    def recorded(*args, **kwargs):
        global calls
        planned = record_batch(*args, **kwargs)
        calls += 1
        if calls >= AFTER and planned:
            die({{"planned": [str(p.source) for p in planned]}})
        return planned

    record.record_batch = recorded
elif POINT == "moved":
    move = pipeline.move

    def moved(planned):
        global calls
        done = move(planned)
        calls += 1
        if calls >= AFTER and done.ok:
            die({{"moved": str(planned.source), "to": done.path}})
        return done

    pipeline.move = moved
elif POINT == "in flight":
    infer, finish, record_rows = pipeline.infer, pipeline.Pipeline._finish, record._record

    def slow_infer(items, predictor):
        time.sleep(0.1)
        return infer(items, predictor)

    def finishing(self, batches):
        global calls
        calls += 1
        behind = [b for b in self.flight if not b.inferred.done()]
        if calls >= AFTER and len(self.flight) >= 2 and behind:
            state["kill"] = {{"in_flight": len(self.flight), "not_inferred": len(behind)}}
        return finish(self, batches)

    def recording(session, *args, **kwargs):
        found = record_rows(session, *args, **kwargs)
        if "kill" in state:
            session.flush()
            die({{**state["kill"], "uncommitted": len(found[1])}})
        return found

    pipeline.infer, pipeline.Pipeline._finish, record._record = slow_infer, finishing, recording

sys.argv = ["histod", *sys.argv[sys.argv.index("histod") + 1 :]]
from histod.__main__ import main

main()
'''


@pytest.mark.parametrize(("point", "after"), [("recorded", 2), ("moved", 5), ("in flight", 2)])
def test_kill_9_between_the_stages_of_a_batch_then_restart(
    tiny_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], point: str, after: int
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    names = [f"s{i:03d}.png" for i in range(FILES)]
    for i, name in enumerate(names):
        (watch / name).write_bytes(tiny_png(i))
    mark = tmp_path / "killed.json"
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER.format(point=point, after=after, mark=str(mark)))
    log = tmp_path / "serve.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        proc = start_serve(tmp_path, tiny_run_dir, log, prefix=[sys.executable, str(launcher)])
        procs.append(proc)
        code = proc.wait(120)
        assert code == -signal.SIGKILL, f"exit {code}, not the kill; log tail:\n{tail(log)}"
        note = json.loads(mark.read_text())
        recorded = rows(settings)
        left = {p.name for p in watch.iterdir()}
        ok_moves = {m.result_id for m in moves(settings) if m.ok}
        if point == "recorded":  # committed rows whose files were never moved
            assert {Path(p).name for p in note["planned"]} <= left & {r.name for r in recorded}
        elif point == "moved":  # a file at its target whose move no row records
            row = next(r for r in recorded if r.name == Path(note["moved"]).name)
            assert Path(row.stored_path).is_file() and row.name not in left and row.id not in ok_moves
        else:  # batches behind the killed transaction; its rows never committed
            assert note["in_flight"] >= 2 and note["not_inferred"] >= 1 and note["uncommitted"] >= 1
            assert len(recorded) < FILES and len(left) > 0
        started_at = log.stat().st_size
        proc = start_serve(tmp_path, tiny_run_dir, log)
        procs.append(proc)
        wait_for(
            lambda: (row_count(settings) >= FILES and not any(watch.iterdir())) or proc.poll() is not None,
            120,
            what=f"all {FILES} files recorded and moved after the restart",
        )
        assert proc.poll() is None, tail(log)
        wait_for(lambda: log_events(log, "service.ready", after=started_at), 60, what="the restart to be ready")
        stop_serve(proc, log)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    tally = account(settings, names)
    report(capsys, f"kill at {point}", tally, rounds=1)
    tally.check()
    assert tally.status["classified"] == FILES
