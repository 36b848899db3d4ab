"""`histod serve`'s loop: the watcher's paths are batched (up to batch_size, waiting at most batch_timeout_ms)
and each batch goes through :class:`~histod.daemon.service.Service`; between batches the service retries what
waits (deferred batches, moves, files to take again). :func:`run_once` is `serve --once`. See histod.daemon.app
for start-up."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from histod.daemon.filters import ImageFilter
from histod.daemon.intake import scan
from histod.daemon.service import Service
from histod.db.models import utcnow
from histod.errors import DatabaseError, WatchError


def collect(
    inbox: queue.Queue[tuple[Path, datetime]], size: int, timeout_s: float, wait_s: float = 0.5
) -> list[tuple[Path, datetime]]:
    """Up to ``size`` arrivals: wait up to ``wait_s`` for the first, then up to ``timeout_s`` for the rest."""
    try:
        batch = [inbox.get(timeout=wait_s)]
    except queue.Empty:
        return []
    deadline = time.monotonic() + timeout_s
    while len(batch) < size:
        left = deadline - time.monotonic()
        try:
            batch.append(inbox.get(timeout=left) if left > 0 else inbox.get_nowait())
        except queue.Empty:
            break
    return batch


def run_loop(
    service: Service,
    watch: Callable[[threading.Event], Any],
    stop: threading.Event,
    *,
    on_tick: Callable[[], None],
) -> None:
    """Feed the watcher's batches through ``service`` until ``stop`` is set; the batch in flight finishes."""
    inbox: queue.Queue[tuple[Path, datetime]] = queue.Queue()
    died: list[BaseException] = []
    feeder_stop = threading.Event()

    def feed() -> None:
        try:
            for paths in watch(feeder_stop):
                now = utcnow()
                for path in paths:
                    inbox.put((path, now))
        except BaseException as exc:
            died.append(exc)

    thread = threading.Thread(target=feed, name="histod-watch", daemon=True)
    thread.start()
    settings = service.settings
    try:
        while not stop.is_set():
            on_tick()
            if died or not thread.is_alive():
                error = died[0] if died else None
                raise WatchError(f"the watcher stopped: {error}") from error
            # a short wait for the first file keeps ticks (READY, watchdog, reports) prompt
            batch = collect(inbox, settings.batch_size, settings.batch_timeout_ms / 1000, wait_s=0.1)
            if batch and not stop.is_set():
                try:
                    service.process(batch)
                except DatabaseError as exc:
                    service.defer(batch, exc)  # the files stay in the watch folder; raised unless passing
            elif batch:
                break  # stopping: what was not started stays in the watch folder for the next start
            service.retry_deferred()
            service.retry_moves()
            service.take_again()
            service.tidy()
            service.sweep()
    finally:
        feeder_stop.set()
        thread.join(timeout=5)


def run_once(service: Service, watch_dir: Path, accept: ImageFilter, stop: threading.Event, rounds: int = 5) -> int:
    """Process what is in the watch folder now; files written in the last stable_ms are waited for (a few
    rounds at most, so a folder that never stops changing still ends). Returns the files handled."""
    settings = service.settings
    handled = 0
    for _ in range(rounds):
        paths, wait = scan(watch_dir, accept, settle_s=settings.stable_ms / 1000, now=time.time())
        for start in range(0, len(paths), settings.batch_size):
            if stop.is_set():
                return handled
            now = utcnow()
            handled += service.process([(p, now) for p in paths[start : start + settings.batch_size]])
        service.take_again()
        if wait is None or stop.wait(wait + 0.01):
            break
    service.retry_moves(force=True)
    service.take_again()
    return handled
