"""Helpers for the service, report and CLI tests (no tests here): a deadline wait, hostile files, counts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from histod.daemon.app import serve
from histod.daemon.intake import Item, read
from histod.db.models import Move, Result, utcnow
from histod.db.session import open_database, reading
from histod.settings import Settings, load_settings


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def service_settings(root: Path, run_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": root / "data",
        "model": run_dir,
        "stable_ms": 0,
        "batch_size": 4,
        "batch_timeout_ms": 50,
        "report_interval_s": 3600,
        "host": "test-host",
    }
    values.update(overrides)
    return load_settings(**values)


_FACTORIES: dict[str, sessionmaker[Session]] = {}


def factory_for(settings: Settings) -> sessionmaker[Session]:
    url = settings.resolved_database_url
    if url not in _FACTORIES:
        _FACTORIES[url] = open_database(url)
    return _FACTORIES[url]


def rows(settings: Settings) -> list[Result]:
    with reading(factory_for(settings)) as s:
        return list(s.scalars(select(Result).order_by(Result.id)))


def row_count(settings: Settings) -> int:
    with reading(factory_for(settings)) as s:
        return int(s.scalar(select(func.count(Result.id))) or 0)


def moves(settings: Settings) -> list[Move]:
    with reading(factory_for(settings)) as s:
        return list(s.scalars(select(Move).order_by(Move.id)))


def classified(path: Path, p: float) -> Item:
    """``path`` read as the intake stage reads it, with ``p`` as the infer stage would set it."""
    item = read(path, utcnow(), max_bytes=1 << 20)
    assert item is not None
    item.data, item.p, item.classified_at = None, p, utcnow()
    return item


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def hostile_files(folder: Path, good: Path) -> dict[str, str]:
    """Write a truncated PNG, an empty file and text named .jpg into ``folder``; name -> expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    return {"truncated.png": "truncated", "empty.png": "empty", "text.jpg": "not_an_image"}


def running_service(settings: Settings) -> tuple[threading.Thread, threading.Event, list[BaseException]]:
    """`histod serve`'s function in a thread of this process (for faults injected in-process); returns the
    thread, the stop event that ends it, and the exceptions it raised."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve(settings, stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="serve")
    thread.start()
    return thread, stop, errors
