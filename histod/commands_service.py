"""`histod serve`, `histod report`, `histod results`, `histod demo`: thin commands over histod.daemon and
histod.db. Everything heavy is imported inside the command, so `histod --help` stays fast."""

from __future__ import annotations

import io
import json
import re
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from histod import stopping
from histod.errors import ConfigError
from histod.logs import printable
from histod.settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])

UNMOVED_EXIT = 7
"""`serve --once`: files were recorded but could not be moved (they stay in the watch folder for a retry)"""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(value: str, now: datetime) -> datetime:
    """``24h``, ``30m``, ``7d``, ``90s``, ``2w`` (that long before ``now``) or an ISO date/time (UTC if naive)."""
    match = _DURATION.match(value)
    if match:
        amount, unit = float(match.group(1)), match.group(2).lower()
        return now - timedelta(**{_UNITS[unit]: amount})
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ConfigError(f"{value!r} is neither a duration (24h, 30m, 7d) nor an ISO date/time") from exc
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def common(func: F) -> F:
    """The flags every service command shares."""
    options = [
        click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="default: HISTOD_DATA_DIR"),
        click.option("--watch", "watch_dir", type=click.Path(path_type=Path), default=None, help="watched folder"),
        click.option(
            "--db", "database_url", default=None, help="SQLAlchemy URL (default sqlite:///<data-dir>/histod.db)"
        ),
        click.option("--model", type=click.Path(path_type=Path), default=None, help="RUN_DIR from `histod train`"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _settings(**flags: Any) -> Settings:
    return load_settings(**flags)


@click.command()
@common
@click.option("--engine", type=click.Choice(["litert", "keras"]), default=None, help="default: litert")
@click.option("--once", is_flag=True, help="process what is in the folder, write a report and exit")
@click.option(
    "--allow-parity-failure",
    is_flag=True,
    default=None,
    help="serve a run whose model.tflite failed the export parity check (default: refused)",
)
def serve(once: bool, **flags: Any) -> None:
    """Watch a folder; classify, record and move every image dropped into it."""
    with stopping.stop_on_signals() as stop:  # first: a SIGTERM from here on (or caught earlier) is a clean stop
        from histod.daemon.app import serve as run

        settings = _settings(**flags)
        result = run(settings, stop, once=once)
    if once and not result.start_up_only:
        _print_report(settings, result.started, result.stopped, as_json=False)
        if result.unmoved:
            files = "1 file waits" if result.unmoved == 1 else f"{result.unmoved} files wait"
            click.secho(f"error: {files} for a move (see `histod report`)", err=True, fg="red")
            sys.exit(UNMOVED_EXIT)


def _open(settings: Settings) -> Any:
    """Read-only, never migrating: auditors who may read but not write the database use these commands."""
    from histod.db.session import open_read_only

    return open_read_only(settings.resolved_database_url, busy_timeout_ms=settings.busy_timeout_ms)


def _print_report(settings: Settings, since: datetime, until: datetime, *, as_json: bool) -> None:
    from histod.daemon.reports import format_summary, summarise

    summary = summarise(_open(settings), since, until)
    click.echo(json.dumps(summary.to_json(), indent=2) if as_json else format_summary(summary))


@click.command()
@common
@click.option("--since", default="24h", show_default=True, help="a duration (24h, 7d) or an ISO date/time")
@click.option("--until", default=None, help="default: now")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def report(since: str, until: str | None, as_json: bool, **flags: Any) -> None:
    """Summarise the results of a time window from the database."""
    now = datetime.now(UTC)
    _print_report(_settings(**flags), parse_when(since, now), parse_when(until, now) if until else now, as_json=as_json)


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
)
"""Columns of `histod results --format csv|json`. ``kind`` is ``classification`` (the service's call) or ``review``
(`histod audit review`); a review's ``amends_id`` is the result it amends. New columns go at the end."""


@click.command()
@common
@click.option("--since", default=None, help="a duration (24h, 7d) or an ISO date/time; default: everything")
@click.option("--until", default=None)
@click.option("--label", default=None, help="Benign or Malignant")
@click.option("--status", type=click.Choice(["classified", "failed", "reviewed"]), default=None)
@click.option("--limit", type=click.IntRange(min=1), default=None)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def results(
    since: str | None,
    until: str | None,
    label: str | None,
    status: str | None,
    limit: int | None,
    fmt: str,
    **flags: Any,
) -> None:
    """List recorded results for audit, oldest first."""
    from histod.db.queries import ResultFilter, list_results
    from histod.db.session import reading

    now = datetime.now(UTC)
    filters = ResultFilter(
        since=parse_when(since, now) if since else None,
        until=parse_when(until, now) if until else None,
        label=label,
        status=status,
        limit=limit,
    )
    with reading(_open(_settings(**flags))) as session:
        rows = [{c: _value(getattr(r, c)) for c in COLUMNS} for r in list_results(session, filters)]
    # color=True: click would strip what looks like a colour code from piped output, and a name may hold one
    click.echo(format_rows(rows, fmt), nl=fmt != "csv", color=True)


