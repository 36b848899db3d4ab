"""`histod serve`, `report` and `results` as a user runs them: CliRunner in-process, and real subprocesses for
signals, kills and the no-TensorFlow guarantee."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from histod.cli import cli
from histod.commands_service import parse_when
from histod.db.models import utcnow
from histod.synthetic import write_images
from tests.test_service_support import files_under, hostile_files, rows, service_settings, wait_for

ROOT = Path(__file__).resolve().parents[1]


def _flags(root: Path, run_dir: Path | None = None) -> list[str]:
    flags = ["--data-dir", str(root / "data")]
    return [*flags, "--model", str(run_dir)] if run_dir else flags


@pytest.fixture(scope="module")
def served(tiny_run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder after `histod serve --once` over 4 good tiles and 3 hostile files."""
    root = tmp_path_factory.mktemp("cli")
    watch = root / "data" / "prediction"
    good = write_images(watch, 4, size=48)
    hostile_files(watch, good[0])
    result = CliRunner().invoke(cli, ["--log-format", "json", "serve", "--once", *_flags(root, tiny_run_dir)])
    assert result.exit_code == 0, result.output
    assert "images      7  (classified 4, failed 3" in result.stdout
    (done,) = [json.loads(line) for line in result.stderr.splitlines() if '"serve.done"' in line]
    assert done["files"] == 7 and done["message"].startswith("done: 7 files in ")
    assert "(4 classified, 3 failed, 0 waiting for a move)" in done["message"]
    return root


