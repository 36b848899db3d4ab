"""The watcher on a real folder with a real observer (inotify, and watchdog's polling observer).

No bare sleeps: every wait is on a condition with a deadline. A check that something does NOT happen waits a
bounded time for it (several stability windows) and asserts it did not come.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from histod.daemon.filters import ImageFilter
from histod.daemon.watch import Watcher
from histod.errors import WatchError
from histod.settings import load_settings

pytestmark = pytest.mark.timeout(30)

STABLE_MS = 100
QUIET_S = 0.5  # five stability windows: long enough to be sure nothing more comes
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="close-write needs inotify (Linux)")


class Running:
    """A watcher running in a thread; records every batch with each file's size when it was yielded."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.stop = threading.Event()
        self.batches: list[list[Path]] = []
        self.sizes: dict[Path, list[int]] = {}
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for batch in self.watcher.watch(self.stop):
                with self._cond:
                    self.batches.append(batch)
                    for path in batch:
                        size = path.lstat().st_size if os.path.lexists(path) else -1
                        self.sizes.setdefault(path, []).append(size)
                    self._cond.notify_all()
        except BaseException as exc:
            self.error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

    def __enter__(self) -> Running:
        self._thread.start()
        assert self.wait_for(lambda: self.watcher.observer is not None or self.error is not None), "never started"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "the watch loop did not stop"

    @property
    def yielded(self) -> list[Path]:
        with self._cond:
            return [p for batch in self.batches for p in batch]

    def count(self, path: Path) -> int:
        return self.yielded.count(path)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.error is not None and not self._thread.is_alive()):
                    return predicate()
                self._cond.wait(timeout=min(remaining, 0.05))
        return True

    def stays(self, predicate: Callable[[], bool], duration: float = QUIET_S) -> bool:
        """True when ``predicate`` holds during the whole of ``duration``."""
        return not self.wait_for(lambda: not predicate(), timeout=duration)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "prediction"
    path.mkdir()
    return path


def make_watcher(folder: Path, **kwargs: object) -> Watcher:
    options: dict[str, object] = {
        "polling": False,
        "poll_interval_ms": 50,
        "stable_ms": STABLE_MS,
        "debounce_ms": 20,
        "reconcile_interval_s": 3600.0,
    }
    options.update(kwargs)
    return Watcher(folder, ImageFilter([".png", ".jpg"]), **options)  # type: ignore[arg-type]


