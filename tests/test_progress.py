"""histod.progress: N / M on a terminal only, the estimate of the time left."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

from histod.progress import Progress, duration, eta_seconds
from histod.synthetic import write_images


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


def test_a_log_line_takes_the_progress_line_off_the_terminal_first() -> None:
    from histod import progress

    term = _Terminal()
    with Progress("files", 2, term, every_s=0.0) as bar:
        bar.advance()
        progress.clear_active()  # what the log's renderer does before each line
        term.write("a log line\n")
        bar.advance()
    text = term.getvalue()
    assert text.index("files 1 / 2") < text.index("\r\033[Ka log line\n") < text.index("files 2 / 2")
    progress.clear_active()  # no progress line any more: nothing to do


def _on_a_terminal(args: list[str], cwd: Path, **env: str) -> str:
    """Run ``args`` with stderr on a pseudo-terminal (console logs); what it wrote there. Fails on a non-zero exit."""
    primary, secondary = pty.openpty()
    environ = {**os.environ, "HISTOD_LOG_FORMAT": "console", **env}
    proc = subprocess.Popen(args, env=environ, stdout=subprocess.DEVNULL, stderr=secondary, cwd=cwd)
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal's other side closed: the process ended
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    assert proc.wait(300) == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


def test_serve_once_counts_files_on_a_terminal(tiny_run_dir: Path, tmp_path: Path) -> None:
    """A real `histod serve --once` with its stderr on a pseudo-terminal: `files N / M` between the image lines,
    taken off before each of them."""
    data = tmp_path / "data"
    write_images(data / "prediction", 12, size=48)
    env = {"HISTOD_STABLE_MS": "0", "HISTOD_BATCH_SIZE": "4"}
    args = [sys.executable, "-m", "histod", "serve", "--once", "--data-dir", str(data), "--model", str(tiny_run_dir)]
    text = _on_a_terminal(args, tmp_path, **env)
    assert "files 12 / 12" in text
    stored = [line for line in text.split("\n") if "image.stored" in line]
    assert len(stored) == 12
    assert all("files " not in line.split("\r\033[K")[-1] for line in stored)  # each line starts clean


def test_serve_once_draws_nothing_off_a_terminal(tiny_run_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_images(data / "prediction", 3, size=48)
    env = {**os.environ, "HISTOD_STABLE_MS": "0", "HISTOD_LOG_FORMAT": "console"}
    args = [sys.executable, "-m", "histod", "serve", "--once", "--data-dir", str(data), "--model", str(tiny_run_dir)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr and " / 3" not in done.stderr


def test_train_shows_its_epochs_on_a_terminal(synthetic_dataset: Path, tmp_path: Path) -> None:
    """A real `histod train` with its stderr on a pseudo-terminal: `epochs N / M` after each epoch's log line."""
    tiny = [
        "--weights",
        "none",
        "--alpha",
        "0.35",
        "--image-size",
        "48",
        "--batch-size",
        "16",
        "--ema",
        "0",
        "--seed",
        "3",
    ]
    args = [sys.executable, "-m", "histod", "train", str(synthetic_dataset), "--out", str(tmp_path / "run"), *tiny]
    text = _on_a_terminal([*args, "--head-epochs", "1", "--epochs", "1"], tmp_path)
    assert "epochs 1 / 2" in text and "epochs 2 / 2" in text
    lines = [line for line in text.split("\n") if "train.epoch" in line]
    assert len(lines) == 2 and all("epochs " not in line.split("\r\033[K")[-1] for line in lines)
