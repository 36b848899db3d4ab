"""Every line on a JSON log stream is JSON, and under journald every line carries its priority.

Only the standard library here: this file also runs on its own, as the relay process (``python -I
stderr_json.py [--journal]``) that histod.logs starts in JSON mode. The process's file descriptor 2 then is a
pipe to the relay, so what native libraries write there (TensorFlow's and absl's C++ messages, LiteRT's
"Created TensorFlow Lite XNNPACK delegate for CPU.", a fatal error just before an abort) reaches the log as
JSON events. The relay is a process of its own, not a thread, so that it still forwards what a crashing
process wrote last: it reads until every writer has closed the pipe, and exits.

:class:`Lines` turns one line into what goes on the stream: a JSON line as it is, anything else as a
``{"event": "stderr", "text": ...}`` event with a level guessed from its prefix (absl's ``I``/``W``/``E``/``F``,
``INFO:``, ``WARNING:``, ``ERROR:``, ``Traceback``; a line without one continues the level of the line just
before it, else it is a warning). With ``journal``, each line starts with ``<N>``, the syslog priority of its
level, which journald (``SyslogLevelPrefix=``, on by default) takes as the entry's ``PRIORITY`` and strips.
"""

from __future__ import annotations

import io
import json
import re
import signal
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

PRIORITIES = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "error": 3, "critical": 2}
"""syslog priorities of the log levels (sd-daemon(3)): what ``journalctl -p`` filters on"""

CONTINUATION_S = 0.2
"""a line without a level of its own, this soon after one with a level, continues it (a wrapped message)"""

_ABSL = re.compile(r"^([IWEF])\d{4} ")
_WORD = re.compile(r"^\W*(debug|info|notice|warn|warning|error|err|fatal|critical|traceback)\b", re.IGNORECASE)
_WORDS = {
    "debug": "debug",
    "info": "info",
    "notice": "notice",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "err": "error",
    "fatal": "critical",
    "critical": "critical",
    "traceback": "error",
}
_ABSL_LEVELS = {"I": "info", "W": "warning", "E": "error", "F": "critical"}


def priority(level: str) -> int:
    """The syslog priority of a log level (``exception`` is an error); an unknown level is a notice."""
    return PRIORITIES.get("error" if level == "exception" else level, 5)


def prefix(level: str, journal: bool) -> str:
    return f"<{priority(level)}>" if journal else ""


def guess_level(line: str) -> str | None:
    """The level a line of text announces, if any."""
    absl = _ABSL.match(line)
    if absl:
        return _ABSL_LEVELS[absl.group(1)]
    word = _WORD.match(line)
    return _WORDS[word.group(1).lower()] if word else None


def json_level(line: str) -> str | None:
    """The ``level`` of a line that is one JSON object, else None (not JSON)."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    return str(event.get("level", "info")) if isinstance(event, dict) else None


def event_line(event: str, level: str, **fields: Any) -> str:
    """One JSON event, shaped like histod's structlog lines."""
    data = {"event": event, **fields, "level": level, "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    return json.dumps(data, ensure_ascii=False, default=str)


class Lines:
    """Lines in, stream lines out (see the module's docstring). ``source`` names where the text came from:
    ``native`` (file descriptor 2) or ``python`` (``sys.stderr``)."""

    def __init__(self, source: str, *, journal: bool) -> None:
        self.source = source
        self.journal = journal
        self._last: tuple[str, float] | None = None

    def convert(self, line: str) -> str | None:
        """The stream line for ``line`` (without its newline); None for a blank line."""
        text = line.rstrip("\r\n")
        if not text.strip():
            return None
        level = json_level(text)
        if level is not None:
            return prefix(level, self.journal) + text.strip()
        now = time.monotonic()
        guessed = guess_level(text)
        if guessed is None and self._last is not None and now - self._last[1] <= CONTINUATION_S:
            guessed = self._last[0]
        chosen = guessed or "warning"
        self._last = (chosen, now)
        return prefix(chosen, self.journal) + event_line("stderr", chosen, source=self.source, text=text)


class JsonStream(io.TextIOBase):
    """A text stream for ``sys.stderr`` in JSON mode: whole lines go to ``target`` through :class:`Lines`, so a
    traceback, a usage error or a library's print() arrives as JSON events too."""

    def __init__(self, target: TextIO, *, journal: bool) -> None:
        super().__init__()
        self.target = target
        self.lines = Lines("python", journal=journal)
        self._pending = ""

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.target.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.target.errors

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.target.fileno()  # faulthandler writes a crash dump straight to the real stream

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            *complete, self._pending = self._pending.split("\n")
            out = [c for c in (self.lines.convert(line) for line in complete) if c is not None]
            if out:
                self.target.write("\n".join(out) + "\n")  # one write: lines stay whole between threads
                self.target.flush()
        return len(text)

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, ""
            converted = self.lines.convert(pending)
            if converted is not None:
                self.target.write(converted + "\n")
        self.target.flush()


def relay(source: TextIO, target: TextIO, *, journal: bool) -> None:
    """Copy ``source`` to ``target`` line by line through :class:`Lines`, until end of file."""
    lines = Lines("native", journal=journal)
    for raw in source:
        out = lines.convert(raw)
        if out is not None:
            try:
                target.write(out + "\n")
                target.flush()
            except BrokenPipeError:
                return


def main(argv: list[str]) -> None:
    # The service's stop signals are for the service: the relay ends when the last writer closes the pipe.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    source = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="backslashreplace")
    target = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", errors="backslashreplace", line_buffering=True)
    relay(source, target, journal="--journal" in argv)


if __name__ == "__main__":
    main(sys.argv[1:])
