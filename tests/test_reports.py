"""Periodic reports: a `reports` row, a JSON file in reports/, and the text `histod report` prints."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from histod.daemon.reports import format_summary, write_report
from histod.db import queries
from histod.db.models import STATUS_CLASSIFIED, STATUS_FAILED, Report, Result
from histod.db.session import open_database, reading, transaction

T0 = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def _row(i: int, status: str, p: float | None, latency: float) -> Result:
    return Result(
        original_path=f"/w/{i}.png",
        name=f"{i}.png",
        sha256=f"{i % 3:064d}",
        size_bytes=100,
        received_at=T0 + timedelta(seconds=i),
        classified_at=T0 + timedelta(seconds=i, milliseconds=latency),
        latency_ms=latency,
        status=status,
        label=None if p is None else ("Malignant" if p >= 0.5 else "Benign"),
        p_malignant=p,
        threshold=0.5,
        error_reason=None if status == STATUS_CLASSIFIED else "truncated",
        host="h",
        stored_path=f"/d/{i}.png",
    )


def test_write_report_stores_a_row_and_a_json_file(tmp_path: Path) -> None:
    factory = open_database(f"sqlite:///{tmp_path / 'r.db'}")
    with transaction(factory) as s:
        queries.record_results(
            s,
            [_row(i, STATUS_CLASSIFIED, p, 10.0 * (i + 1)) for i, p in enumerate([0.1, 0.9, 0.6, 0.2])]
            + [_row(4, STATUS_FAILED, None, 5.0)],
        )
    since, until = T0, T0 + timedelta(minutes=1)
    first = write_report(factory, tmp_path / "reports", since, until, host="h", model_sha256="m" * 64)
    second = write_report(factory, tmp_path / "reports", since, until, host="h", model_sha256="m" * 64)
    assert first == second
    assert (first.total, first.classified, first.failed, first.duplicates) == (5, 4, 1, 2)
    assert first.by_label == {"Benign": 2, "Malignant": 2} and first.by_reason == {"truncated": 1}
    files = sorted((tmp_path / "reports").glob("report-*.json"))
    assert [f.name for f in files] == ["report-20260304T050707Z-1.json", "report-20260304T050707Z.json"]
    data = json.loads(files[1].read_text())
    assert data["total"] == 5 and data["model_sha256"] == "m" * 64 and data["report_id"] == 1
    with reading(factory) as s:
        stored = s.query(Report).order_by(Report.id).all()
    assert [r.total for r in stored] == [5, 5]
    assert stored[0].benign == 2 and stored[0].malignant == 2 and stored[0].failed == 1
    assert stored[0].latency_p50_ms == first.latency_p50_ms == 20.0
    assert stored[0].period_start == since and stored[0].summary["median_p"] == first.median_p
    text = format_summary(first)
    assert "images      5  (classified 4, failed 1, duplicates 2)" in text
    assert "truncated 1" in text and "median 0.400" in text


def test_format_summary_of_nothing(tmp_path: Path) -> None:
    factory = open_database(f"sqlite:///{tmp_path / 'r.db'}")
    with reading(factory) as s:
        empty = queries.summary(s, T0, T0 + timedelta(hours=1))
    assert "images      0" in format_summary(empty) and "p50 -" in format_summary(empty)
