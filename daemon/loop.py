"""`histod serve`'s loop: the watcher's paths go into the pipeline's inbox from a thread of their own, and the
main thread turns the pipeline (histod.daemon.pipeline), then looks after what waits between batches (deferred
batches, moves to retry, files to take again). :func:`run_once` is `serve --once`. See histod.daemon.app for
start-up."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from histod.daemon.filters import ImageFilter
from histod.daemon.intake import Arrival, scan
from histod.daemon.pipeline import Pipeline
from histod.db.models import utcnow
from histod.errors import WatchError
from histod.logs import json_mode
from histod.progress import Progress

TICK_S = 0.1
"""the longest the loop waits for work before it ticks (READY, watchdog pings, reports)"""


def run_loop(
    pipeline: Pipeline,
    watch: Callable[[threading.Event], Iterator[list[Path]]],
    stop: threading.Event,
    *,
    on_tick: Callable[[], None],
) -> None:
    """Feed the watcher's paths through ``pipeline`` until ``stop`` is set; the batches in flight finish."""
    died: list[BaseException] = []
    feeder_stop = threading.Event()

    def feed() -> None:
        try:
            for paths in watch(feeder_stop):
                now = utcnow()
                pipeline.submit(Arrival(p, now) for p in paths)
        except BaseException as exc:
            died.append(exc)
            pipeline.inbox.put(None)  # wake the loop

    thread = threading.Thread(target=feed, name="histod-watch", daemon=True)
    thread.start()
    try:
        while not stop.is_set():
            on_tick()
            if died or not thread.is_alive():
                error = died[0] if died else None
                raise WatchError(f"the watcher stopped: {error}") from error
            pipeline.pump(TICK_S)
            pipeline.housekeeping()
        pipeline.finish_flight()  # what was not started stays in the watch folder for the next start
    finally:
        feeder_stop.set()
        thread.join(timeout=5)


def run_once(pipeline: Pipeline, watch_dir: Path, accept: ImageFilter, stop: threading.Event, rounds: int = 5) -> int:
    """Process what is in the watch folder now; files written in the last stable_ms are waited for (a few
    rounds at most, so a folder that never stops changing still ends). Returns the files handled."""
    settings = pipeline.settings
    before = pipeline.files
    with Progress("files", 0, show=not json_mode(settings.log_format)) as bar:  # N / M on a terminal
        pipeline.on_recorded = bar.advance
        try:
            return _once(pipeline, watch_dir, accept, stop, rounds, bar) - before
        finally:
            pipeline.on_recorded = lambda n: None


def _once(
    pipeline: Pipeline, watch_dir: Path, accept: ImageFilter, stop: threading.Event, rounds: int, bar: Progress
) -> int:
    settings = pipeline.settings
    for _ in range(rounds):
        paths, wait = scan(watch_dir, accept, settle_s=settings.stable_ms / 1000, now=time.time())
        bar.total += len(paths)
        now = utcnow()
        pipeline.submit(Arrival(p, now) for p in paths)
        pipeline.drain(stop)
        if stop.is_set():
            return pipeline.files
        pipeline.take_again()
        pipeline.drain(stop)
        if wait is None or stop.wait(wait + 0.01):
            break
    pipeline.retry_moves(force=True)
    pipeline.take_again()
    pipeline.drain(stop)
    return pipeline.files
