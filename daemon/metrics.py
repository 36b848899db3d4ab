"""What an operator's monitoring reads from `histod serve`: Prometheus metrics on ``/metrics`` and a health check
on ``/healthz``, served on ``metrics_address:metrics_port`` (127.0.0.1 by default; off unless metrics_port is
set). `histod health` asks ``/healthz`` and exits 0 or 1.

The service owns one :class:`Metrics` (its own registry, never prometheus_client's global one) and tells it what
happens; every method is cheap (a dictionary look-up and an addition under a lock) and safe from any thread:

=====================================================  =========================================================
call                                                   where
=====================================================  =========================================================
``model(sha256, run_id, engine)``                      the model is registered (start-up)
``ready()``                                            READY=1 is sent: the watch is live
``file_done(status, label, reason, latency_s)``        one file's row is committed (classified or failed)
``batch(size)``                                        a batch goes through the steps
``queue_depth(n)``                                     files seen and waiting to be taken (after each batch)
``moves_pending(n)``                                   files recorded, waiting for a move retry
``move_done()`` / ``move_failed(reason)``              each move attempt's outcome (retries too)
``watcher(alive)``                                     every loop tick: is the watcher thread alive
``claims_held(n)``                                     PostgreSQL: claims this service holds (heartbeat)
``report_written()``                                   a periodic report is stored
``database_check(probe)``                              a callable that raises when the database is unreachable
=====================================================  =========================================================

Metrics (all prefixed ``histod_``): ``files_total{status,label,reason}``, ``file_latency_seconds`` and
``batch_size`` (histograms), ``queue_depth``, ``moves_pending``, ``moves_total{result,reason}``,
``last_file_timestamp_seconds`` and ``seconds_since_last_file``, ``model_info{sha256,run_id,engine}``,
``claims_held``, ``watcher_alive``, ``database_up``, ``healthy``, ``reports_total``, ``ready``; plus
prometheus_client's ``process_*`` metrics.

Health (:meth:`Metrics.health`): healthy when the service is ready and no check fails. ``watcher`` fails when
the watcher thread is dead or the loop has not reported for ``stale_s``; ``database`` when the probe raises
(probed at most every ``probe_every_s``); ``moves`` when the last ``failing_moves`` move attempts all failed.
A check the service has not reported yet is ``unknown`` and does not fail.

:meth:`Metrics.status_line` is the text for systemd's ``STATUS=`` (``systemctl status histod``).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from histod.db.session import reading
from histod.errors import ConfigError
from histod.logs import get_logger

log: Any = get_logger("histod.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""seconds from a file's arrival to its row (the row's latency_ms)"""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FAILING_MOVES = 3
"""this many move attempts failing in a row (and none succeeding since) make the service unhealthy"""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not reported yet
    detail: str

    @property
    def state(self) -> str:
        return "unknown" if self.ok is None else "ok" if self.ok else "failing"


@dataclass(frozen=True)
class Health:
    ok: bool
    checks: list[Check] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "failing",
            "checks": {c.name: {"state": c.state, "detail": c.detail} for c in self.checks},
        }


