"""How histod stops on a signal: SIGTERM and SIGHUP are stop requests, not kills, for the commands that stop
cleanly (serve, demo), from the first line of the process on.

systemd (or an operator) may stop `histod serve` at any moment of its start-up: while Python imports the
packages, while the database migrates, while the model loads. The entry point (``histod.__main__.main``) calls
:func:`catch_early` before anything heavy is imported, so a SIGTERM or SIGHUP from then on is remembered instead
of ending the process by the default action. The commands in :data:`CLEAN_STOP_COMMANDS` install
:func:`stop_on_signals`, which takes a remembered request over and stops cleanly, exit 0; every other command
gets the signals' previous actions back (:func:`release`, from the CLI group) and, when one arrived meanwhile,
receives it again, so it ends as it always did.

Once a clean stop is under way, a repeated SIGTERM or SIGHUP changes nothing: ``timeout``, a supervisor that
signals the whole process group, or an impatient operator may send several, and the stop must still end with
status 0. A second SIGINT (Ctrl-C again) is the way to force it: it aborts at once.

Only the standard library here: this module is imported before everything else.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from types import FrameType
from typing import Any

CLEAN_STOP_COMMANDS = frozenset({"serve", "demo"})
"""the commands that stop cleanly on a signal (histod.commands_service installs :func:`stop_on_signals`)"""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""a clean stop, however often they come (SIGHUP: the terminal or the session went away)"""


class _Early:
    """The handler in force from :func:`catch_early` until a command takes over or :func:`release` runs."""

    def __init__(self) -> None:
        self.installed = False
        self.caught: signal.Signals | None = None
        self.previous: dict[signal.Signals, Any] = {}

    def remember(self, signum: int, _frame: FrameType | None) -> None:
        self.caught = self.caught or signal.Signals(signum)


_EARLY = _Early()


def catch_early() -> None:
    """From now on a SIGTERM or SIGHUP is remembered, not acted on (call once, first thing in the process)."""
    if _EARLY.installed:
        return
    for sig in STOP_SIGNALS:
        previous = signal.signal(sig, _EARLY.remember)
        _EARLY.previous[sig] = signal.SIG_DFL if previous is None else previous
    _EARLY.installed = True


def take_early() -> signal.Signals | None:
    """The stop signal that arrived before the caller's own handler was installed, if any; taken (cleared)."""
    caught, _EARLY.caught = _EARLY.caught, None
    return caught


def release() -> None:
    """Give SIGTERM and SIGHUP their previous actions back (a command that does not stop cleanly); one that
    arrived since :func:`catch_early` is raised again now. Nothing happens when :func:`catch_early` was not called
    (tests that run the CLI in-process)."""
    if not _EARLY.installed:
        return
    _EARLY.installed = False
    for sig, previous in _EARLY.previous.items():
        signal.signal(sig, previous)
    caught = take_early()
    if caught is not None:
        signal.raise_signal(caught)


class _Notices:
    """Where and how the notices go (histod.logs.configure sets it): the log stream's file descriptor, JSON or
    text, with the journald priority prefix or not."""

    fd: int | None = None
    json_lines = False
    journal = False


_NOTICES = _Notices()


def notices_to(fd: int | None, *, json_lines: bool, journal: bool) -> None:
    """Send the signal notices to file descriptor ``fd`` (None: ``sys.stderr``), as JSON events or text."""
    _NOTICES.fd, _NOTICES.json_lines, _NOTICES.journal = fd, json_lines, journal


def notice_line(message: str, signal_name: str) -> str:
    """The notice as it goes on the stream: ``histod: <message>``, or a JSON event in JSON mode."""
    if not _NOTICES.json_lines:
        line = f"histod: {message}"
    else:
        event = {
            "event": "signal",
            "signal": signal_name,
            "message": message,
            "level": "info",
            "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        line = json.dumps(event)
    return ("<6>" if _NOTICES.journal else "") + line + "\n"


def _say(message: str, signal_name: str) -> None:
    # Straight to the descriptor in one write: a signal handler must not take the log's lock (the thread it
    # interrupted may hold it), and line and newline together never land inside another thread's line.
    line = notice_line(message, signal_name)
    if _NOTICES.fd is not None:
        try:
            os.write(_NOTICES.fd, line.encode("utf-8", "backslashreplace"))
            return
        except OSError:
            pass
    sys.stderr.write(line)
    sys.stderr.flush()


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM, SIGHUP and SIGINT set the event (stop taking files, finish the batch in flight). Repeated
    SIGTERMs and SIGHUPs are noted and change nothing; a second SIGINT aborts (KeyboardInterrupt). A stop signal
    caught since the process started sets the event at once: the service stops during its start-up, after the
    step in progress. The previous handlers are back when the block ends."""
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not stop.is_set():
            abort = "Ctrl-C again" if signum == signal.SIGINT else "Ctrl-C"
            _say(f"{name}, finishing the batch in flight ({abort} aborts)", name)
            stop.set()
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            _say(f"{name} again, still stopping cleanly", name)

    previous = {sig: signal.signal(sig, handler) for sig in (*STOP_SIGNALS, signal.SIGINT)}
    caught = take_early()
    if caught is not None:
        _say(f"{caught.name} during start-up, stopping", caught.name)
        stop.set()
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
