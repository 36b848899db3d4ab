"""Every line on a JSON log stream is JSON, and under journald every line carries its priority.

journald reads a service's stderr (``StandardError=journal``) and, with ``SyslogLevelPrefix=`` (on by default),
takes a leading ``<N>`` as the entry's PRIORITY and strips it (sd-daemon(3)); systemd tells the process which
stream is the journal connection by ``$JOURNAL_STREAM`` (device:inode). These tests run real processes with
stderr on a file and ``$JOURNAL_STREAM`` naming that file, and read the file as journald would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from histod.stderr_json import Lines, guess_level, json_level
from histod.synthetic import write_images

PREFIX = re.compile(r"^<([0-7])>(.*)$")


def journal(text: str) -> list[tuple[int, dict[str, object]]]:
    """The lines as journald stores them: (PRIORITY, the message parsed as JSON). A line without a prefix would
    be stored at the unit's default priority (info) and fails here; so does one that is not JSON."""
    entries = []
    for line in text.splitlines():
        match = PREFIX.match(line)
        assert match, f"no priority prefix: {line!r}"
        entries.append((int(match.group(1)), json.loads(match.group(2))))
    return entries


def run_on_journal(tmp_path: Path, args: list[str], **env: str) -> tuple[int, list[tuple[int, dict[str, object]]]]:
    """Run ``args`` with stderr on a pipe that ``$JOURNAL_STREAM`` names, as systemd connects a service to
    journald's stream socket; read it to the end (every writer gone: the process and its relay)."""
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    environment = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "HISTOD_LOG_FORMAT": "json", **env}
    proc = subprocess.Popen(args, stderr=write_end, stdout=subprocess.DEVNULL, env=environment, cwd=tmp_path)
    os.close(write_end)
    with os.fdopen(read_end, encoding="utf-8") as stream:
        text = stream.read()
    return proc.wait(60), journal(text)


DRIVER = textwrap.dedent(
    """
    import logging, os, signal, sys, warnings
    from histod.logs import capture_stderr, configure, get_logger, problem
    from histod import stopping

    stopping.catch_early()
    stream = capture_stderr()
    assert stream is not None
    configure("debug", "json", stream=stream)
    log = get_logger("driver")
    log.debug("kind.debug")
    log.info("image", status="classified")
    log.warning("image", status="failed", reason="truncated")
    log.error("image.move_failed", error="No space left on device")
    logging.getLogger("watchdog").warning("kind.stdlib")
    warnings.warn("kind.python_warning", UserWarning)
    # what C++ libraries write on descriptor 2
    os.write(2, b"I0000 00:00:1.0 123 port.cc:153] kind.absl_info\\n")
    os.write(2, b"W0000 00:00:1.0 123 x.cc:1] kind.absl_warning\\n")
    os.write(2, b"E0000 00:00:1.0 123 cuda.cc:52] kind.absl_error\\n")
    os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n")
    print("kind.print", file=sys.stderr)
    problem("kind.cli_error", exit_code=5)
    with stopping.stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        stop.wait(10)
    raise RuntimeError("kind.uncaught")
    """
)


def _find(entries: list[tuple[int, dict[str, object]]], text: str) -> list[int]:
    return [p for p, e in entries if text in json.dumps(e)]


def test_each_kind_of_line_gets_its_priority(tmp_path: Path) -> None:
    code, entries = run_on_journal(tmp_path, [sys.executable, "-c", DRIVER])
    assert code == 1
    # structlog events by their level
    assert _find(entries, "kind.debug") == [7]
    by_status = {e.get("status"): p for p, e in entries if e.get("event") == "image"}
    assert by_status == {"classified": 6, "failed": 4}
    assert _find(entries, "No space left") == [3]
    # the standard library's loggers and Python warnings
    assert _find(entries, "kind.stdlib") == [4]
    assert _find(entries, "kind.python_warning") == [4]
    # native output on descriptor 2, wrapped, at the level its prefix announces
    assert _find(entries, "kind.absl_info") == [6]
    assert _find(entries, "kind.absl_warning") == [4]
    assert _find(entries, "kind.absl_error") == [3]
    (xnnpack,) = [e for _, e in entries if "XNNPACK" in json.dumps(e)]
    assert xnnpack["event"] == "stderr" and xnnpack["source"] == "native" and xnnpack["level"] == "info"
    # Python-level text on sys.stderr, the CLI's error line and the signal notice
    assert _find(entries, "kind.print") == [4]
    (cli_error,) = [(p, e) for p, e in entries if e.get("message") == "kind.cli_error"]
    assert cli_error[0] == 3 and cli_error[1]["exit_code"] == 5
    (notice,) = [(p, e) for p, e in entries if e.get("event") == "signal"]
    assert notice[0] == 6 and notice[1]["signal"] == "SIGTERM" and "finishing the batch" in str(notice[1]["message"])
    # an uncaught exception: its traceback lines are errors, none of them lost at exit
    traceback = [p for p, e in entries if e.get("source") == "python" and e.get("text") != "kind.print"]
    assert len(traceback) >= 3 and set(traceback) == {3}
    assert _find(entries, "RuntimeError: kind.uncaught") == [3]