class Metrics:
    """The service's metrics and health state (see the module's docstring for what calls what)."""

    def __init__(
        self,
        *,
        stale_s: float = 120.0,
        probe_every_s: float = 5.0,
        failing_moves: int = FAILING_MOVES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry()
        self.stale_s = stale_s
        self.probe_every_s = probe_every_s
        self.failing_moves = failing_moves
        self.clock = clock
        self._lock = threading.Lock()
        self._ready = False
        self._watcher: tuple[bool, float] | None = None
        self._probe: Callable[[], object] | None = None
        self._probed: tuple[bool, str, float] | None = None
        self._move_streak = 0
        self._last_move_error = ""
        self._moves_seen = False
        self._last_file: float | None = None
        self._counts: dict[str, int] = {}
        self._pending = 0
        r = self.registry
        ProcessCollector(registry=r)
        self.files = Counter(
            "histod_files",
            "files recorded, by status, label and failure reason",
            ("status", "label", "reason"),
            registry=r,
        )
        self.latency = Histogram(
            "histod_file_latency_seconds",
            "seconds from a file's arrival to its row",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram("histod_batch_size", "files per batch", buckets=BATCH_BUCKETS, registry=r)
        self.queue = Gauge("histod_queue_depth", "files seen and waiting to be taken", registry=r)
        self.pending = Gauge("histod_moves_pending", "files recorded and waiting for a move retry", registry=r)
        self.moves = Counter(
            "histod_moves", "move attempts, by result and failure reason", ("result", "reason"), registry=r
        )
        self.last_file = Gauge(
            "histod_last_file_timestamp_seconds", "when the last file was recorded (Unix time)", registry=r
        )
        since = Gauge(
            "histod_seconds_since_last_file", "seconds since the last file was recorded (NaN: none yet)", registry=r
        )
        since.set_function(self._since_last_file)
        self.model_info = Gauge("histod_model_info", "the model served (1)", ("sha256", "run_id", "engine"), registry=r)
        self.claims = Gauge("histod_claims_held", "claims this service holds (PostgreSQL)", registry=r)
        self.reports = Counter("histod_reports", "periodic reports stored", registry=r)
        ready = Gauge("histod_ready", "1 once the service is ready (READY=1)", registry=r)
        ready.set_function(lambda: float(self._ready))
        alive = Gauge("histod_watcher_alive", "1 while the watcher thread is alive (NaN: not reported)", registry=r)
        alive.set_function(lambda: math.nan if self._watcher is None else float(self._watcher[0]))
        database = Gauge("histod_database_up", "1 when the database answered the last probe (NaN: none)", registry=r)
        database.set_function(lambda: math.nan if self._probed is None else float(self._probed[0]))
        healthy = Gauge("histod_healthy", "1 when /healthz says ok", registry=r)
        healthy.set_function(lambda: float(self.health().ok))

    # --- what the service reports ------------------------------------------------------------------------------

    def model(self, sha256: str, run_id: str, engine: str) -> None:
        self.model_info.clear()
        self.model_info.labels(sha256=sha256, run_id=run_id, engine=engine).set(1)

    def ready(self) -> None:
        self._ready = True

    def file_done(self, status: str, label: str | None, reason: str | None, latency_s: float) -> None:
        self.files.labels(status=status, label=label or "", reason=reason or "").inc()
        self.latency.observe(max(0.0, latency_s))
        now = time.time()
        self.last_file.set(now)
        with self._lock:
            self._last_file = now
            self._counts[status] = self._counts.get(status, 0) + 1

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def queue_depth(self, n: int) -> None:
        self.queue.set(n)

    def moves_pending(self, n: int) -> None:
        self.pending.set(n)
        self._pending = n

    def move_done(self) -> None:
        self.moves.labels(result="ok", reason="").inc()
        with self._lock:
            self._move_streak, self._moves_seen = 0, True

    def move_failed(self, reason: str) -> None:
        self.moves.labels(result="failed", reason=reason).inc()
        with self._lock:
            self._move_streak += 1
            self._moves_seen = True
            self._last_move_error = reason

    def watcher(self, alive: bool) -> None:
        self._watcher = (alive, self.clock())

    def claims_held(self, n: int) -> None:
        self.claims.set(n)

    def report_written(self) -> None:
        self.reports.inc()

    def database_check(self, probe: Callable[[], object]) -> None:
        """``probe()`` raises when the database cannot be reached; /healthz calls it (not more often than
        ``probe_every_s``)."""
        self._probe = probe

    # --- what the service is -----------------------------------------------------------------------------------

    def _since_last_file(self) -> float:
        last = self._last_file
        return math.nan if last is None else max(0.0, time.time() - last)

    def _database(self) -> Check:
        if self._probe is None:
            return Check("database", None, "not probed")
        now = self.clock()
        probed = self._probed
        if probed is None or now - probed[2] >= self.probe_every_s:
            try:
                self._probe()
                probed = (True, "reachable", now)
            except Exception as exc:  # any failure to answer is the finding
                probed = (False, f"unreachable: {exc}".splitlines()[0][:300], now)
            self._probed = probed
        return Check("database", probed[0], probed[1])

    def _watcher_check(self) -> Check:
        if self._watcher is None:
            return Check("watcher", None, "not reported")
        alive, at = self._watcher
        age = self.clock() - at
        if not alive:
            return Check("watcher", False, "the watcher thread has stopped")
        if age > self.stale_s:
            return Check("watcher", False, f"the loop has not reported for {age:.0f} s")
        return Check("watcher", True, "alive")

    def _moves_check(self) -> Check:
        with self._lock:
            streak, seen, error = self._move_streak, self._moves_seen, self._last_move_error
        if not seen:
            return Check("moves", None, "no move yet")
        if streak >= self.failing_moves:
            return Check("moves", False, f"the last {streak} move attempts failed ({error})")
        return Check("moves", True, "moving" if streak == 0 else f"{streak} failed in a row")

    def health(self) -> Health:
        checks = [
            Check("ready", self._ready, "ready" if self._ready else "starting"),
            self._watcher_check(),
            self._database(),
            self._moves_check(),
        ]
        return Health(all(c.ok is not False for c in checks), checks)

    def status_line(self) -> str:
        """One line for systemd's STATUS=: counts since start, the last file's time, moves waiting."""
        with self._lock:
            counts, last = dict(self._counts), self._last_file
        done = sum(counts.values())
        parts = [f"{done} files" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})" if done else "")]
        if last is not None:
            parts.append(f"last {datetime.fromtimestamp(last, UTC):%Y-%m-%d %H:%M:%S} UTC")
        if self._pending:
            parts.append(f"{self._pending} waiting for a move")
        return "; ".join(parts)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def database_probe(factory: sessionmaker[Session]) -> Callable[[], object]:
    """A probe for :meth:`Metrics.database_check`: one ``SELECT 1`` in a read transaction."""

    def probe() -> object:
        with reading(factory) as session:
            return session.execute(text("SELECT 1")).scalar()

    return probe


# --- the HTTP server --------------------------------------------------------------------------------------------


def _handler(metrics: Metrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "histod"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, metrics.exposition())
            elif path == "/healthz":
                health = metrics.health()
                body = json.dumps(health.to_json(), indent=2).encode() + b"\n"
                self._send(200 if health.ok else 503, "application/json", body)
            elif path == "/":
                self._send(200, "text/plain; charset=utf-8", b"histod: /metrics (Prometheus), /healthz\n")
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: /metrics or /healthz\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics.request", client=self.client_address[0], request=format % args)

    return Handler


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP on ``address:port`` (port 0: any free port), in a thread."""

    def __init__(self, metrics: Metrics, address: str, port: int) -> None:
        try:
            self.httpd = ThreadingHTTPServer((address, port), _handler(metrics))
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}") from exc
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="histod-metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> MetricsServer:
        self.thread.start()
        log.info("metrics.listening", address=self.httpd.server_address[0], port=self.port)
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@contextmanager
def serving(metrics: Metrics, address: str, port: int | None) -> Iterator[MetricsServer | None]:
    """The server while the block runs (none when ``port`` is None)."""
    if port is None:
        yield None
        return
    server = MetricsServer(metrics, address, port).start()
    try:
        yield server
    finally:
        server.close()