@pytest.fixture(params=["inotify", "polling"] if sys.platform.startswith("linux") else ["polling"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def running(folder: Path, mode: str) -> Iterator[Running]:
    with Running(make_watcher(folder, polling=mode == "polling")) as run:
        assert run.watcher.mode == mode
        yield run


def test_file_present_before_start_is_yielded(folder: Path, mode: str) -> None:
    old = folder / "old.png"
    old.write_bytes(b"before")
    with Running(make_watcher(folder, polling=mode == "polling")) as run:
        assert run.wait_for(lambda: old in run.yielded)
        assert run.stays(lambda: run.count(old) == 1)


def test_new_file_is_yielded_once(running: Running, folder: Path) -> None:
    new = folder / "new.png"
    new.write_bytes(b"x" * 1000)
    assert running.wait_for(lambda: new in running.yielded)
    assert running.stays(lambda: running.count(new) == 1)
    assert running.sizes[new] == [1000]


@linux_only
def test_slow_write_is_yielded_once_after_close(folder: Path) -> None:
    """Pauses between chunks are longer than stable_ms: only close-after-write may complete the file."""
    path = folder / "slow.png"
    with Running(make_watcher(folder)) as run, path.open("wb") as fh:
        for _ in range(3):
            fh.write(b"a" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
            assert run.stays(lambda: path not in run.yielded, duration=3 * STABLE_MS / 1000)
        fh.write(b"end")
        fh.close()
        assert run.wait_for(lambda: path in run.yielded)
        assert run.stays(lambda: run.count(path) == 1)
        assert run.sizes[path] == [3 * 4096 + 3]


@linux_only
def test_hard_link_without_close_write_is_yielded(folder: Path, tmp_path: Path) -> None:
    """A hard link arrives with IN_CREATE only (no open, no close): the stability rule takes it."""
    source = tmp_path / "source.png"
    source.write_bytes(b"linked")
    with Running(make_watcher(folder)) as run:
        linked = folder / "linked.png"
        os.link(source, linked)
        assert run.wait_for(lambda: linked in run.yielded)


@pytest.fixture
def no_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system or a file owner that refuses leases (NFS, SMB, another user's upload without CAP_LEASE): at
    the OS boundary, F_SETLEASE fails with EACCES, so whether a writer has the file open cannot be known."""
    import fcntl

    real = fcntl.fcntl

    def refusing(fd: int, cmd: int, arg: int = 0) -> object:
        if cmd == getattr(fcntl, "F_SETLEASE", 1024):
            raise PermissionError(13, "Permission denied")
        return real(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", refusing)


@linux_only
def test_missing_close_write_falls_back_to_stability_where_writers_cannot_be_seen(
    folder: Path, no_leases: None
) -> None:
    """A writer that never closes, and no way to know it is there: after close_timeout_s unchanged the file is
    taken anyway (its close-write event may have been lost)."""
    path = folder / "held-open.png"
    with capture_logs() as logs, Running(make_watcher(folder, close_timeout_s=0.6)) as run, path.open("wb") as fh:
        fh.write(b"e" * 100)
        fh.flush()
        assert run.stays(lambda: path not in run.yielded, duration=0.3)
        assert run.wait_for(lambda: path in run.yielded)
    assert any(entry["event"] == "watch.close_write_missing" for entry in logs)


@linux_only
def test_a_file_its_writer_still_holds_open_is_not_taken_until_it_closes(folder: Path) -> None:
    path = folder / "held-open.png"
    with capture_logs() as logs, Running(make_watcher(folder, close_timeout_s=0.3)) as run, path.open("wb") as fh:
        fh.write(b"e" * 100)
        fh.flush()
        assert run.stays(lambda: path not in run.yielded, duration=1.0)  # three close timeouts
        fh.write(b"end")
        fh.close()
        assert run.wait_for(lambda: path in run.yielded)
        assert run.stays(lambda: run.count(path) == 1)
        assert run.sizes[path] == [103]
    assert any(entry["event"] == "watch.still_open" for entry in logs)


def test_a_file_open_for_writing_before_the_start_waits_for_its_writer(folder: Path, mode: str) -> None:
    """The start-up scan uses the live rules: a file some process still writes is not complete, however long
    its writer pauses."""
    path = folder / "upload.png"
    with path.open("wb") as fh:
        fh.write(b"half")
        fh.flush()
        with Running(make_watcher(folder, polling=mode == "polling", close_timeout_s=0.3)) as run:
            assert run.stays(lambda: path not in run.yielded, duration=1.0)
            fh.write(b" and the rest")
            fh.close()
            assert run.wait_for(lambda: path in run.yielded)
            assert run.sizes[path] == [17]


@linux_only
def test_where_writers_cannot_be_seen_a_recent_file_at_start_waits_for_its_close(folder: Path, no_leases: None) -> None:
    """Found by the start-up scan, changed less than close_timeout_s ago: taken at its close-after-write (or
    once close_timeout_s has passed since it last changed), not after stable_ms; an old file is taken at once."""
    old, recent = folder / "old.png", folder / "recent.png"
    old.write_bytes(b"long done")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    with recent.open("wb") as fh:
        fh.write(b"half")
        fh.flush()
        with Running(make_watcher(folder, close_timeout_s=60)) as run:
            assert run.wait_for(lambda: old in run.yielded)
            assert run.stays(lambda: recent not in run.yielded, duration=3 * STABLE_MS / 1000)
            fh.write(b" and the rest")
            fh.close()
            assert run.wait_for(lambda: recent in run.yielded)
            assert run.sizes[recent] == [17]


def test_chunked_write_within_stable_window_is_yielded_complete(running: Running, folder: Path) -> None:
    """Any observer: a writer quicker than stable_ms between chunks is taken once, complete."""
    path = folder / "chunks.png"
    with path.open("wb") as fh:
        for _ in range(5):
            fh.write(b"b" * 1000)
            fh.flush()
            running.wait_for(lambda: False, timeout=STABLE_MS / 1000 / 5)
    assert running.wait_for(lambda: path in running.yielded)
    assert running.stays(lambda: running.count(path) == 1)
    assert running.sizes[path] == [5000]


def test_atomic_rename_from_part(running: Running, folder: Path) -> None:
    part = folder / "upload.png.part"
    with part.open("wb") as fh:
        fh.write(b"c" * 2048)
    assert running.stays(lambda: not running.yielded, duration=3 * STABLE_MS / 1000)
    final = folder / "upload.png"
    part.rename(final)
    assert running.wait_for(lambda: final in running.yielded)
    assert running.stays(lambda: running.yielded == [final])


def test_moved_in_from_outside(running: Running, folder: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(b"d" * 10)
    inside = folder / "elsewhere.jpg"
    outside.rename(inside)
    assert running.wait_for(lambda: inside in running.yielded)
    assert running.stays(lambda: running.count(inside) == 1)


def test_hidden_temporary_and_other_names_are_ignored(running: Running, folder: Path) -> None:
    for name in (".hidden.png", "x.tmp", "x.png.tmp", "~$report.png", "notes.txt", "y.part", "png"):
        (folder / name).write_bytes(b"ignored")
    (folder / ".upload").mkdir()  # a hidden folder: an upload in progress, nothing in it is taken
    (folder / ".upload" / "inner.png").write_bytes(b"not yet")
    marker = folder / "UPPER.PNG"
    marker.write_bytes(b"taken")
    assert running.wait_for(lambda: marker in running.yielded)
    assert running.stays(lambda: running.yielded == [marker])


def test_subfolders_are_watched_and_a_folder_moved_in_brings_complete_files(
    running: Running, folder: Path, tmp_path: Path
) -> None:
    (folder / "case17" / "deeper").mkdir(parents=True)
    written = folder / "case17" / "deeper" / "a.png"
    written.write_bytes(b"written in place")
    staging = tmp_path / "staging" / "case18"
    (staging / "sub").mkdir(parents=True)
    (staging / "x.png").write_bytes(b"x")
    (staging / "sub" / "y.png").write_bytes(b"y")
    (staging.parent / "case18").rename(folder / "case18")
    moved_in = {folder / "case18" / "x.png", folder / "case18" / "sub" / "y.png"}
    # close_timeout_s is 120 s: files that came with their folder are not taken for files being written
    assert running.wait_for(lambda: {written, *moved_in} <= set(running.yielded))
    assert running.stays(lambda: sorted(running.yielded) == sorted({written, *moved_in}))


def test_deleted_and_recreated_is_yielded_again(running: Running, folder: Path) -> None:
    path = folder / "again.png"
    path.write_bytes(b"first")
    assert running.wait_for(lambda: running.count(path) == 1)
    path.unlink()
    path.write_bytes(b"second version")
    assert running.wait_for(lambda: running.count(path) == 2)
    assert running.stays(lambda: running.count(path) == 2)


def test_periodic_reconcile_repeats_files_still_present(folder: Path) -> None:
    stuck = folder / "stuck.png"
    stuck.write_bytes(b"the consumer could not move me")
    with Running(make_watcher(folder, reconcile_interval_s=0.2)) as run:
        assert run.wait_for(lambda: run.count(stuck) >= 2)


def test_special_entries_are_yielded_unfollowed(running: Running, folder: Path, tmp_path: Path) -> None:
    target = tmp_path / "secret.png"
    target.write_bytes(b"outside the watch folder")
    link = folder / "link.png"
    link.symlink_to(target)
    dangling = folder / "dangling.png"
    dangling.symlink_to(tmp_path / "nothing-here.png")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "far.png").write_bytes(b"outside the watch folder")
    folder_link = folder / "folder.png"
    folder_link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # an entry: never walked into
    (folder / "x.jpg").mkdir()  # a folder named like an image is a folder: walked into, never yielded
    fifo = folder / "pipe.png"
    os.mkfifo(fifo)  # nothing ever writes: opening it for reading would block forever
    expected = {link, dangling, folder_link, fifo}
    assert running.wait_for(lambda: expected <= set(running.yielded))
    assert running.stays(lambda: sorted(running.yielded) == sorted(expected))


def test_stop_event_stops_promptly(folder: Path, mode: str) -> None:
    run = Running(make_watcher(folder, polling=mode == "polling", stable_ms=1000, poll_interval_ms=1000))
    with run:
        (folder / "busy.png").write_bytes(b"pending when we stop")
        started = time.monotonic()
        run.stop.set()
        run._thread.join(timeout=5)
        assert time.monotonic() - started < 1.0
    assert run.error is None
    assert run.watcher.observer is None


def test_dead_observer_is_restarted(running: Running, folder: Path) -> None:
    with capture_logs() as logs:
        observer = running.watcher.observer
        assert observer is not None
        observer.stop()  # its thread ends, as if it had crashed
        assert running.wait_for(lambda: running.watcher.restart_count == 1)
        assert running.wait_for(lambda: running.watcher.observer is not observer)
        after = folder / "after-restart.png"
        after.write_bytes(b"still taken")
        assert running.wait_for(lambda: after in running.yielded)
    events = [entry["event"] for entry in logs]
    assert "watch.observer_died" in events
    assert "watch.observer_restarted" in events


def test_dead_emitter_thread_is_noticed(running: Running, folder: Path) -> None:
    """The observer thread may live on while the thread that reads the events died: that counts as dead."""
    observer = running.watcher.observer
    assert observer is not None
    for emitter in list(observer.emitters):
        emitter.stop()
    assert running.wait_for(lambda: running.watcher.restart_count == 1)
    after = folder / "after-emitter.png"
    after.write_bytes(b"still taken")
    assert running.wait_for(lambda: after in running.yielded)


def test_file_written_while_observer_was_dead_is_found(folder: Path) -> None:
    run = Running(make_watcher(folder))
    with run:
        observer = run.watcher.observer
        assert observer is not None
        observer.stop()
        observer.join()
        lost = folder / "lost-event.png"
        lost.write_bytes(b"written while nobody watched")
        assert run.wait_for(lambda: lost in run.yielded)


def test_observer_that_keeps_dying_raises_watch_error(folder: Path) -> None:
    run = Running(make_watcher(folder, max_restarts=1))
    with run:
        for expected in (1, 2):
            observer = run.watcher.observer
            assert observer is not None
            observer.stop()
            assert run.wait_for(lambda n=expected: run.watcher.restart_count >= n or run.error is not None)  # type: ignore[misc]
            if run.error is None:
                assert run.wait_for(lambda o=observer: run.watcher.observer is not o)  # type: ignore[misc]
        assert run.wait_for(lambda: run.error is not None)
    assert isinstance(run.error, WatchError)


def test_watch_folder_removed_raises_watch_error(folder: Path, mode: str) -> None:
    run = Running(make_watcher(folder, polling=mode == "polling"))
    with run:
        shutil.rmtree(folder)
        assert run.wait_for(lambda: run.error is not None)
    assert isinstance(run.error, WatchError)


def test_missing_folder_raises_watch_error(tmp_path: Path) -> None:
    watcher = make_watcher(tmp_path / "absent")
    with pytest.raises(WatchError, match="does not exist"):
        next(watcher.watch(threading.Event()))


@linux_only
def test_inotify_overflow_triggers_reconcile(running: Running, folder: Path) -> None:
    if running.watcher.mode != "inotify":
        pytest.skip("inotify only")
    with capture_logs() as logs:
        # what watchdog logs when the kernel queue overflowed (we cannot make the kernel drop events here)
        logging.getLogger("watchdog.observers.inotify_c").warning(
            "Inotify queue overflowed; filesystem events were lost"
        )
        assert running.wait_for(
            lambda: any(e.get("event") == "watch.reconciled" and e.get("reason") == "overflow" for e in logs)
        )
    assert any(entry["event"] == "watch.overflowed" for entry in logs)


def test_from_settings(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, polling=True, poll_interval_ms=250, stable_ms=300, debounce_ms=10)
    watcher = Watcher.from_settings(settings)
    assert watcher.watch_dir == Path(os.path.realpath(tmp_path / "prediction"))
    assert watcher.polling is True
    assert watcher.poll_interval_s == 0.25
    assert watcher.stable_s == 0.3
    assert watcher.debounce_s == 0.01
    assert watcher.filter(Path("a.TIFF")) and not watcher.filter(Path(".a.png"))


def test_events_drained_together_drop_what_a_later_close_or_deletion_decides() -> None:
    """A file's creation and writes drained together with its close are not looked at (the close makes it ready);
    the attribute change of a move's link drained with the unlink is not either (the deletion forgets the file).
    A creation with no later close or deletion among them is kept: it waits for its close."""
    from watchdog.events import FileClosedEvent, FileCreatedEvent, FileDeletedEvent, FileModifiedEvent

    from histod.daemon.watch import _superseded_dropped

    events = [
        FileCreatedEvent("/w/a.png"),
        FileModifiedEvent("/w/a.png"),
        FileCreatedEvent("/w/b.png"),
        FileClosedEvent("/w/a.png"),
        FileModifiedEvent("/w/a.png"),  # the link of its move
        FileDeletedEvent("/w/a.png"),  # the unlink
        FileModifiedEvent("/w/b.png"),
    ]
    kept = _superseded_dropped(events)
    assert [(type(e).__name__, e.src_path) for e in kept] == [
        ("FileCreatedEvent", "/w/b.png"),
        ("FileClosedEvent", "/w/a.png"),
        ("FileDeletedEvent", "/w/a.png"),
        ("FileModifiedEvent", "/w/b.png"),
    ]
    again = [FileDeletedEvent("/w/c.png"), FileCreatedEvent("/w/c.png")]  # removed, then dropped again
    assert _superseded_dropped(again) == again
