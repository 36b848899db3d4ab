"""Summaries of a time window from the database: the service's periodic report (a `reports` row, the files
``report-<end>.json``, ``.html`` and ``.csv`` in reports/, and one log event) and what `histod report` prints
or writes.

:func:`gather` reads what a report shows (:class:`ReportData`): the summary, the rows of the window, the models
that classified them and the reviews. The HTML page is histod.daemon.report_html; the CSV is the window in
time buckets (hours, or 5 minutes or days for short or long windows), one row each."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from histod.daemon.mover import write_new
from histod.db import queries, windows
from histod.db.models import utcnow
from histod.db.queries import Summary
from histod.db.session import reading, transaction
from histod.logs import get_logger, printable

log: Any = get_logger("histod.reports")


@dataclass(frozen=True)
class ModelInfo:
    sha256: str
    run_id: str
    engine: str
    threshold: float
    registered_at: datetime
    files: int


@dataclass
class ReportData:
    """Everything one report shows."""

    summary: Summary
    rows: list[windows.WindowRow]
    models: list[ModelInfo]
    agreement: windows.Agreement
    host: str | None = None
    report_id: int | None = None
    model_sha256: str | None = None
    """the model being served when the report was written (a periodic report)"""
    generated_at: datetime = field(default_factory=utcnow)


def summarise(factory: sessionmaker[Session], since: datetime, until: datetime) -> Summary:
    with reading(factory) as session:
        return queries.summary(session, since, until)


def gather(factory: sessionmaker[Session], since: datetime, until: datetime) -> ReportData:
    """The summary of [since, until) with its rows, models and reviews, read in one transaction."""
    with reading(factory) as session:
        rows = windows.window_rows(session, since, until)
        agreement = windows.agreement(windows.reviewed(session, since, until))
        summary = queries.summary(session, since, until, rows, agreement)
        used: dict[str, int] = {}
        for r in rows:
            if r.model_sha256 is not None:
                used[r.model_sha256] = used.get(r.model_sha256, 0) + 1
        records = windows.models_by_sha(session, used)
        models = [
            ModelInfo(m.sha256, m.run_id, m.engine, m.threshold, m.registered_at, used[m.sha256])
            for m in sorted(records.values(), key=lambda m: -used[m.sha256])
        ]
    return ReportData(summary, rows, models, agreement)


def write_report(
    factory: sessionmaker[Session],
    reports_dir: Path,
    since: datetime,
    until: datetime,
    *,
    host: str,
    model_sha256: str | None,
    in_progress: list[dict[str, Any]] | None = None,
) -> Summary:
    """Summarise [since, until), store it as a `reports` row and ``reports_dir/report-<end>.json`` (with the
    page ``.html`` and the table ``.csv`` beside it), log it. ``in_progress``: the images being classified tile
    by tile now (path, tiles done and total), kept in the report."""
    data = gather(factory, since, until)
    summary = data.summary
    summary.in_progress = list(in_progress or [])
    with transaction(factory) as session:
        report = queries.add_report(session, summary, host=host, model_sha256=model_sha256)
        report_id = report.id
    data.host, data.report_id, data.model_sha256 = host, report_id, model_sha256
    document = {"report_id": report_id, "host": host, "model_sha256": model_sha256, **summary.to_json()}
    path: Path | None = None
    try:
        path = _write_files(reports_dir, until, data, document)
    except OSError as exc:  # the row is the record; the files are a convenience
        log.warning("report.file_failed", reports_dir=str(reports_dir), error=str(exc))
    log.info("report.written", report_id=report_id, file=str(path) if path else None, **_flat(summary))
    return summary


def _write_files(reports_dir: Path, until: datetime, data: ReportData, document: dict[str, Any]) -> Path:
    """``report-<end>.json`` (``-1``, ``-2``, ... when taken), then ``.html`` and ``.csv`` of the same name.
    Each is written under a name of this process's own, then linked into place, which fails rather than
    replace: services sharing the folder (PostgreSQL) may report in the same second."""
    from histod.daemon.report_html import render

    reports_dir.mkdir(parents=True, exist_ok=True)
    stamp = until.strftime("%Y%m%dT%H%M%SZ")
    path = write_new(reports_dir, f"report-{stamp}", ".json", (json.dumps(document, indent=2) + "\n").encode())
    base = path.name.removesuffix(".json")
    write_new(reports_dir, base, ".html", render(data).encode(), exact=True)
    write_new(reports_dir, base, ".csv", buckets_csv(data).encode(), exact=True)
    return path


def _flat(summary: Summary) -> dict[str, Any]:
    data = summary.to_json()
    data["by_label"] = dict(summary.by_label)
    reviews = dict(data["reviews"])
    reviews["disagreements"] = len(reviews["disagreements"])  # the log line counts them; the files list them
    data["reviews"] = reviews
    return data


# --- time buckets (the CSV, and the HTML page's files over time) ----------------------------------------------

CSV_COLUMNS = (
    "period_start",
    "period_end",
    "total",
    "classified",
    "Benign",
    "Malignant",
    "failed",
    "duplicates",
    "mean_p",
    "latency_p50_ms",
    "latency_p95_ms",
)


def buckets_csv(data: ReportData) -> str:
    """The window in time buckets, one CSV row each (CSV_COLUMNS)."""
    from histod.daemon.report_html import buckets
    from histod.db.audit import write_csv

    out = io.StringIO()
    rows = [
        {
            "period_start": b.start.isoformat(),
            "period_end": b.end.isoformat(),
            "total": b.total,
            "classified": b.classified,
            "Benign": b.by_label.get("Benign", 0),
            "Malignant": b.by_label.get("Malignant", 0),
            "failed": b.failed,
            "duplicates": b.duplicates,
            "mean_p": None if b.mean_p is None else round(b.mean_p, 6),
            "latency_p50_ms": None if b.latency_p50_ms is None else round(b.latency_p50_ms, 3),
            "latency_p95_ms": None if b.latency_p95_ms is None else round(b.latency_p95_ms, 3),
        }
        for b in buckets(data.rows, data.summary.period_start, data.summary.period_end)
    ]
    write_csv(out, CSV_COLUMNS, rows)
    return out.getvalue()


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


def _counts(by_reason: dict[str, int]) -> str:
    return " (" + ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items())) + ")" if by_reason else ""


def format_summary(summary: Summary) -> str:
    """The report as text, for a terminal."""
    lines = [
        f"histod report {summary.period_start:%Y-%m-%d %H:%M:%S} .. {summary.period_end:%Y-%m-%d %H:%M:%S} UTC",
        f"  images      {summary.total}  (classified {summary.classified}, failed {summary.failed}, "
        f"duplicates {summary.duplicates})",
        "  labels      " + ", ".join(f"{k} {v}" for k, v in summary.by_label.items()),
    ]
    if summary.by_reason:
        lines.append("  failures    " + ", ".join(f"{k} {v}" for k, v in sorted(summary.by_reason.items())))
    lines += [
        f"  p_malignant mean {_num(summary.mean_p, '.3f')}, median {_num(summary.median_p, '.3f')}",
        f"  latency     p50 {_num(summary.latency_p50_ms, '.1f', ' ms')}, "
        f"p95 {_num(summary.latency_p95_ms, '.1f', ' ms')}",
        f"  throughput  {_num(summary.throughput_per_s, '.1f', ' images/s')}",
        "  models      " + (", ".join(m[:12] for m in summary.models) or "-"),
        "  unmoved     "
        + f"{summary.moves_waiting} waiting for a move{_counts(summary.moves_waiting_by_reason)}"
        + (
            f", {sum(summary.moves_gone_by_reason.values())} gone before the move"
            f"{_counts(summary.moves_gone_by_reason)}"
            if summary.moves_gone_by_reason
            else ""
        ),
    ]
    lines += _tile_lines(summary)
    lines += _review_lines(summary.reviews)
    return "\n".join(lines)


def _tile_lines(summary: Summary) -> list[str]:
    t = summary.tiles
    lines = []
    if t.get("images"):
        lines.append(
            f"  tiled       {t['images']} images tile by tile: {t['tissue_tiles']} tissue tiles, "
            f"{t['malignant_tiles']} malignant"
        )
    if t.get("with_warnings"):
        lines.append(f"  scale       {t['with_warnings']} images recorded with a scale warning (tiles rows)")
    for job in summary.in_progress:
        lines.append(
            f"  tiling now  {printable(job['path'])}: {job['tiles_done']} / {job['tiles_total'] or '?'} tiles"
        )
    return lines


def _review_lines(reviews: dict[str, Any]) -> list[str]:
    n = int(reviews.get("reviewed", 0))
    if not n:
        return ["  reviews     none of the window's classifications reviewed yet"]
    (bb, bm), (mb, mm) = reviews["matrix"]
    kappa = reviews.get("kappa")
    lines = [
        f"  reviews     {n} reviewed: model and reviewer agree on {reviews['agreement']:.1%}, Cohen's kappa "
        + ("-" if kappa is None else f"{kappa:.3f}"),
        f"              reviewer Benign: model Benign {bb}, Malignant {bm}; "
        f"reviewer Malignant: model Benign {mb}, Malignant {mm}",
    ]
    for d in reviews["disagreements"][:20]:
        p = "-" if d["p_malignant"] is None else f"{d['p_malignant']:.3f}"
        note = f": {printable(d['note'])}" if d.get("note") else ""
        lines.append(
            f"              result {d['result_id']} {printable(d['name'])}: model {d['model_label']} (p {p}), "
            f"{printable(d['reviewer'] or '?')} {d['reviewer_label']}{note}"
        )
    if len(reviews["disagreements"]) > 20:
        lines.append(f"              ... {len(reviews['disagreements']) - 20} more disagreements (--format json)")
    return lines
