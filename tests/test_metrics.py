"""Prometheus metrics and the health check (histod.daemon.metrics), `histod health`, and a running service's
/metrics and /healthz on its metrics port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from histod.cli import cli
from histod.daemon.metrics import Metrics, MetricsServer, database_probe
from histod.db.session import open_database
from histod.errors import ConfigError
from histod.synthetic import write_images
from tests.test_service_support import wait_for


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_file_batch_queue_move_and_model_metrics() -> None:
    m = Metrics()
    m.model("ab" * 32, "run-1", "litert")
    m.file_done("classified", "Benign", None, 0.012)
    m.file_done("classified", "Malignant", None, 0.3)
    m.file_done("failed", None, "truncated", 0.004)
    m.batch(3)
    m.queue_depth(17)
    m.moves_pending(2)
    m.move_done()
    m.move_failed("No space left on device")
    m.claims_held(4)
    m.report_written()
    got = samples(m)
    files = {k[1]: v for k, v in got.items() if k[0] == "histod_files_total"}
    assert files == {
        (("label", "Benign"), ("reason", ""), ("status", "classified")): 1.0,
        (("label", "Malignant"), ("reason", ""), ("status", "classified")): 1.0,
        (("label", ""), ("reason", "truncated"), ("status", "failed")): 1.0,
    }
    assert got[("histod_file_latency_seconds_count", ())] == 3
    assert got[("histod_file_latency_seconds_bucket", (("le", "0.025"),))] == 2
    assert got[("histod_batch_size_sum", ())] == 3
    assert got[("histod_queue_depth", ())] == 17
    assert got[("histod_moves_pending", ())] == 2
    assert got[("histod_moves_total", (("reason", "No space left on device"), ("result", "failed")))] == 1
    assert got[("histod_moves_total", (("reason", ""), ("result", "ok")))] == 1
    assert got[("histod_model_info", (("engine", "litert"), ("run_id", "run-1"), ("sha256", "ab" * 32)))] == 1
    assert got[("histod_claims_held", ())] == 4
    assert got[("histod_reports_total", ())] == 1
    assert 0 <= got[("histod_seconds_since_last_file", ())] < 3600
    assert got[("histod_last_file_timestamp_seconds", ())] > 1.7e9
    assert ("process_resident_memory_bytes", ()) in got
    m.model("cd" * 32, "run-2", "litert")  # a new model replaces the label, it does not add one
    assert [k for k in samples(m) if k[0] == "histod_model_info"] == [
        ("histod_model_info", (("engine", "litert"), ("run_id", "run-2"), ("sha256", "cd" * 32)))
    ]
    line = m.status_line()
    assert line.startswith("3 files (classified 2, failed 1); last ") and line.endswith("; 2 waiting for a move")


def test_health_follows_readiness_watcher_database_and_moves() -> None:
    clock = Clock()
    m = Metrics(stale_s=120, probe_every_s=5, clock=clock)
    health = m.health()
    assert not health.ok and health.to_json()["checks"]["ready"]["state"] == "failing"
    m.ready()
    assert m.health().ok  # nothing reported yet: unknown is not failing
    assert {c.name: c.state for c in m.health().checks} == {
        "ready": "ok",
        "watcher": "unknown",
        "database": "unknown",
        "moves": "unknown",
    }
    m.watcher(True)
    assert m.health().ok
    clock.now += 121  # the loop stopped reporting
    assert not m.health().ok and "has not reported for 121 s" in m.health().to_json()["checks"]["watcher"]["detail"]
    m.watcher(False)
    assert m.health().to_json()["checks"]["watcher"]["detail"] == "the watcher thread has stopped"
    m.watcher(True)

    calls: list[int] = []
    broken = [False]

    def probe() -> None:
        calls.append(1)
        if broken[0]:
            raise OSError("connection refused")

    m.database_check(probe)
    assert m.health().ok and len(calls) == 1
    broken[0] = True
    assert m.health().ok and len(calls) == 1  # probed at most every probe_every_s
    clock.now += 5
    assert not m.health().ok and "unreachable: connection refused" in str(m.health().to_json())
    broken[0] = False
    clock.now += 5

    for _ in range(2):
        m.move_failed("Permission denied")
    assert m.health().ok  # two in a row: a retry may still succeed
    m.move_failed("Permission denied")
    assert not m.health().ok
    assert "the last 3 move attempts failed (Permission denied)" in str(m.health().to_json())
    m.move_done()
    assert m.health().ok
    assert samples(m)[("histod_healthy", ())] == 1


def test_database_probe_on_real_databases(tmp_path: Path) -> None:
    good = database_probe(open_database(f"sqlite:///{tmp_path / 'h.db'}"))
    assert good() == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    bad = database_probe(open_database(f"postgresql+psycopg://x@127.0.0.1:{port}/x", migrate=False))
    m = Metrics()
    m.ready()
    m.database_check(bad)
    health = m.health().to_json()
    assert health["status"] == "failing" and health["checks"]["database"]["state"] == "failing"


@pytest.fixture
def server() -> Iterator[tuple[Metrics, MetricsServer]]:
    metrics = Metrics()
    running = MetricsServer(metrics, "127.0.0.1", 0).start()
    try:
        yield metrics, running
    finally:
        running.close()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_http_metrics_healthz_and_not_found(server: tuple[Metrics, MetricsServer]) -> None:
    metrics, running = server
    base = f"http://127.0.0.1:{running.port}"
    metrics.file_done("classified", "Benign", None, 0.01)
    code, kind, body = _get(base + "/metrics")
    assert code == 200 and kind.startswith("text/plain") and "version=" in kind
    assert 'histod_files_total{label="Benign",reason="",status="classified"} 1.0' in body.decode()
    code, kind, body = _get(base + "/healthz")
    assert code == 503 and kind == "application/json" and json.loads(body)["checks"]["ready"]["state"] == "failing"
    metrics.ready()
    code, _, body = _get(base + "/healthz")
    assert code == 200 and json.loads(body)["status"] == "ok"
    assert _get(base + "/nothing")[0] == 404


def test_a_port_in_use_is_a_settings_error(server: tuple[Metrics, MetricsServer]) -> None:
    _, running = server
    with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{running.port}"):
        MetricsServer(Metrics(), "127.0.0.1", running.port)


def test_histod_health_exit_codes(server: tuple[Metrics, MetricsServer]) -> None:
    metrics, running = server
    runner = CliRunner()
    starting = runner.invoke(cli, ["health", "--port", str(running.port)])
    assert starting.exit_code == 1 and starting.stdout.startswith("unhealthy: http://127.0.0.1:")
    assert "ready     failing  starting" in starting.stdout
    metrics.ready()
    ok = runner.invoke(cli, ["health", "--format", "json"], env={"HISTOD_METRICS_PORT": str(running.port)})
    assert ok.exit_code == 0 and json.loads(ok.stdout)["status"] == "ok"
    for _ in range(3):
        metrics.move_failed("Read-only file system")
    failing = runner.invoke(cli, ["health", "--port", str(running.port)])
    assert failing.exit_code == 1 and "moves     failing  the last 3 move attempts failed" in failing.stdout


def test_histod_health_when_nothing_listens_or_no_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = CliRunner().invoke(cli, ["health", "--port", str(port)])
    assert gone.exit_code == 1
    assert "unreachable: nothing answers" in gone.stdout and f"metrics_port {port}" in gone.stdout
    unset = CliRunner().invoke(cli, ["health"], env={"HISTOD_METRICS_PORT": None})
    assert unset.exit_code == 2 and "set metrics_port" in unset.output


@pytest.mark.slow
def test_a_running_service_serves_metrics_and_health(tiny_run_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "data"
    write_images(data / "prediction", 3, size=48)
    (data / "prediction" / "empty.png").write_bytes(b"")
    env = {**os.environ, "HISTOD_METRICS_PORT": str(port), "HISTOD_STABLE_MS": "0", "HISTOD_LOG_FORMAT": "json"}
    args = [sys.executable, "-m", "histod", "serve", "--data-dir", str(data), "--model", str(tiny_run_dir)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        health = [sys.executable, "-m", "histod", "health"]

        def healthy() -> bool:
            assert proc.poll() is None
            return subprocess.run(health, env=env, capture_output=True, check=False).returncode == 0

        wait_for(healthy, 60, 0.2, "the service to report healthy")

        def scraped() -> dict[str, float]:
            families = text_string_to_metric_families(_get(f"http://127.0.0.1:{port}/metrics")[2].decode())
            found: dict[str, float] = {}
            for s in (s for family in families for s in family.samples):
                key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()) if k in ("status", "result"))
                found[key] = found.get(key, 0.0) + s.value
            return found

        wait_for(lambda: scraped().get("histod_files_total,status=classified") == 3, 60, 0.2, "3 files counted")
        wait_for(lambda: scraped().get("histod_watcher_alive") == 1.0, 30, 0.2, "the watcher reported alive")
        code, _, body = _get(f"http://127.0.0.1:{port}/metrics")
        text = body.decode()
        sha = json.loads((tiny_run_dir / "model.json").read_text())["tflite_sha256"]
        assert code == 200 and f'sha256="{sha}"' in text and "histod_ready 1.0" in text
        assert "histod_database_up 1.0" in text and "histod_healthy 1.0" in text
        found = scraped()
        assert found["histod_files_total,status=failed"] == 1
        assert found["histod_moves_total,result=ok"] == 4 and found["histod_batch_size_count"] >= 1
        assert found["histod_file_latency_seconds_count"] == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert proc.stderr is not None
        stored = [json.loads(line) for line in proc.stderr.read().decode().splitlines() if '"image.stored"' in line]
        assert sorted((e["status"], e["level"]) for e in stored) == [("classified", "info")] * 3 + [
            ("failed", "warning")
        ]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    after = subprocess.run(health, env=env, capture_output=True, text=True, check=False)
    assert after.returncode == 1 and "unreachable" in after.stdout
