"""Claims (histod.db.claims, histod.daemon.claims) against a real PostgreSQL server: one holder per path, renewal,
expiry and takeover by the database's clock, a result refused to a service whose claim was taken over, moves saved
only by the holder, settling a dead service's moved files, and the migration lock with services starting at once.
The statements are portable: the first test runs on SQLite too."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from histod.daemon import record
from histod.daemon.claims import Claims
from histod.daemon.intake import Item
from histod.daemon.mover import PlannedMove, move
from histod.db import claims as sql
from histod.db import queries
from histod.db.migrations import current_revision, head_revision
from histod.db.models import Claim, Move, Result
from histod.db.session import make_engine, open_database, reading, transaction
from tests.faults_support import tiny_png
from tests.test_service_support import classified, wait_for

SHORT = 0.3  # seconds: a claim expiry short enough to wait out in a test


def _claims(factory: sessionmaker[Session], name: str, expiry_s: float = 60.0) -> Claims:
    return Claims(factory, worker_id=name, expiry_s=expiry_s, heartbeat_s=expiry_s / 2)


def _rows(factory: sessionmaker[Session]) -> dict[str, str]:
    with reading(factory) as s:
        return {c.path: c.worker for c in s.scalars(select(Claim))}


@pytest.fixture(params=["postgresql", "sqlite"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'claims.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_one_holder_per_path_renewal_expiry_and_takeover(any_url: str) -> None:
    factory = open_database(any_url)
    a, b = _claims(factory, "a", SHORT), _claims(factory, "b", SHORT)
    x, y = Path("/w/x.png"), Path("/w/y.png")
    assert a.claim([x]) == {x}
    assert b.claim([x, y]) == {y}  # x is a's, y was free
    assert a.claim([x]) == {x}  # a renews its own
    assert _rows(factory) == {str(x): a.worker, str(y): b.worker}
    # a stops renewing: once expired by the database's clock, b takes x over
    wait_for(lambda: b.claim([x]) == {x}, 10, what="b to take x over once a's claim expired")
    assert b.taken_over == 1 and _rows(factory)[str(x)] == b.worker
    with transaction(factory) as s:
        assert a.hold(s, [x]) == set()  # a learns it lost x
        assert b.release(s, [x, y]) == {x, y}
    assert _rows(factory) == {}


@pytest.mark.postgres
def test_racing_services_get_disjoint_claims(postgres_url: str) -> None:
    factory = open_database(postgres_url)
    paths = [Path(f"/w/{i:04d}.png") for i in range(400)]
    services = [_claims(factory, f"s{k}") for k in range(3)]
    got: dict[int, set[Path]] = {}

    def run(k: int) -> None:
        held: set[Path] = set()
        order = paths if k % 2 == 0 else paths[::-1]  # opposite orders: sorted locking keeps it deadlock-free
        for start in range(0, len(order), 8):
            held |= services[k].claim(order[start : start + 8])
        got[k] = held

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(len(h) for h in got.values()) == len(paths)
    assert set().union(*got.values()) == set(paths)
    with reading(factory) as s:
        assert sql.holders(s) == {services[k].worker: len(got[k]) for k in range(3) if got[k]}


def _served(factory: sessionmaker[Session]) -> record.Served:
    with transaction(factory) as s:
        m = queries.register_model(
            s, sha256="c" * 64, run_id="r", run_path="/r", engine="litert", image_size=48, threshold=0.5, metrics={}
        )
    return record.Served(m.id, m.sha256, "r", "litert", 0.5)


def _record(
    factory: sessionmaker[Session], served: record.Served, item: Item, root: Path, claims: Claims
) -> list[PlannedMove]:
    return record.record_batch(
        factory,
        [item],
        served=served,
        host="h",
        to=record.Destination(root / "processed", root / "failed"),
        reserved=set(),
        claims=claims,
    )


@pytest.mark.postgres
def test_a_service_whose_claim_was_taken_over_neither_records_nor_moves(postgres_url: str, tmp_path: Path) -> None:
    factory = open_database(postgres_url)
    served = _served(factory)
    image = tmp_path / "in" / "x.png"
    image.parent.mkdir()
    image.write_bytes(tiny_png(1))
    slow, other = _claims(factory, "slow", SHORT), _claims(factory, "other", SHORT)
    assert slow.claim([image]) == {image}
    outcome = classified(image, 0.7)
    # `slow` pauses past its expiry (no heartbeat); `other` takes the file over, records and moves it
    wait_for(lambda: other.claim([image]) == {image}, 10, what="the takeover")
    (planned,) = _record(factory, served, outcome, tmp_path, other)
    assert _record(factory, served, outcome, tmp_path, slow) == []  # refused: no second row
    assert slow.ensure([image]) == set()  # and it may not move the file
    assert record.save_moves(factory, [move(planned)], claims=other, sources=[image])
    with reading(factory) as s:
        assert s.scalar(select(func.count(Result.id))) == 1
        assert [(m.result_id, m.ok) for m in s.scalars(select(Move))] == [(planned.result_id, True)]
    assert _rows(factory) == {}  # the move's transaction released the claim
    # a late move row of the old holder is not saved either (its claim is gone)
    late = Move(result_id=planned.result_id, ok=True, path=str(planned.target), error=None)
    assert record.save_moves(factory, [late], claims=slow, sources=[image])
    with reading(factory) as s:
        assert s.scalar(select(func.count(Move.id))) == 1


@pytest.mark.postgres
def test_a_dead_services_moved_file_gets_its_move_row_from_the_taker(postgres_url: str, tmp_path: Path) -> None:
    """The holder recorded and moved the file, then died before saving the move: the file is no longer in the
    watch folder, so only the sweep of expired claims can find it. The taker records the move (once)."""
    factory = open_database(postgres_url)
    served = _served(factory)
    image = tmp_path / "in" / "x.png"
    image.parent.mkdir()
    image.write_bytes(tiny_png(2))
    dead, taker = _claims(factory, "dead", SHORT), _claims(factory, "taker", SHORT)
    assert dead.claim([image]) == {image}
    (planned,) = _record(factory, served, classified(image, 0.2), tmp_path, dead)
    assert move(planned).ok  # ... and the process dies here
    assert record.settle_moves(factory, shared=True) == 0  # a claim is on it: start-up settling leaves it alone
    swept = wait_for(taker.beat, 10, what="the sweep to take the expired claim")
    assert swept == [image]
    assert record.settle_claimed(factory, swept, taker) == 1
    assert record.settle_claimed(factory, swept, taker) == 0
    with reading(factory) as s:
        assert [(m.result_id, m.ok, m.path) for m in s.scalars(select(Move))] == [
            (planned.result_id, True, str(planned.target))
        ]
    assert _rows(factory) == {}


@pytest.mark.postgres
def test_services_starting_together_migrate_once(postgres_url: str) -> None:
    """Three processes open an empty database at the same moment: the advisory lock lets one migrate; the others
    wait, then find the schema at head (without it, two would both try to create the tables)."""
    code = "import sys; from histod.db.session import open_database; open_database(sys.argv[1])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, postgres_url], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert current_revision(make_engine(postgres_url)) == head_revision()


def test_claim_settings_heartbeat_within_expiry_and_a_worker_id_per_process() -> None:
    from histod.errors import ConfigError
    from histod.settings import load_settings

    settings = load_settings()
    assert settings.worker_id.endswith(f":{os.getpid()}")
    assert settings.claim_heartbeat_s * 2 <= settings.claim_expiry_s
    with pytest.raises(ConfigError, match="at most half of claim_expiry_s"):
        load_settings(claim_expiry_s=10, claim_heartbeat_s=6)
    with pytest.raises(ConfigError, match="claim_expiry_s"):
        load_settings(claim_expiry_s=0)


def test_the_heartbeat_tells_the_metrics_how_many_claims_are_held(any_url: str, tmp_path: Path) -> None:
    from histod.daemon.metrics import Metrics
    from histod.daemon.pipeline import Pipeline
    from tests.test_service_support import service_settings

    factory = open_database(any_url)
    claims = _claims(factory, "w")
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    assert claims.claim(paths) == set(paths)
    metrics = Metrics()
    none: Any = None
    with Pipeline(service_settings(tmp_path, tmp_path), factory, none, none, claims=claims) as pipeline:
        pipeline.metrics = metrics
        pipeline.sweep()
    assert "histod_claims_held 3.0" in metrics.exposition().decode().splitlines()
