"""`histod report`, `histod results`, `histod health`: reading what the service recorded (read-only, never
migrating: auditors who may read but not write the database use them) and asking a running service how it is.

Output follows the CLI's one convention: ``--format table|csv|json`` for what is printed (``--json`` is short
for ``--format json``); a single file is named by its kind (``--html FILE``, ``--csv FILE``)."""

from __future__ import annotations

import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from histod.commands_service import chosen_format, database_options, format_options, parse_when, settings_from
from histod.errors import ConfigError
from histod.logs import printable, problem
from histod.settings import Settings

if TYPE_CHECKING:
    from histod.daemon.reports import ReportData
    from histod.db.queries import Summary


def open_reader(settings: Settings) -> Any:
    """Read-only, never migrating."""
    from histod.db.session import open_read_only

    return open_read_only(settings.resolved_database_url, busy_timeout_ms=settings.busy_timeout_ms)


def print_report(settings: Settings, since: datetime, until: datetime, *, fmt: str = "table") -> Summary:
    from histod.daemon.reports import gather

    data = gather(open_reader(settings), since, until)
    _echo(data, fmt)
    return data.summary


def _echo(data: ReportData, fmt: str) -> None:
    """The report on stdout: the summary as text or JSON, or the window's time buckets as CSV."""
    from histod.daemon.reports import buckets_csv, format_summary

    if fmt == "json":
        click.echo(json.dumps(data.summary.to_json(), indent=2))
    elif fmt == "csv":
        click.echo(buckets_csv(data), nl=False)
    else:
        click.echo(format_summary(data.summary))


def summary_line(summary: Summary, seconds: float) -> str:
    """The line that ends a run over a backlog (`serve --once`): how many files, how fast, how many failed."""
    rate = f", {summary.total / seconds:.1f} files/s" if seconds > 0 and summary.total else ""
    return (
        f"done: {summary.total} files in {seconds:.1f} s{rate} "
        f"({summary.classified} classified, {summary.failed} failed, {summary.moves_waiting} waiting for a move)"
    )


