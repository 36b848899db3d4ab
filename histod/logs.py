"""structlog set-up. Only the CLI calls :func:`configure`, once, at start-up; modules call :func:`get_logger`.

Off a terminal every event is one JSON line (journald, files, log shippers); on a terminal it is a
coloured console line. Services log one canonical line per unit of work (one per image).

In JSON mode every line on the stream is JSON: the standard library's loggers (alembic, watchdog, absl) and
Python warnings are rendered by the same renderer, the CLI's error lines and the signal notices are events
(:func:`problem`, histod.stopping), and in a real process :func:`capture_stderr` wraps whatever else reaches
``sys.stderr`` or file descriptor 2 (tracebacks, TensorFlow's and LiteRT's C++ messages) into events
(histod.stderr_json).

Under journald each line starts with ``<N>``, the syslog priority of its level (debug 7, info 6, warning 4,
error 3, critical 2), which journald takes as the entry's ``PRIORITY`` and strips (``SyslogLevelPrefix=``, on
by default): ``journalctl -p warning -u histod`` finds failed images and errors. Whether the stream is the
journal is read from ``$JOURNAL_STREAM``, set by systemd to the device and inode of the journal connection
(systemd.exec(5)); like ``$NOTIFY_SOCKET`` (histod.daemon.notify) it is the service manager's protocol
variable, not a histod setting, so it is read here and not by histod.settings.

Values come from outside (file names are whatever the uploader chose), so text bound for a terminal goes
through :func:`printable`: a name holding ``\x1b[2K\r`` or backspaces must not repaint the line it is on. JSON
lines escape control characters already (``\u001b``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Literal, TextIO

import structlog

from histod import progress, stderr_json, stopping

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
JOURNAL_STREAM = "JOURNAL_STREAM"


class _Mode:
    json = False
    journal = False
    handler: logging.Handler | None = None


_MODE = _Mode()


def printable(text: str) -> str:
    """``text`` safe to show on a terminal: every character a terminal could act on or that does not show
    (controls such as ESC, CR, backspace, bidirectional overrides, line separators) written as a Python
    string literal writes it (``\x1b``, ``\r``, ``\u202e``), with its backslashes doubled so that the escapes
    are unambiguous. Text with none of these characters is returned unchanged."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in text)


class _Shown:
    """A value shown on the console by its :func:`printable` form: quoted where the renderer quotes strings."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = printable(text)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"'{self.text}'"


def _console_safe(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """Before the console renderer, which writes short strings as they are: escape what a terminal would act on."""
    for key, value in event.items():
        if isinstance(value, str) and not value.isprintable():
            event[key] = _Shown(value)
    return event


class _Render:
    """The last processor: JSON or console text, with the journald priority prefix when the stream is the
    journal."""

    def __init__(self, use_json: bool, journal: bool) -> None:
        self.inner: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
        self.journal = journal

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        level = str(event.get("level", "info"))
        progress.clear_active()  # a progress line on the terminal goes before the log line is written
        return stderr_json.prefix(level, self.journal) + str(self.inner(logger, name, event))


def on_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is systemd's journal connection (``$JOURNAL_STREAM`` names its device and inode)."""
    named = os.environ.get(JOURNAL_STREAM, "")
    try:
        device, inode = (int(part) for part in named.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def json_mode(fmt: str, stream: TextIO | None = None) -> bool:
    """Whether ``fmt`` means JSON lines on ``stream`` (default ``sys.stderr``): ``json``, or ``auto`` off a
    terminal."""
    out = stream if stream is not None else sys.stderr
    return fmt == "json" or (fmt == "auto" and not out.isatty())


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    out = stream if stream is not None else sys.stderr
    use_json = json_mode(fmt, out)
    journal = on_journal(out)
    _MODE.json, _MODE.journal = use_json, journal
    render = _Render(use_json, journal)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_json:
        processors += [structlog.processors.dict_tracebacks]
    else:
        processors.append(_console_safe)
    processors.append(render)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=out),  # line and newline in one write
        cache_logger_on_first_use=False,
    )
    _configure_stdlib(out, render, use_json)
    stopping.notices_to(_fileno(out), json_lines=use_json, journal=journal)


def _configure_stdlib(out: TextIO, render: _Render, use_json: bool) -> None:
    """Libraries that log through the standard library (TensorFlow's absl, watchdog, alembic): warnings and
    above, rendered like histod's own events; Python warnings too (``py.warnings``)."""
    pre_chain: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, render],
            foreign_pre_chain=pre_chain,
        )
    )
    root = logging.getLogger()
    if _MODE.handler is not None:
        root.removeHandler(_MODE.handler)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    _MODE.handler = handler
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.captureWarnings(use_json)


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def capture_stderr() -> TextIO | None:
    """In a real process whose ``sys.stderr`` is file descriptor 2: keep the stream for the log (returned), and
    send what anything else writes to descriptor 2 or to ``sys.stderr`` through histod.stderr_json, so that
    it arrives as JSON events. Returns None (nothing changed) where ``sys.stderr`` is not descriptor 2 (tests
    that run the CLI in-process) or the relay cannot be started."""
    if _fileno(sys.stderr) != 2:
        return None
    journal = on_journal(sys.stderr)
    sys.stderr.flush()
    kept = os.dup(2)
    read_end, write_end = os.pipe()
    try:
        subprocess.Popen(
            [sys.executable, "-I", str(Path(stderr_json.__file__)), *(["--journal"] if journal else [])],
            stdin=read_end,
            stdout=kept,
            stderr=kept,
            close_fds=True,
        )
    except OSError:
        for fd in (kept, read_end, write_end):
            os.close(fd)
        return None
    os.dup2(write_end, 2)
    os.close(write_end)
    os.close(read_end)
    # the log's own stream: still the journal connection where it was one (on_journal sees the same inode)
    stream = os.fdopen(kept, "w", encoding="utf-8", errors="backslashreplace", buffering=1)
    sys.stderr = stderr_json.JsonStream(stream, journal=journal)
    return stream


def reset() -> None:
    """Before the CLI has configured logging (a settings error comes first): text lines."""
    _MODE.json = _MODE.journal = False


def is_json() -> bool:
    """Whether the log stream is JSON lines (as configured)."""
    return _MODE.json


def problem(message: str, *, event: str = "error", level: str = "error", **fields: Any) -> None:
    """A problem the CLI reports to its user: ``error: <message>`` in red on a terminal, a JSON event at
    ``level`` in JSON mode (the stream stays JSON)."""
    if _MODE.json:
        getattr(structlog.get_logger("histod.cli"), level)(event, message=message, **fields)
        return
    import click

    journal = _MODE.journal or on_journal(sys.stderr)
    line = f"{stderr_json.prefix(level, journal)}{level}: {printable(message)}"
    click.secho(line, err=True, fg="red" if level == "error" else "yellow")


def say(message: str, *, event: str, **fields: Any) -> None:
    """A line the CLI tells its user beside its output (a summary at the end of long work): the plain line on
    stderr, or an info event with ``message`` and ``fields`` in JSON mode (the stream stays JSON)."""
    if _MODE.json:
        structlog.get_logger("histod.cli").info(event, message=message, **fields)
        return
    import click

    journal = _MODE.journal or on_journal(sys.stderr)
    click.echo(f"{stderr_json.prefix('info', journal)}{printable(message)}", err=True)


def get_logger(name: str | None = None, **initial: Any) -> Any:
    return structlog.get_logger(name, **initial)
