"""Labs drop one folder per case: images in subfolders of prediction/ (present at the start, created in place,
moved in whole, named like an image) are classified, and stored under processed/YYYY-MM-DD/ with their path
relative to the watch folder; the row's name is that relative path. Hidden folders (uploads in progress) and
symlinked folders are not walked; case folders emptied by the moves are removed, never the watch folder.
In-process serve() with the live watcher, real SQLite, real folders."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from histod.db.models import utcnow
from histod.settings import Settings
from tests.faults_support import account, report, tiny_png, wait_for
from tests.test_service_support import row_count, rows, running_service, service_settings

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


def _write(path: Path, i: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tiny_png(i))
    return str(path)


def test_images_in_case_folders_are_classified_and_stored_under_their_folder(
    tiny_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir, stable_ms=100, reconcile_interval_s=1.0)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    expected = ["case1/a.png", "case1/b.png", "case1/deeper/c.png", "top.png"]
    for i, name in enumerate(expected):  # present before the start: the start-up scan walks the tree
        _write(watch / name, i)
    outside = tmp_path / "elsewhere"
    _write(outside / "outside.png", 90)
    (watch / "linked").symlink_to(outside, target_is_directory=True)  # a symlinked folder: not followed
    _write(watch / ".upload" / "z.png", 91)  # a hidden folder: an upload in progress
    thread, stop, errors = running_service(settings)
    try:
        wait_for(lambda: row_count(settings) == 4 or errors, 60, what="the tree present at start")
        # created in place, file by file
        (watch / "case17").mkdir()
        _write(watch / "case17" / "a.png", 10)  # the same leaf name as case1/a.png
        part = watch / "case17" / "b.jpg.part"
        _write(part, 11)
        part.rename(watch / "case17" / "b.jpg")
        # a whole case folder moved in from outside
        _write(tmp_path / "staging" / "case18" / "x.png", 12)
        _write(tmp_path / "staging" / "case18" / "sub" / "y.png", 13)
        (tmp_path / "staging" / "case18").rename(watch / "case18")
        # a folder with an image's name is a folder
        _write(watch / "slides.png" / "s1.png", 14)
        expected += ["case17/a.png", "case17/b.jpg", "case18/x.png", "case18/sub/y.png", "slides.png/s1.png"]
        wait_for(lambda: row_count(settings) == len(expected) or errors, 60, what="every image in every folder")
        # the case folders, emptied by the moves, go; the watch folder, the hidden and the linked ones stay
        wait_for(lambda: sorted(p.name for p in watch.iterdir()) == [".upload", "linked"] or errors, 60, what="tidy")
    finally:
        stop.set()
        thread.join(60)
    assert errors == [], errors
    day = utcnow().strftime("%Y-%m-%d")
    by_name = {r.name: r for r in rows(settings)}
    assert sorted(by_name) == sorted(expected)
    for name, row in by_name.items():
        assert row.original_path == str(watch / name)
        assert row.stored_path == str(settings.processed_dir / day / name), row.stored_path
        assert Path(row.stored_path).is_file() and row.status == "classified"
    assert (outside / "outside.png").is_file() and (watch / ".upload" / "z.png").is_file()
    tally = account(settings, expected)
    assert sorted(tally.left) == [".upload/z.png", "linked"]
    tally.left = []
    report(capsys, "case folders", tally, rounds=1)
    tally.check()


def test_once_walks_the_tree_and_a_file_and_a_folder_of_one_name_do_not_collide(
    tiny_run_dir: Path, tmp_path: Path
) -> None:
    """`serve --once` takes subfolders too. A file named like a case folder stored the same day (case.png, and
    the folder case.png/) gets a name of its own, whichever comes first."""
    from histod.daemon.app import serve

    settings = service_settings(tmp_path, tiny_run_dir)
    watch = settings.resolved_watch_dir
    names = ["case.png/one.png", "case.png/two.png"]
    for i, name in enumerate(names):
        _write(watch / name, i)
    serve(settings, threading.Event(), once=True)
    (watch / "case.png").rmdir()  # --once leaves the emptied folder (the running service removes such folders)
    _write(watch / "case.png", 5)  # now a file of the folder's name
    _write(watch / "other" / "case.png" / "three.png", 6)
    _write(watch / "late.png", 7)  # a file, then a folder of its name
    serve(settings, threading.Event(), once=True)
    (watch / "late.png").mkdir()
    _write(watch / "late.png" / "four.png", 8)
    serve(settings, threading.Event(), once=True)
    names += ["case.png", "other/case.png/three.png", "late.png", "late.png/four.png"]
    recorded = {r.name: r.stored_path for r in rows(settings)}
    assert sorted(recorded) == sorted(names)
    assert all(Path(p).is_file() for p in recorded.values())
    assert Path(recorded["case.png"]).name == "case-1.png"
    assert Path(recorded["late.png/four.png"]).parent.name == "late-1.png"
    _check_tidy(settings)
    account(settings, names).check()


def _check_tidy(settings: Settings) -> None:
    """Nothing but (possibly) empty folders is left in the watch folder."""
    watch = settings.resolved_watch_dir
    assert [p for p in watch.rglob("*") if not p.is_dir()] == []
    assert watch.is_dir()