@click.command()
@database_options
@click.option("--since", default="24h", show_default=True, help="a duration (24h, 7d) or an ISO date/time")
@click.option("--until", default=None, help="default: now")
@format_options("table: the summary as text; csv: the window in time buckets; json: the summary")
@click.option(
    "--html",
    "html_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="also write the report as one self-contained HTML page (charts, model, review agreement)",
)
@click.option(
    "--csv",
    "csv_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="also write the window in time buckets as CSV",
)
def report(
    since: str,
    until: str | None,
    fmt: str,
    as_json: bool,
    html_file: Path | None,
    csv_file: Path | None,
    **flags: Any,
) -> None:
    """Summarise the results of a time window from the database: counts, p(malignant), latency, failures, and
    how often the reviewers agree with the model."""
    from histod.daemon.report_html import render
    from histod.daemon.reports import buckets_csv, gather

    fmt = chosen_format(fmt, as_json)
    now = datetime.now(UTC)
    settings = settings_from(**flags)
    data = gather(open_reader(settings), parse_when(since, now), parse_when(until, now) if until else now)
    data.host = settings.host
    for path, make in ((html_file, render), (csv_file, buckets_csv)):
        if path is not None:
            try:
                path.write_text(make(data), encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    _echo(data, fmt)
    if fmt == "table":
        for path in (html_file, csv_file):
            if path is not None:
                click.echo(f"written: {path}")


COLUMNS = (
    "id",
    "received_at",
    "name",
    "status",
    "label",
    "p_malignant",
    "threshold",
    "error_reason",
    "duplicate_of",
    "sha256",
    "model_sha256",
    "original_path",
    "stored_path",
    "kind",
    "amends_id",
    "reviewer",
    "note",
    "rule",
    "tissue_tiles",
    "malignant_tiles",
    "scale_warnings",
)
"""Columns of `histod results --format csv|json`. ``kind`` is ``classification`` (the service's call) or ``review``
(`histod audit review`); a review's ``amends_id`` is the result it amends, ``reviewer`` and ``note`` are the
reviewer's. The last four come from the result's tiles row: an image classified tile by tile (its rule, tissue
and malignant tiles), and any scale warning (``; ``-separated). New columns go at the end."""
TILE_COLUMNS = ("rule", "tissue_tiles", "malignant_tiles")

DEFAULT_ROWS = 50
"""`histod results` shows the newest this many rows unless --limit or --all says otherwise"""


@click.command()
@database_options
@click.option("--since", default=None, help="a duration (24h, 7d) or an ISO date/time; default: everything")
@click.option("--until", default=None)
@click.option("--label", default=None, help="Benign or Malignant")
@click.option("--status", type=click.Choice(["classified", "failed", "reviewed"]), default=None)
@click.option("--limit", type=click.IntRange(min=1), default=None, help=f"the newest N rows (default {DEFAULT_ROWS})")
@click.option("--all", "everything", is_flag=True, help="every row the filters match")
@format_options()
def results(
    since: str | None,
    until: str | None,
    label: str | None,
    status: str | None,
    limit: int | None,
    everything: bool,
    fmt: str,
    as_json: bool,
    **flags: Any,
) -> None:
    """List recorded results for audit (the newest 50 unless --limit or --all), oldest first. Reviews are rows
    of their own (kind review) with the reviewer and the note."""
    from histod.db.queries import ResultFilter, count_results, list_results, tile_rows
    from histod.db.session import reading

    fmt = chosen_format(fmt, as_json)
    if everything and limit is not None:
        raise ConfigError("--all lists every row; --limit N the newest N: give one of them")
    now = datetime.now(UTC)
    filters = ResultFilter(
        since=parse_when(since, now) if since else None,
        until=parse_when(until, now) if until else None,
        label=label,
        status=status,
        limit=None if everything else (limit or DEFAULT_ROWS),
        newest=True,
    )
    with reading(open_reader(settings_from(**flags))) as session:
        found = list_results(session, filters)
        tiles = tile_rows(session, [r.id for r in found])
        rows = []
        for r in found:
            t = tiles.get(r.id)
            row = {c: _value(getattr(r, c)) for c in COLUMNS if c not in (*TILE_COLUMNS, "scale_warnings")}
            row.update({c: None if t is None else getattr(t, c) for c in TILE_COLUMNS})
            row["scale_warnings"] = "; ".join(t.warnings) if t is not None and t.warnings else None
            rows.append(row)
        total = count_results(session, filters) if len(rows) == filters.limit else len(rows)
    # color=True: click would strip what looks like a colour code from piped output, and a name may hold one
    click.echo(format_rows(rows, fmt, total=total), nl=fmt != "csv", color=True)
    if total > len(rows) and fmt != "table":  # the table says so itself; a file must not be cut short unnoticed
        problem(
            f"the newest {len(rows)} of {total} rows: --all for every row", event="results.limited", level="warning"
        )


def _value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


SHOWN = (
    "id",
    "received_at",
    "kind",
    "status",
    "label",
    "p_malignant",
    "error_reason",
    "duplicate_of",
    "amends_id",
    "reviewer",
    "name",
    "note",
)
"""the columns of the table (--format table); csv and json have all of COLUMNS"""
NOTE_WIDTH = 60


def format_rows(rows: list[dict[str, Any]], fmt: str, *, total: int | None = None) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        from histod.db.audit import write_csv

        out = io.StringIO()
        write_csv(out, COLUMNS, rows)
        return out.getvalue()
    table = [list(SHOWN)] + [[_cell(r[c], c) for c in SHOWN] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(SHOWN))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    more = total is not None and total > len(rows)
    lines.append(
        f"({len(rows)} rows: the newest of {total}; --all or --limit N for more)" if more else f"({len(rows)} rows)"
    )
    return "\n".join(lines)


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column == "p_malignant":
        return f"{value:.4f}"
    if column == "received_at":
        return str(value)[:19].replace("T", " ")
    if column == "note":
        text = printable(" ".join(str(value).split()))
        return text if len(text) <= NOTE_WIDTH else text[: NOTE_WIDTH - 3] + "..."
    return printable(str(value))


@click.command()
@click.option("--port", type=click.IntRange(1, 65_535), default=None, help="default: the metrics_port setting")
@click.option("--address", default=None, help="default: the metrics_address setting (loopback for 0.0.0.0)")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="seconds")
@format_options(choices=("table", "json"))
def health(port: int | None, address: str | None, timeout: float, fmt: str, as_json: bool) -> None:
    """Ask the running service's /healthz; exit 0 when it is healthy, 1 when it is not or does not answer."""
    from histod.daemon.health import ask

    fmt = chosen_format(fmt, as_json)
    settings = settings_from()
    port = port or settings.metrics_port
    if port is None:
        raise ConfigError(
            "histod health asks the running service on its metrics port: set metrics_port (HISTOD_METRICS_PORT, "
            "as for the service) or pass --port"
        )
    answer = ask(address or settings.metrics_address, port, timeout)
    click.echo(json.dumps(answer.to_json(), indent=2) if fmt == "json" else answer.text())
    sys.exit(0 if answer.ok else 1)


COMMANDS: list[click.Command] = [report, results, health]
