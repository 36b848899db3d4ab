"""histod.progress: N / M on a terminal only, the estimate of the time left."""

from __future__ import annotations

import io

from histod.progress import Progress, duration, eta_seconds


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_and_clears_its_line() -> None:
    term = _Terminal()
    with Progress("classified", 3, term, every_s=0.0) as bar:
        bar.advance()
        bar.advance(2)
    text = term.getvalue()
    assert "classified 1 / 3" in text and "classified 3 / 3" in text
    assert text.endswith("\r\033[K")  # the line is gone: the summary line is the command's


def test_progress_is_silent_when_not_a_terminal() -> None:
    piped = io.StringIO()
    with Progress("classified", 3, piped, every_s=0.0) as bar:
        bar.advance(3)
    assert piped.getvalue() == "" and bar.done == 3


def test_eta_and_duration() -> None:
    assert eta_seconds(0, 10, 5.0) is None
    assert eta_seconds(2, 10, 5.0) == 20.0
    assert eta_seconds(10, 10, 5.0) == 0.0
    assert [duration(s) for s in (4.4, 65, 3720)] == ["4s", "1m05s", "1h02m"]