def test_report_json_matches_the_rows(served: Path, tiny_run_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["report", "--since", "1h", "--json", *_flags(served)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    recorded = rows(service_settings(served, tiny_run_dir))
    assert data["total"] == len(recorded) == 7
    assert data["classified"] == 4 and data["failed"] == 3
    assert sum(data["by_label"].values()) == 4
    assert set(data["by_reason"]) <= {"empty", "truncated", "corrupt", "not_an_image"}
    assert data["latency_p95_ms"] >= data["latency_p50_ms"] > 0


def test_report_writes_a_page_and_a_csv_and_prints_any_format(served: Path, tmp_path: Path) -> None:
    page, table = tmp_path / "out.html", tmp_path / "out.csv"
    args = ["report", "--since", "7d", *_flags(served)]
    result = CliRunner().invoke(cli, [*args, "--html", str(page), "--csv", str(table)])
    assert result.exit_code == 0, result.output
    assert f"written: {page}" in result.stdout and "reviews     none of the window" in result.stdout
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") == 4 and "truncated.png" not in html
    assert "Failures by reason" in html and "not_an_image" in html
    with table.open(newline="") as fh:
        assert sum(int(r["total"]) for r in csv.DictReader(fh)) == 7
    printed = CliRunner().invoke(cli, [*args, "--format", "csv"]).stdout
    assert printed == table.read_text()
    both = CliRunner().invoke(cli, [*args, "--format", "csv", "--json"])
    assert both.exit_code == 2 and "--json is --format json" in both.output


def test_serve_once_refuses_the_flags_only_a_running_service_uses(tmp_path: Path) -> None:
    for flag in (["--polling"], ["--report-interval", "60"], ["--metrics-port", "9464"]):
        got = CliRunner().invoke(cli, ["--log-format", "console", "serve", "--once", *flag, *_flags(tmp_path)])
        assert got.exit_code == 2 and "error: serve --once takes what is in the folder now" in got.output, got.output
        assert flag[0] in got.output
    assert not (tmp_path / "data").exists()


def test_report_of_an_empty_window(served: Path) -> None:
    result = CliRunner().invoke(cli, ["report", "--since", "2000-01-01", "--until", "2000-01-02", *_flags(served)])
    assert result.exit_code == 0, result.output
    assert "images      0" in result.stdout


def test_results_in_every_format(served: Path, tiny_run_dir: Path) -> None:
    recorded = rows(service_settings(served, tiny_run_dir))
    runner = CliRunner()
    as_json = json.loads(runner.invoke(cli, ["results", "--format", "json", *_flags(served)]).stdout)
    assert [r["id"] for r in as_json] == [r.id for r in recorded]
    assert [r["sha256"] for r in as_json] == [r.sha256 for r in recorded]
    as_csv = list(
        csv.DictReader(io.StringIO(runner.invoke(cli, ["results", "--format", "csv", *_flags(served)]).stdout))
    )
    assert [int(r["id"]) for r in as_csv] == [r.id for r in recorded]
    failed = json.loads(
        runner.invoke(cli, ["results", "--status", "failed", "--format", "json", *_flags(served)]).stdout
    )
    assert sorted(r["name"] for r in failed) == ["empty.png", "text.jpg", "truncated.png"]
    label = next(r.label for r in recorded if r.label is not None)  # a label the model gave (rows may start failed)
    by_label = json.loads(
        runner.invoke(cli, ["results", "--label", label.lower(), "--format", "json", *_flags(served)]).stdout
    )
    assert by_label and all(r["label"] == label for r in by_label)
    table = runner.invoke(cli, ["results", "--since", "1h", *_flags(served)]).stdout
    assert "(7 rows)" in table and "truncated.png" in table


def test_bad_since_is_a_usage_error(served: Path) -> None:
    result = CliRunner().invoke(cli, ["report", "--since", "yesterday-ish", *_flags(served)])
    assert result.exit_code == 2 and "neither a duration" in result.output
    now = utcnow()
    assert (now - parse_when("90m", now)).total_seconds() == 5400


def test_report_without_a_database_says_so_and_creates_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["results", *_flags(tmp_path)])
    assert result.exit_code == 5 and "no results database" in result.output
    assert not (tmp_path / "data").exists()


def test_serve_without_a_model_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--once", *_flags(tmp_path)], env={"HISTOD_MODEL": None})
    assert result.exit_code == 2 and "no model" in result.output


# --- subprocesses ------------------------------------------------------------------------------------------
@pytest.fixture
def serve_process(tiny_run_dir: Path, tmp_path: Path) -> Iterator[tuple[Path, list[subprocess.Popen[bytes]]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield tmp_path, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def _start(root: Path, run_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HISTOD_BATCH_SIZE": "2", "HISTOD_STABLE_MS": "0", "HISTOD_LOG_FORMAT": "json"}
    return subprocess.Popen(
        [sys.executable, "-m", "histod", "serve", *_flags(root, run_dir), *extra],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _start_and_wait_for_a_first_file(
    root: Path, run_dir: Path, procs: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """Start `histod serve` and return once its first file has been moved (or it has exited)."""
    processed = service_settings(root, run_dir).processed_dir
    proc = _start(root, run_dir)
    procs.append(proc)
    wait_for(lambda: (processed.exists() and any(processed.rglob("*.png"))) or proc.poll() is not None, 60)
    return proc


def _check_nothing_lost(root: Path, run_dir: Path, total: int, *, all_done: bool) -> None:
    settings = service_settings(root, run_dir)
    recorded = rows(settings)
    stored = [*files_under(settings.processed_dir), *files_under(settings.failed_dir)]
    waiting = files_under(settings.resolved_watch_dir)
    names = [r.name for r in recorded]
    assert len(names) == len(set(names)), "a file was classified twice"
    assert sorted(str(p) for p in stored) == sorted(r.stored_path for r in recorded), "rows and moved files differ"
    assert {p.name for p in waiting}.isdisjoint(names), "a recorded file was left unmoved"
    assert len(recorded) + len(waiting) == total, "a file was lost"
    if all_done:
        assert len(recorded) == total and waiting == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_stream_finishes_the_batch_and_loses_nothing(
    serve_process: tuple[Path, list[subprocess.Popen[bytes]]], tiny_run_dir: Path, sig: signal.Signals
) -> None:
    root, procs = serve_process
    settings = service_settings(root, tiny_run_dir)
    write_images(settings.resolved_watch_dir, 150, size=48)
    proc = _start_and_wait_for_a_first_file(root, tiny_run_dir, procs)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    _check_nothing_lost(root, tiny_run_dir, 150, all_done=False)
    done = subprocess.run([*_start_args(root, tiny_run_dir), "--once"], cwd=root, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    _check_nothing_lost(root, tiny_run_dir, 150, all_done=True)


def _events(stderr: bytes) -> list[dict[str, object]]:
    lines = stderr.decode(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _loaded(pid: int, library: str) -> bool:
    """Whether the process has mapped ``library`` (a shared object: it is importing the package by now)."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # it has exited
        return False


def test_a_sigterm_while_it_still_imports_is_a_clean_stop(
    serve_process: tuple[Path, list[subprocess.Popen[bytes]]], tiny_run_dir: Path
) -> None:
    """systemd may stop the service at any moment of its start-up. pydantic's extension is loaded while histod's
    settings are imported, long before the serve command's own handler exists: the SIGTERM lands in the middle
    of the imports, which once ended the process by the default action (status -15)."""
    root, procs = serve_process
    settings = service_settings(root, tiny_run_dir)
    write_images(settings.resolved_watch_dir, 3, size=48)
    proc = _start(root, tiny_run_dir)
    procs.append(proc)
    wait_for(lambda: _loaded(proc.pid, "_pydantic_core") or proc.poll() is not None, 60, 0.002, "the imports")
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    (stopped,) = [e for e in _events(err) if e["event"] == "service.stopped"]
    assert stopped["during"] == "start-up" and stopped["files"] == 0
    assert "service.ready" not in {e["event"] for e in _events(err)}
    # nothing begun: no database, nothing taken from the folder
    assert not (settings.data_dir / "histod.db").exists()
    assert len(files_under(settings.resolved_watch_dir)) == 3 and not settings.processed_dir.exists()


def test_a_sigterm_while_another_command_imports_still_ends_it(tmp_path: Path) -> None:
    """Only serve and demo stop cleanly; the early catch gives every other command SIGTERM's default back and
    delivers one that arrived meanwhile (histod.stopping.release)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "histod", "results", *_flags(tmp_path)], cwd=tmp_path, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: _loaded(proc.pid, "_pydantic_core") or proc.poll() is not None, 60, 0.002, "the imports")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == -signal.SIGTERM, err.decode()[-2000:]


def test_a_sigterm_at_the_first_start_up_log_line_is_a_clean_stop(
    serve_process: tuple[Path, list[subprocess.Popen[bytes]]], tiny_run_dir: Path
) -> None:
    """The database is migrated and the model loaded by then: whatever step the SIGTERM meets is finished, the
    service stops with status 0 and the audit chain is intact."""
    root, procs = serve_process
    settings = service_settings(root, tiny_run_dir)
    proc = _start(root, tiny_run_dir)
    procs.append(proc)
    stream = proc.stderr
    assert stream is not None
    lines: list[bytes] = []

    def read() -> None:
        for line in stream:
            lines.append(line)

    reader = threading.Thread(target=read, name="stderr", daemon=True)
    reader.start()
    wait_for(lambda: any(line.startswith(b"{") for line in lines) or proc.poll() is not None, 60, 0.002, "a log line")
    assert proc.poll() is None, b"".join(lines).decode()[-2000:]
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    reader.join(10)
    err = b"".join(lines)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "service.stopped" in {e["event"] for e in _events(err)}
    verified = CliRunner().invoke(cli, ["audit", "verify", *_flags(root)])
    assert verified.exit_code == 0, verified.output
    assert settings.resolved_watch_dir.is_dir()


def _start_args(root: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "histod", "serve", *_flags(root, run_dir)]


def test_kill_9_then_restart_neither_loses_nor_reclassifies(
    serve_process: tuple[Path, list[subprocess.Popen[bytes]]], tiny_run_dir: Path
) -> None:
    root, procs = serve_process
    settings = service_settings(root, tiny_run_dir)
    write_images(settings.resolved_watch_dir, 120, size=48)
    proc = _start_and_wait_for_a_first_file(root, tiny_run_dir, procs)
    proc.kill()
    proc.wait(30)
    done = subprocess.run([*_start_args(root, tiny_run_dir), "--once"], cwd=root, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    _check_nothing_lost(root, tiny_run_dir, 120, all_done=True)


def test_serving_litert_never_imports_tensorflow(tiny_run_dir: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "data" / "prediction", 2, size=48)
    code = (
        "import sys\n"
        "from histod.cli import cli\n"
        f"cli.main({['serve', '--once', *_flags(tmp_path, tiny_run_dir)]!r}, standalone_mode=False)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
        "print('HEAVY:' + ','.join(bad[:5]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HEAVY:\n" in done.stdout, done.stdout
    assert len(rows(service_settings(tmp_path, tiny_run_dir))) == 2


def test_serve_tells_systemd_ready_watchdog_and_stopping(
    serve_process: tuple[Path, list[subprocess.Popen[bytes]]], tiny_run_dir: Path
) -> None:
    root, procs = serve_process
    address = root / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(address))
        sock.settimeout(30)
        env = {**os.environ, "NOTIFY_SOCKET": str(address), "HISTOD_STABLE_MS": "0"}
        proc = subprocess.Popen(_start_args(root, tiny_run_dir), cwd=root, env=env, stderr=subprocess.PIPE)
        procs.append(proc)
        seen: list[str] = []
        while "WATCHDOG=1" not in seen:
            seen.append(sock.recv(4096).decode())
        assert "READY=1" in seen and seen.index("READY=1") < seen.index("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in seen:
            seen.append(sock.recv(4096).decode())
    assert proc.wait(30) == 0


@pytest.mark.slow
def test_demo_trains_serves_and_reports_on_a_fresh_folder(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["demo", "--dir", str(tmp_path / "demo"), "--images", "6", "--epochs", "1"])
    assert result.exit_code == 0, result.output[-3000:]
    assert "images      6  (classified 6, failed 0" in result.stdout
    recorded = rows(service_settings(tmp_path / "demo", tmp_path / "demo" / "run"))
    assert len(recorded) == 6 and all(r.status == "classified" for r in recorded)
