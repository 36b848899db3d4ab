"""Periodic reports: a `reports` row, a JSON file in reports/, and the text `histod report` prints."""

from __future__ import annotations

import csv
import json
import math
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from histod.daemon.reports import CSV_COLUMNS, format_summary, write_report
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


def test_the_page_and_the_csv_stand_alone_and_count_the_reviews(tmp_path: Path) -> None:
    factory = open_database(f"sqlite:///{tmp_path / 'r.db'}")
    rows = [_row(i, STATUS_CLASSIFIED, p, 10.0 * (i + 1)) for i, p in enumerate([0.1, 0.9, 0.6, 0.2])]
    rows.append(_row(4, STATUS_FAILED, None, 5.0))
    rows[1].name = "<script>alert(1)</script>.png"
    with transaction(factory) as s:
        queries.record_results(s, rows)
        queries.add_review(s, 1, label="Benign", reviewer="Dr. A", note=None, host="h")
        queries.add_review(s, 2, label="Malignant", reviewer="Dr. A", note=None, host="h")
        queries.add_review(s, 2, label="Benign", reviewer="Dr. B", note="<b>stroma</b>", host="h")  # the latest counts
        queries.add_review(s, 3, label="Malignant", reviewer="Dr. A", note=None, host="h")
    # reviewer Benign: model Benign 1, Malignant 1; reviewer Malignant: model Malignant 1.
    # p_o = 2/3, p_e = 2/3 * 1/3 + 1/3 * 2/3 = 4/9, kappa = (2/3 - 4/9) / (1 - 4/9) = 0.4
    summary = write_report(factory, tmp_path / "reports", T0, T0 + timedelta(hours=1), host="h", model_sha256=None)
    reviews = summary.reviews
    assert (reviews["reviewed"], reviews["matrix"], reviews["agreement"]) == (3, [[1, 1], [0, 1]], 2 / 3)
    assert abs(reviews["kappa"] - 0.4) < 1e-9
    (disagreement,) = reviews["disagreements"]
    assert (disagreement["result_id"], disagreement["reviewer"], disagreement["model_label"]) == (
        2,
        "Dr. B",
        "Malignant",
    )
    text = format_summary(summary)
    assert "3 reviewed: model and reviewer agree on 66.7%, Cohen's kappa 0.400" in text
    assert "result 2 <script>alert(1)</script>.png: model Malignant (p 0.900), Dr. B Benign: <b>stroma</b>" in text

    (page,) = (tmp_path / "reports").glob("report-*.html")
    html = page.read_text(encoding="utf-8")
    assert page.stem == "report-20260304T060607Z" and (tmp_path / "reports" / f"{page.stem}.json").exists()
    assert html.count("<svg") == 4  # files over time, p(malignant), latency, failures by reason
    assert "<script" not in html and "src=" not in html and "href=" not in html and "@import" not in html
    assert "default-src 'none'" in html  # nothing may be fetched: it opens offline
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in html and "&lt;b&gt;stroma&lt;/b&gt;" in html
    assert "Cohen's kappa <b>0.400</b>" in html and "Disagreements (1)" in html

    with (tmp_path / "reports" / f"{page.stem}.csv").open(newline="") as fh:
        buckets = list(csv.DictReader(fh))
    assert list(buckets[0]) == list(CSV_COLUMNS) and len(buckets) == 13  # 05:05 to 06:10 UTC, whole 5-minute buckets
    assert sum(int(b["total"]) for b in buckets) == 5 and sum(int(b["failed"]) for b in buckets) == 1
    assert [int(b["Malignant"]) for b in buckets][:2] == [2, 0] and buckets[0][
        "period_start"
    ] == "2026-03-04T05:05:00+00:00"


def test_kappa_is_undefined_when_both_sides_only_ever_said_one_label_and_else_equals_scikit_learns() -> None:
    from histod.db.windows import cohen_kappa

    assert cohen_kappa(["Benign", "Benign"], ["Benign", "Benign"]) is None
    assert cohen_kappa([], []) is None
    assert cohen_kappa(["Benign", "Malignant"], ["Benign", "Malignant"]) == 1.0
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    for n in (1, 2, 5, 40):
        reviewer = [str(x) for x in rng.choice(["Benign", "Malignant"], n)]
        model = [str(x) for x in rng.choice(["Benign", "Malignant"], n)]
        ours = cohen_kappa(reviewer, model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = float(
                sklearn_metrics.cohen_kappa_score(
                    reviewer, model, labels=["Benign", "Malignant"], replace_undefined_by=math.nan
                )
            )
        assert (ours is None and math.isnan(theirs)) or ours == pytest.approx(theirs, abs=1e-12), (reviewer, model)
