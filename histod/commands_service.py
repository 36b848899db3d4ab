"""`histod serve` and `histod demo`, and what the commands that read the database share (the database options,
durations). Everything heavy is imported inside the command, so `histod --help` stays fast."""

from __future__ import annotations

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
from histod.logs import problem, say
from histod.settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])

FORMATS = ("table", "csv", "json")
"""the one --format convention: what a command prints (results, report, predict, evaluate; audit export's file)"""


def json_flag(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="short for --format json")(func)


def format_options(help: str | None = None, choices: tuple[str, ...] = FORMATS) -> Callable[[F], F]:
    """``--format`` (one of ``choices``, table by default) and ``--json`` for short, as every command that
    prints results spells them; the command reads them through :func:`chosen_format`."""

    def decorate(func: F) -> F:
        option = click.option(
            "--format", "fmt", type=click.Choice(choices), default="table", show_default=True, help=help
        )
        return option(json_flag(func))

    return decorate


def chosen_format(fmt: str, as_json: bool) -> str:
    if as_json and fmt not in ("table", "json"):
        raise ConfigError(f"--json is --format json: it cannot go with --format {fmt}")
    return "json" if as_json else fmt


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


def _options(func: F, options: list[Callable[[F], F]]) -> F:
    for option in reversed(options):
        func = option(func)
    return func


def database_options(func: F) -> F:
    """Where the database is: every command that reads or amends it."""
    return _options(
        func,
        [
            click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="default: HISTOD_DATA_DIR"),
            click.option(
                "--db", "database_url", default=None, help="SQLAlchemy URL (default sqlite:///<data-dir>/histod.db)"
            ),
        ],
    )


def settings_from(**flags: Any) -> Settings:
    return load_settings(**flags)


@click.command()
@database_options
@click.option("--watch", "watch_dir", type=click.Path(path_type=Path), default=None, help="the watched folder")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="RUN_DIR from `histod train`")
@click.option("--engine", type=click.Choice(["litert", "keras"]), default=None, help="default: litert")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="inference threads (default 2)")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=None, help="images per batch (default 8)")
@click.option("--polling/--no-polling", default=None, help="watchdog's polling observer, for NFS/SMB shares")
@click.option(
    "--report-interval",
    "report_interval_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="seconds between periodic reports (default 3600)",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65_535),
    default=None,
    help="serve /metrics and /healthz on this port (127.0.0.1)",
)
@click.option("--once", is_flag=True, help="process what is in the folder, write a report and exit")
@click.option(
    "--allow-parity-failure",
    is_flag=True,
    default=None,
    help="serve a run whose model.tflite failed the export parity check (default: refused)",
)
def serve(once: bool, **flags: Any) -> None:
    """Watch a folder; classify, record and move every image dropped into it. Every setting also comes from
    HISTOD_* variables or histod.toml (docs/configuration.md)."""
    if once:
        ignored = [f"--{k.removesuffix('_s').replace('_', '-')}" for k in ONCE_IGNORES if flags.get(k) is not None]
        if ignored:
            raise ConfigError(
                f"serve --once takes what is in the folder now and writes one report: {', '.join(ignored)} "
                "applies to the running service only"
            )
    with stopping.stop_on_signals() as stop:  # first: a SIGTERM from here on (or caught earlier) is a clean stop
        from histod.daemon.app import serve as run

        settings = settings_from(**flags)
        result = run(settings, stop, once=once)
    if once and not result.start_up_only:
        from histod.commands_report import print_report, summary_line

        summary = print_report(settings, result.started, result.stopped)
        seconds = (result.stopped - result.started).total_seconds()
        say(summary_line(summary, seconds), event="serve.done", files=summary.total, seconds=round(seconds, 3))
        if result.unmoved:
            files = "1 file waits" if result.unmoved == 1 else f"{result.unmoved} files wait"
            problem(f"{files} for a move (see `histod report`)", files=result.unmoved)
            sys.exit(UNMOVED_EXIT)


ONCE_IGNORES = ("polling", "report_interval_s", "metrics_port")
"""serve flags that `serve --once` would ignore, so it refuses them"""


@click.command()
@click.option("--dir", "folder", type=click.Path(path_type=Path), default=None, help="default: a temporary folder")
@click.option("--images", type=click.IntRange(min=1), default=40, show_default=True, help="images dropped in")
@click.option("--epochs", type=click.IntRange(min=0), default=4, show_default=True)
def demo(folder: Path | None, images: int, epochs: int) -> None:
    """Generate synthetic tiles, train a tiny model, serve a folder, drop images in and print the report."""
    from histod.trainer import require_training

    require_training("histod demo")
    with stopping.stop_on_signals() as stop:
        _run_demo(folder, images=images, epochs=epochs, stop=stop)


def _run_demo(folder: Path | None, *, images: int, epochs: int, stop: threading.Event) -> None:
    import tempfile
    import time

    from histod.commands_report import print_report
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
    print_report(settings, result.started, result.stopped)
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


COMMANDS: list[click.Command] = [serve, demo]