def _value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def format_rows(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        from histod.db.audit import write_csv

        out = io.StringIO()
        write_csv(out, COLUMNS, rows)
        return out.getvalue()
    shown = (
        "id",
        "received_at",
        "kind",
        "status",
        "label",
        "p_malignant",
        "error_reason",
        "duplicate_of",
        "amends_id",
        "name",
    )
    table = [list(shown)] + [[_cell(r[c], c) for c in shown] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(shown))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.append(f"({len(rows)} rows)")
    return "\n".join(lines)


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column == "p_malignant":
        return f"{value:.4f}"
    if column == "received_at":
        return str(value)[:19].replace("T", " ")
    return printable(str(value))


@click.command()
@click.option("--dir", "folder", type=click.Path(path_type=Path), default=None, help="default: a temporary folder")
@click.option("--images", type=click.IntRange(min=1), default=40, show_default=True, help="images dropped in")
@click.option("--epochs", type=click.IntRange(min=0), default=4, show_default=True)
def demo(folder: Path | None, images: int, epochs: int) -> None:
    """Generate synthetic tiles, train a tiny model, serve a folder, drop images in and print the report."""
    with stopping.stop_on_signals() as stop:
        _run_demo(folder, images=images, epochs=epochs, stop=stop)


def _run_demo(folder: Path | None, *, images: int, epochs: int, stop: threading.Event) -> None:
    import tempfile
    import time

    from histod.daemon.app import serve as run
    from histod.synthetic import SyntheticSpec, make_dataset, write_images
    from histod.trainer.api import train
    from histod.trainer.config import TrainConfig

    root = folder if folder is not None else Path(tempfile.mkdtemp(prefix="histod-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    click.echo(f"[1/4] synthetic dataset in {root / 'dataset'}")
    dataset = make_dataset(root / "dataset", SyntheticSpec(patients=24, tiles_per_patient=10, size=64))
    click.echo(f"[2/4] training a tiny model into {root / 'run'} (a minute or two on 2 cores)")
    config = TrainConfig(data_dir=dataset, out=root / "run", **DEMO_TRAINING, epochs=epochs)
    run_dir = train(config)
    settings = load_settings(data_dir=root / "data", model=run_dir, stable_ms=200)
    click.echo(f"[3/4] serving {settings.resolved_watch_dir}; dropping {images} images into it")
    failure: list[BaseException] = []
    outcome: list[Any] = []

    def service() -> None:
        try:
            outcome.append(run(settings, stop))
        except BaseException as exc:
            failure.append(exc)
            stop.set()

    thread = threading.Thread(target=service, name="histod-demo-serve")
    thread.start()
    staging = root / "staging"
    settings.resolved_watch_dir.mkdir(parents=True, exist_ok=True)
    for path in write_images(staging, images, size=64, seed=7):
        path.rename(settings.resolved_watch_dir / path.name)  # the atomic-rename upload
    deadline = time.monotonic() + 300
    while not stop.is_set() and time.monotonic() < deadline:
        done = sum(1 for d in (settings.processed_dir, settings.failed_dir) for p in d.rglob("*") if p.is_file())
        if done >= images:
            break
        stop.wait(0.2)
    stop.set()
    thread.join()
    if failure:
        raise failure[0]
    click.echo("[4/4] report")
    result = outcome[0]
    _print_report(settings, result.started, result.stopped, as_json=False)
    click.echo(f"\nresults: histod results --data-dir {settings.data_dir}")
    click.echo(f"again:   histod serve --data-dir {settings.data_dir} --model {run_dir}")


DEMO_TRAINING: dict[str, Any] = {
    "image_size": 64,
    "alpha": 0.35,
    "weights": "none",
    "head_epochs": 0,
    "fine_tune_layers": 1000,
    "learning_rate": 1e-3,
    "batch_size": 8,
    "augment": False,
    "patience": 3,
    "ema": 0.0,  # a moving average over so few steps would still be the random start
}
"""A model that learns the synthetic tiles in seconds: small, random start, every layer trained."""


@click.command()
@click.option("--port", type=click.IntRange(1, 65_535), default=None, help="default: the metrics_port setting")
@click.option("--address", default=None, help="default: the metrics_address setting (loopback for 0.0.0.0)")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="seconds")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def health(port: int | None, address: str | None, timeout: float, fmt: str) -> None:
    """Ask the running service's /healthz; exit 0 when it is healthy, 1 when it is not or does not answer."""
    from histod.daemon.health import ask

    settings = _settings()
    port = port or settings.metrics_port
    if port is None:
        raise ConfigError(
            "histod health asks the running service on its metrics port: set metrics_port (HISTOD_METRICS_PORT, "
            "as for the service) or pass --port"
        )
    answer = ask(address or settings.metrics_address, port, timeout)
    if fmt == "json":
        click.echo(json.dumps(answer.to_json(), indent=2))
    else:
        click.echo(answer.text())
    sys.exit(0 if answer.ok else 1)


COMMANDS: list[click.Command] = [serve, report, results, demo, health]