def test_cli_error_and_a_served_batch_on_the_journal(tiny_run_dir: Path, tmp_path: Path) -> None:
    """The real command: `histod serve --once` (LiteRT's XNNPACK line included) and an error exit."""
    data = tmp_path / "data"
    write_images(data / "prediction", 2, size=48)
    (data / "prediction" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    args = [sys.executable, "-m", "histod", "serve", "--once", "--data-dir", str(data), "--model", str(tiny_run_dir)]
    code, entries = run_on_journal(tmp_path, args, HISTOD_STABLE_MS="0")
    assert code == 0
    events = {e["event"] for _, e in entries}
    assert {"service.started", "service.stopped", "image.stored"} <= events
    stored = {e["status"]: (p, e["level"]) for p, e in entries if e["event"] == "image.stored"}
    assert stored == {"classified": (6, "info"), "failed": (4, "warning")}  # `journalctl -p warning` lists failures
    assert _find(entries, "XNNPACK") == [6]
    assert all(p == {"info": 6, "warning": 4, "error": 3}[str(e["level"])] for p, e in entries)

    args = [sys.executable, "-m", "histod", "results", "--data-dir", str(tmp_path / "none")]
    code, entries = run_on_journal(tmp_path, args)
    assert code == 5
    ((priority, event),) = entries
    assert priority == 3 and event["event"] == "error" and "no results database" in str(event["message"])


def test_without_the_journal_lines_are_plain_json(tmp_path: Path) -> None:
    """Not the journal (a file, a pipe, a log shipper): no prefixes, and still JSON only."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    done = subprocess.run([sys.executable, "-c", DRIVER], stderr=subprocess.PIPE, env=env, check=False, text=True)
    lines = done.stderr.splitlines()
    assert len(lines) > 15 and all(isinstance(json.loads(line), dict) for line in lines)


def test_a_journal_stream_of_another_file_is_not_the_journal(tmp_path: Path) -> None:
    other = tmp_path.stat()
    env = {**os.environ, "JOURNAL_STREAM": f"{other.st_dev}:{other.st_ino}"}
    done = subprocess.run([sys.executable, "-c", DRIVER], stderr=subprocess.PIPE, env=env, check=False, text=True)
    lines = done.stderr.splitlines()
    assert lines and not any(PREFIX.match(line) for line in lines)


def test_lines_guess_levels_and_pass_json_through() -> None:
    assert guess_level("W0000 00:00:1 1 a.cc:1] x") == "warning"
    assert guess_level("F0000 00:00:1 1 a.cc:1] x") == "critical"
    assert guess_level("ERROR: bad") == "error" and guess_level("Traceback (most recent call last):") == "error"
    assert guess_level("just text") is None
    assert json_level('{"event": "x", "level": "debug"}') == "debug" and json_level("{not json}") is None
    lines = Lines("native", journal=True)
    assert lines.convert('{"event": "x", "level": "error"}\n') == '<3>{"event": "x", "level": "error"}'
    assert lines.convert("   \n") is None
    first = lines.convert("E0000 00:00:1 1 a.cc:1] broke")
    follow = lines.convert("  and the rest of that message")
    assert first is not None and first.startswith("<3>") and follow is not None and follow.startswith("<3>")
    assert json.loads(follow[3:])["text"] == "  and the rest of that message"
