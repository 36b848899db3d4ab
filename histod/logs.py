"""structlog set-up. Only the CLI calls :func:`configure`, once, at start-up; modules call :func:`get_logger`.

Off a terminal every event is one JSON line (journald, files, log shippers); on a terminal it is a
coloured console line. Services log one canonical line per unit of work (one per image).

Values come from outside (file names are whatever the uploader chose), so text bound for a terminal goes
through :func:`printable`: a name holding ``\x1b[2K\r`` or backspaces must not repaint the line it is on. JSON
lines escape control characters already (``\u001b``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


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


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_json:
        processors += [structlog.processors.dict_tracebacks]
    else:
        processors.append(_console_safe)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=out),  # line and newline in one write
        cache_logger_on_first_use=False,
    )
    # Quieten libraries that log through the standard library (TensorFlow's absl, watchdog, alembic).
    logging.basicConfig(level=logging.WARNING, stream=out, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)


def get_logger(name: str | None = None, **initial: Any) -> Any:
    return structlog.get_logger(name, **initial)
