"""The audit trail on PostgreSQL: migration 0001 -> 0002 with rows, the plpgsql append-only triggers, the advisory
lock under concurrent writers, and verify. On the throw-away server of tests/postgres_support.py (skipped, with the
reason, where none can be started)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from histod.db import queries
from histod.db.migrations import current_revision, head_revision, upgrade
from histod.db.models import Result
from histod.db.session import make_engine, open_database, reading, transaction
from histod.db.verify import verify

pytestmark = pytest.mark.postgres
T0 = datetime(2026, 1, 2, tzinfo=UTC)


def _result(name: str) -> Result:
    return Result(
        original_path=f"/w/{name}",
        name=name,
        sha256=f"s{name}",
        size_bytes=1,
        received_at=T0,
        classified_at=T0,
        latency_ms=1,
        status="classified",
        label="Benign",
        p_malignant=0.25,
        threshold=0.5,
        model_id=1,
        host="h",
        stored_path=f"/p/{name}",
    )


def test_postgresql_migrates_chains_serializes_and_refuses_edits(postgres_url: str) -> None:
    URL = postgres_url  # noqa: N806 - the name the test was written with
    engine = make_engine(URL)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO models (id, sha256, run_id, run_path, engine, image_size, threshold, metrics, "
                "registered_at) VALUES (1, 'abc', 'r', '/gone', 'litert', 48, 0.5, '{\"auc\": 0.9}', '2026-01-01')"
            )
        )
        for i in (1, 2, 4):
            conn.execute(
                text(
                    "INSERT INTO results (id, original_path, name, sha256, size_bytes, received_at, classified_at, "
                    "latency_ms, status, label, p_malignant, threshold, model_id, model_sha256, host, stored_path) "
                    f"VALUES ({i}, '/w/{i}', '{i}', 'h{i}', 10, '2026-01-01 00:00:0{i}.123456', "
                    f"'2026-01-01 00:00:0{i}.5', 500, 'classified', 'Benign', 0.1, 0.5, 1, 'abc', 'h', '/p/{i}')"
                )
            )
    upgrade(engine)
    assert current_revision(engine) == head_revision()

    def writer(k: int) -> None:
        factory = open_database(URL)
        for j in range(10):
            with transaction(factory) as s:
                queries.record_results(s, [_result(f"w{k}-{j}-{i}") for i in range(2)])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    factory = open_database(URL)
    with transaction(factory) as s:
        queries.add_review(s, 2, label="malignant", reviewer="Dr A", note=None, host="h")
    with reading(factory) as s:
        verdict = verify(s)
    assert verdict.ok and verdict.rows == 3 + 60 + 1, verdict.broken
    for sql in ("UPDATE results SET label = 'x' WHERE id = 1", "DELETE FROM models", "TRUNCATE reports CASCADE"):
        with pytest.raises(SQLAlchemyError, match="append-only"), engine.begin() as conn:
            conn.execute(text(sql))
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE results DISABLE TRIGGER results_append_only"))
        conn.execute(text("UPDATE results SET p_malignant = 0.26 WHERE id = 10"))
    with reading(factory) as s:
        broken = verify(s).broken
    assert broken is not None and (broken.table, broken.id) == ("results", 10)
