"""The service on real folders, a real SQLite file and the real tiny model (tiny_run_dir)."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import tempfile
import threading
from collections import Counter
from pathlib import Path

import pytest

from histod.daemon import record
from histod.daemon.app import serve
from histod.daemon.classifier import load_classifier
from histod.daemon.infer import infer
from histod.daemon.intake import Arrival, prepare
from histod.daemon.mover import PlannedMove, move_file, plan_target
from histod.db import queries
from histod.db.models import STATUS_CLASSIFIED, STATUS_FAILED, Report, utcnow
from histod.db.session import open_database, reading, transaction
from histod.errors import ConfigError, DatabaseError
from histod.settings import Settings
from histod.synthetic import write_images
from tests.test_service_support import (
    classified,
    factory_for,
    files_under,
    hostile_files,
    moves,
    row_count,
    rows,
    running_service,
    service_settings,
    wait_for,
)


def _once(settings: Settings) -> None:
    serve(settings, threading.Event(), once=True)


# --- moving without overwriting ---------------------------------------------------------------------------
def test_plan_target_skips_names_on_disk_and_claimed(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    claimed = {tmp_path / "a-1.png"}
    assert plan_target(tmp_path, "a.png", claimed.__contains__) == tmp_path / "a-2.png"
    assert plan_target(tmp_path, "noext", claimed.__contains__) == tmp_path / "noext"
    assert plan_target(tmp_path, ".hidden", lambda _p: False) == tmp_path / ".hidden"


def test_target_names_fit_in_name_max_bytes(tmp_path: Path) -> None:
    longest = "é" * 125 + ".png"  # 254 bytes
    claimed = {tmp_path / longest}
    second = plan_target(tmp_path, longest, claimed.__contains__)
    assert second.name == "é" * 124 + "-1.png" and len(os.fsencode(second.name)) == 254  # cut at a character
    taken = plan_target(tmp_path, "x" * 251 + ".png", lambda p: p.name.startswith("x" * 251))
    assert taken.name == "x" * 249 + "-1.png"


def test_move_file_never_overwrites_and_finishes_a_half_done_move(tmp_path: Path) -> None:
    src, dst = tmp_path / "in" / "a.png", tmp_path / "out" / "a.png"
    src.parent.mkdir()
    dst.parent.mkdir()
    src.write_bytes(b"new")
    dst.write_bytes(b"someone else's")
    where = move_file(src, dst)
    assert where == tmp_path / "out" / "a-1.png" and where.read_bytes() == b"new" and not src.exists()
    assert dst.read_bytes() == b"someone else's"
    # a crash after link() and before unlink(): both names on one inode
    src.write_bytes(b"again")
    target = tmp_path / "out" / "b.png"
    os.link(src, target)
    assert move_file(src, target) == target
    assert not src.exists() and target.read_bytes() == b"again"


def test_move_file_across_filesystems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second filesystem (/dev/shm)")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        src = Path(other) / "a.png"
        src.write_bytes(b"far away")
        target = tmp_path / "out" / "a.png"
        assert move_file(src, target) == target
        assert target.read_bytes() == b"far away" and not src.exists()
        assert [p.name for p in target.parent.iterdir()] == ["a.png"]  # no temporary left behind


# --- one pass over the folder ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def once_run(tiny_run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, dict[str, str]]:
    """serve --once over 6 good tiles, a copy of one of them, and three hostile files."""
    root = tmp_path_factory.mktemp("once")
    settings = service_settings(root, tiny_run_dir)
    watch = settings.resolved_watch_dir
    good = write_images(watch, 6, size=48)
    shutil.copyfile(good[0], watch / "copy of first.png")
    expected = hostile_files(watch, good[1])
    _once(settings)
    return settings, expected


def test_files_present_before_start_are_classified_and_moved(once_run: tuple[Settings, dict[str, str]]) -> None:
    settings, _ = once_run
    recorded = rows(settings)
    assert len(recorded) == 10
    assert files_under(settings.resolved_watch_dir) == []
    classified = [r for r in recorded if r.status == STATUS_CLASSIFIED]
    assert len(classified) == 7
    for r in classified:
        assert r.label in ("Benign", "Malignant") and r.p_malignant is not None and 0 <= r.p_malignant <= 1
        assert r.model_sha256 and r.run_id and r.engine == "litert" and r.host == "test-host"
        assert Path(r.stored_path).is_file() and Path(r.stored_path).parent.parent == settings.processed_dir
        assert r.latency_ms >= 0 and r.classified_at >= r.received_at
    assert len(files_under(settings.processed_dir)) == 7
    assert all(m.ok for m in moves(settings)) and len(moves(settings)) == 10


def test_corrupt_and_empty_files_fail_with_reasons(once_run: tuple[Settings, dict[str, str]]) -> None:
    settings, expected = once_run
    failed = {r.name: r for r in rows(settings) if r.status == STATUS_FAILED}
    assert set(failed) == set(expected)
    for name, reason in expected.items():
        accepted = {"truncated", "corrupt"} if reason == "truncated" else {reason}
        assert failed[name].error_reason in accepted, (name, failed[name].error_reason)
        assert failed[name].error and failed[name].label is None and failed[name].p_malignant is None
        assert Path(failed[name].stored_path).parent.parent == settings.failed_dir
    assert sorted(p.name for p in files_under(settings.failed_dir)) == sorted(expected)


def test_duplicate_content_is_a_new_event_marked_duplicate(once_run: tuple[Settings, dict[str, str]]) -> None:
    settings, _ = once_run
    by_name = {r.name: r for r in rows(settings)}
    copy, first = by_name["copy of first.png"], by_name["tile_1_00000.png"]
    assert copy.sha256 == first.sha256 and copy.id != first.id
    assert {copy.duplicate_of, first.duplicate_of} == {None, min(copy.id, first.id)}
    assert Counter(r.duplicate_of is not None for r in rows(settings))[True] == 1


def test_same_name_again_is_stored_under_a_new_name(once_run: tuple[Settings, dict[str, str]]) -> None:
    settings, _ = once_run
    first = next(r for r in rows(settings) if r.name == "tile_1_00001.png")
    shutil.copyfile(first.stored_path, settings.resolved_watch_dir / "tile_1_00001.png")
    _once(settings)
    again = [r for r in rows(settings) if r.name == "tile_1_00001.png"]
    assert len(again) == 2 and again[1].duplicate_of == first.id
    assert again[1].stored_path != first.stored_path
    assert Path(again[1].stored_path).is_file() and Path(first.stored_path).is_file()


def test_entries_that_are_not_regular_files_fail_without_being_opened_or_followed(
    tiny_run_dir: Path, tmp_path: Path
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir)
    watch = settings.resolved_watch_dir
    (good,) = write_images(watch, 1, size=48)
    secret = tmp_path / "outside.txt"
    secret.write_text("not for the service")
    os.mkfifo(watch / "fifo.png")
    (watch / "link.png").symlink_to(secret)
    (watch / "folder.jpg").mkdir()  # a folder with an image's name: walked into, never taken itself
    shutil.copyfile(good, watch / "new\nline é.png")
    _once(settings)
    by_name = {r.name: r for r in rows(settings)}
    assert {n: r.error_reason for n, r in by_name.items()} == {
        good.name: None,
        "new\nline é.png": None,
        "fifo.png": "not_a_file",
        "link.png": "symlink",
    }
    pair = [by_name["new\nline é.png"], by_name[good.name]]
    assert sorted((r.duplicate_of or 0) for r in pair) == [0, min(r.id for r in pair)]
    assert list(watch.iterdir()) == [watch / "folder.jpg"]
    moved = Path(by_name["link.png"].stored_path)
    assert moved.is_symlink() and secret.read_text() == "not for the service"  # the link moved, not its target


# --- crashes between commit and move, and failed moves -----------------------------------------------------
def _record_without_moving(settings: Settings, paths: list[Path]) -> None:
    """What a process that dies right after the commit leaves behind: rows, and the files still in place."""
    factory = factory_for(settings)
    classifier = load_classifier(settings.model or Path(), threads=1)
    from histod.daemon.app import _register

    served = _register(factory, classifier, settings.model or Path(), "litert")
    now = utcnow()
    size, max_bytes, max_pixels = classifier.image_size, settings.max_file_bytes, settings.max_pixels
    read = [prepare(Arrival(p, now), size, max_bytes=max_bytes, max_pixels=max_pixels) for p in paths]
    items = [item for item in read if item is not None]
    assert len(items) == len(paths)
    infer(items, classifier)
    record.record_batch(
        factory,
        items,
        served=served,
        host=settings.host,
        to=record.Destination(settings.processed_dir, settings.failed_dir, settings.resolved_watch_dir),
        reserved=set(),
    )


def test_restart_after_commit_before_move_neither_loses_nor_reclassifies(tiny_run_dir: Path, tmp_path: Path) -> None:
    settings = service_settings(tmp_path, tiny_run_dir)
    watch = settings.resolved_watch_dir
    paths = [*write_images(watch, 3, size=48), *[watch / n for n in hostile_files(watch, watch / "tile_1_00000.png")]]
    _record_without_moving(settings, paths)
    before = rows(settings)
    assert len(before) == 6 and moves(settings) == []
    # a half-done move too: the link was made, the unlink was not
    os.link(paths[0], _mkparent(Path(before[0].stored_path)))
    # and a move done but not recorded
    paths[1].rename(_mkparent(Path(before[1].stored_path)))
    _once(settings)
    after = rows(settings)
    assert [r.id for r in after] == [r.id for r in before]  # nothing classified again
    assert files_under(watch) == []
    assert sorted(str(p) for p in [*files_under(settings.processed_dir), *files_under(settings.failed_dir)]) == sorted(
        r.stored_path for r in after
    )
    assert sorted(m.result_id for m in moves(settings) if m.ok) == [r.id for r in after]


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_a_failed_move_keeps_the_file_records_it_and_is_retried(
    tiny_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir)
    (path,) = write_images(settings.resolved_watch_dir, 1, size=48)
    real_link = os.link

    def full_disk(src: object, dst: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", full_disk)  # the OS boundary: the disk is full
    _once(settings)
    (row,) = rows(settings)
    failed_moves = moves(settings)  # the pass tries once more before it ends
    assert failed_moves and all(not m.ok and "No space" in (m.error or "") for m in failed_moves)
    assert path.is_file()
    assert files_under(settings.processed_dir) == []
    monkeypatch.setattr(os, "link", real_link)
    _once(settings)  # the next pass only moves it
    assert [r.id for r in rows(settings)] == [row.id]
    assert not path.exists() and Path(row.stored_path).is_file()
    assert [m.ok for m in moves(settings)] == [False] * len(failed_moves) + [True]


# --- the watching service ----------------------------------------------------------------------------------
def test_watching_service_takes_files_before_and_after_start_and_stops_cleanly(
    tiny_run_dir: Path, tmp_path: Path
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir, stable_ms=100, reconcile_interval_s=30, report_interval_s=0.5)
    watch = settings.resolved_watch_dir
    write_images(watch, 3, size=48, seed=1)
    thread, stop, errors = running_service(settings)
    try:
        wait_for(lambda: row_count(settings) == 3, 60, what="the 3 files present at start")
        wait_for(lambda: list(settings.reports_dir.glob("report-*.json")), 30, what="a periodic report")
        with pytest.raises(ConfigError, match="another `histod serve`"):
            _once(settings)  # one service per data folder
        staging = tmp_path / "staging"
        slow_bytes = write_images(staging, 1, size=48, seed=3)[0].read_bytes()
        with (watch / "slow.png").open("wb") as slow:
            slow.write(slow_bytes[:100])  # a writer that has not finished
            slow.flush()
            for p in write_images(staging, 5, size=48, seed=2):
                p.rename(watch / p.name)  # atomic-rename upload
            wait_for(lambda: row_count(settings) == 8, 60, what="the files dropped while running")
            assert "slow.png" not in {r.name for r in rows(settings)}
            slow.write(slow_bytes[100:])
        wait_for(lambda: row_count(settings) == 9, 60, what="the slow file once complete")
        wait_for(lambda: files_under(watch) == [], 30, what="the watch folder to empty")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and errors == []
    (slow_row,) = [r for r in rows(settings) if r.name == "slow.png"]
    assert slow_row.status == STATUS_CLASSIFIED and slow_row.size_bytes == len(slow_bytes)
    assert len(files_under(settings.processed_dir)) == 9 and files_under(settings.failed_dir) == []
    with reading(factory_for(settings)) as s:  # periodic reports, then a last one at shutdown
        reports = s.query(Report).order_by(Report.id).all()
    assert len(reports) >= 2 and sum(r.total for r in reports) == 9
    assert len(list(settings.reports_dir.glob("report-*.json"))) == len(reports)
    assert list(settings.reports_dir.glob("report-*.json"))


def test_a_locked_database_makes_the_batch_retry_not_vanish(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    factory = open_database(f"sqlite:///{path}", busy_timeout_ms=50)
    with transaction(factory) as s:
        model = queries.register_model(
            s, sha256="f" * 64, run_id="r", run_path="/r", engine="litert", image_size=48, threshold=0.5, metrics={}
        )
        served = record.Served(model.id, model.sha256, "r", "litert", 0.5)
    (image,) = write_images(tmp_path / "in", 1, size=48)
    item = classified(image, 0.7)

    def attempt(retries: tuple[float, ...]) -> list[PlannedMove]:
        return record.record_batch(
            factory,
            [item],
            served=served,
            host="h",
            to=record.Destination(tmp_path / "processed", tmp_path / "failed"),
            reserved=set(),
            retries=retries,
        )

    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # another process's writer
    writer.execute("BEGIN IMMEDIATE")
    with pytest.raises(DatabaseError, match="locked"):
        attempt(())
    release = threading.Timer(0.5, writer.rollback)  # the other writer finishes after 10x our busy timeout
    release.start()
    planned = attempt((0.1,) * 40)
    release.join()
    writer.close()
    assert len(planned) == 1
    with reading(factory) as s:
        assert [r.name for r in queries.list_results(s)] == [image.name]
