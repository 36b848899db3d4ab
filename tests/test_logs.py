"""Logging: JSON lines off a terminal, console rendering on one."""

from __future__ import annotations

import io
import json

import structlog

from histod.logs import configure, get_logger


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_off_a_terminal() -> None:
    out = io.StringIO()
    configure("info", "auto", stream=out)
    get_logger("t").info("image.classified", path="a.png", p_malignant=0.9)
    get_logger("t").debug("hidden")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "image.classified"
    assert event["p_malignant"] == 0.9
    assert event["level"] == "info"
    assert "timestamp" in event
    structlog.reset_defaults()


def test_console_on_a_terminal() -> None:
    out = _Tty()
    configure("debug", "auto", stream=out)
    get_logger().debug("hello", n=1)
    text = out.getvalue()
    assert "hello" in text
    assert not text.lstrip().startswith("{")
    structlog.reset_defaults()
