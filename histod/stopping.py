"""SIGTERM from the first line of the process: a stop request, not a kill, for the commands that stop cleanly.

systemd (or an operator) may stop `histod serve` at any moment of its start-up: while Python imports the
packages, while the database migrates, while the model loads. The entry point (``histod.__main__.main``) calls
:func:`catch_early` before anything heavy is imported, so a SIGTERM from then on is remembered instead of ending
the process by the default action (status -15). The commands in :data:`CLEAN_STOP_COMMANDS` take the remembered
request over (:func:`take_early`) when they install their own handlers (histod.commands_service) and stop
cleanly, exit 0; every other command gets SIGTERM's previous action back (:func:`release`, from the CLI group)
and, when one arrived meanwhile, receives it again, so it ends as it always did.

Only the standard library here: this module is imported before everything else.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

CLEAN_STOP_COMMANDS = frozenset({"serve", "demo"})
"""the commands whose own SIGTERM handler takes over a request caught early (histod.commands_service)"""


class _Early:
    """The handler in force from :func:`catch_early` until a command takes over or :func:`release` runs."""

    def __init__(self) -> None:
        self.installed = False
        self.caught = False
        self.previous: Any = signal.SIG_DFL

    def remember(self, _signum: int, _frame: FrameType | None) -> None:
        self.caught = True


_EARLY = _Early()


def catch_early() -> None:
    """From now on a SIGTERM is remembered, not acted on (call once, first thing in the process)."""
    if _EARLY.installed:
        return
    previous = signal.signal(signal.SIGTERM, _EARLY.remember)
    _EARLY.previous = signal.SIG_DFL if previous is None else previous
    _EARLY.installed = True


def take_early() -> bool:
    """Whether a SIGTERM arrived before the caller's own handler was installed; it is taken (cleared) here."""
    caught, _EARLY.caught = _EARLY.caught, False
    return caught


def release() -> None:
    """Give SIGTERM its previous action back (a command that does not stop cleanly); one that arrived since
    :func:`catch_early` is raised again now. Nothing happens when :func:`catch_early` was not called (tests that
    run the CLI in-process)."""
    if not _EARLY.installed:
        return
    _EARLY.installed = False
    signal.signal(signal.SIGTERM, _EARLY.previous)
    if take_early():
        signal.raise_signal(signal.SIGTERM)
