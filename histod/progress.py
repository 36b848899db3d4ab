"""Progress of long CLI work: ``N / M`` on one terminal line (only when stderr is a terminal: piped output and
logs never see it), and the rate and an estimate of the time left. The summary line at the end is the
command's own (it goes out on a terminal or not)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_active: Progress | None = None
"""the progress line on the terminal now, if any: a log line written there takes it off first"""


def clear_active() -> None:
    """Take the progress line off the terminal before other output is written there (the log's renderer calls
    this; the next :meth:`Progress.advance` draws the line again)."""
    if _active is not None:
        _active.clear()


def eta_seconds(done: int, total: int, elapsed_s: float) -> float | None:
    """The time left at the pace so far, or None before anything is done."""
    if done <= 0 or total <= done:
        return None if done <= 0 else 0.0
    return elapsed_s / done * (total - done)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """``what N / M (rate/s, ETA ...)`` rewritten in place on ``stream`` when it is a terminal; silent when it is
    not. Use as a context manager, or call :meth:`close` to end the line."""

    def __init__(
        self, what: str, total: int, stream: TextIO | None = None, *, every_s: float = 0.2, show: bool = True
    ) -> None:
        self.what, self.total, self.done = what, total, 0
        self.stream = sys.stderr if stream is None else stream
        self.shown = show and self.stream.isatty()
        self.started = time.monotonic()
        self._every, self._last, self._drawn = every_s, 0.0, False

    def __enter__(self) -> Progress:
        global _active
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        _active = None
        self.close()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        text = f"{self.what} {self.done} / {self.total}"
        if self.done and elapsed > 0:
            text += f" ({self.done / elapsed:.1f}/s"
            left = eta_seconds(self.done, self.total, elapsed)
            text += f", ETA {duration(left)})" if left else ")"
        return text

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.shown:
            return
        now = time.monotonic()
        if now - self._last >= self._every or self.done >= self.total:
            self._last = now
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
            self._drawn = True

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def clear(self) -> None:
        """Take the line off the terminal (before other output; the next :meth:`advance` draws it again)."""
        self.close()
        self._last = 0.0

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False
