"""Summaries of a time window from the database: the service's periodic report (a `reports` row, a JSON file
in reports/ and one log event) and what `histod report` prints."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from histod.db import queries
from histod.db.queries import Summary
from histod.db.session import reading, transaction
from histod.logs import get_logger

log: Any = get_logger("histod.reports")


def summarise(factory: sessionmaker[Session], since: datetime, until: datetime) -> Summary:
    with reading(factory) as session:
        return queries.summary(session, since, until)


def write_report(
    factory: sessionmaker[Session],
    reports_dir: Path,
    since: datetime,
    until: datetime,
    *,
    host: str,
    model_sha256: str | None,
) -> Summary:
    """Summarise [since, until), store it as a `reports` row and ``reports_dir/report-<end>.json``, log it."""
    summary = summarise(factory, since, until)
    with transaction(factory) as session:
        report = queries.add_report(session, summary, host=host, model_sha256=model_sha256)
        report_id = report.id
    data = {"report_id": report_id, "host": host, "model_sha256": model_sha256, **summary.to_json()}
    path: Path | None = None
    try:
        path = _write_json(reports_dir, until, data)
    except OSError as exc:  # the row is the record; the file is a convenience
        log.warning("report.file_failed", reports_dir=str(reports_dir), error=str(exc))
    log.info("report.written", report_id=report_id, file=str(path) if path else None, **_flat(summary))
    return summary


def _write_json(reports_dir: Path, until: datetime, data: dict[str, Any]) -> Path:
    """``report-<end>.json`` (``-1``, ``-2``, ... when taken). Written under a name of this process's own, then
    linked into place, which fails rather than replace: services sharing the folder (PostgreSQL) may report in
    the same second."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    stamp = until.strftime("%Y%m%dT%H%M%SZ")
    tmp = reports_dir / f".report-{stamp}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    try:
        n = 0
        while True:
            path = reports_dir / (f"report-{stamp}.json" if n == 0 else f"report-{stamp}-{n}.json")
            try:
                os.link(tmp, path)
            except FileExistsError:
                n += 1
                continue
            except OSError:  # no hard links on this filesystem (some shares): rename, if the name is still free
                if path.exists():
                    n += 1
                    continue
                tmp.replace(path)
            return path
    finally:
        tmp.unlink(missing_ok=True)


def _flat(summary: Summary) -> dict[str, Any]:
    data = summary.to_json()
    data["by_label"] = dict(summary.by_label)
    return data


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
    return "\n".join(lines)
