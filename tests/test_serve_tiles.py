"""The service on images larger than the model's tiles: a field or a whole slide dropped beside tile files gets
one results row (label and p from the aggregation rule) and one tiles row (its tile counts and every tissue
tile packed, a link of the audit chain), a heat-map beside the moved file, and the same tiles `histod predict
--json` gives. Unreadable slides and glass fail with their reasons; a stop while an image is tiled records
nothing of it and the next start records it once. Real folder, real SQLite, the real tiny model (tile_px 64)."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from numpy.typing import NDArray
from PIL import Image
from sqlalchemy import select

from histod import synthetic, tiling
from histod.cli import cli
from histod.daemon.app import _register, serve, tiling_progress
from histod.daemon.classifier import load_classifier
from histod.daemon.mover import PlannedMove
from histod.daemon.pipeline import Pipeline
from histod.daemon.reports import write_report
from histod.db.models import STATUS_CLASSIFIED, STATUS_FAILED, Report, TileSet, utcnow
from histod.db.session import reading
from histod.settings import Settings
from tests.test_service_support import factory_for, files_under, rows, service_settings, wait_for
from tests.tiles_support import GLASS, SIDE, field_png, mosaic, needs_openslide, pyramid


def _once(settings: Settings) -> None:
    serve(settings, threading.Event(), once=True)


def _tiles(settings: Settings) -> dict[str, TileSet]:
    """The tiles rows, by their result's name (with ``data`` loaded)."""
    names = {r.id: r.name for r in rows(settings)}
    with reading(factory_for(settings)) as s:
        found = list(s.scalars(select(TileSet).order_by(TileSet.id)))
        for t in found:
            _ = t.data  # deferred column: load it inside the session
    return {names[t.result_id]: t for t in found}


def _verify(db: Path) -> tuple[int, str]:
    got = CliRunner().invoke(cli, ["--log-format", "console", "audit", "verify", "--db", f"sqlite:///{db}"])
    return got.exit_code, got.output


def _tampered(db: Path, tmp_path: Path, sql: str, *params: object) -> Path:
    """A copy of the database with the tiles triggers dropped and ``sql`` run behind the service's back."""
    copy = tmp_path / f"tampered-{len(list(tmp_path.glob('tampered-*')))}.db"
    with sqlite3.connect(db) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    conn = sqlite3.connect(copy)
    conn.execute("DROP TRIGGER tiles_no_update")
    conn.execute(sql, params)
    conn.commit()
    conn.close()
    return copy


def _predict_json(run_dir: Path, path: Path) -> dict[str, object]:
    got = CliRunner().invoke(cli, ["predict", "--model", str(run_dir), "--json", str(path)])
    assert got.exit_code == 0, got.output
    record: dict[str, object] = json.loads(got.stdout.strip().splitlines()[0])
    return record


def test_a_field_beside_tile_files_gets_one_row_and_its_tiles_in_the_chain(tiny_run_dir: Path, tmp_path: Path) -> None:
    settings = service_settings(tmp_path, tiny_run_dir, heatmap_min_tiles=32)  # the field has 32 tissue tiles
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    field, truth = field_png(watch, rows=6, cols=8)
    Image.fromarray(synthetic.tile(True, SIDE, np.random.default_rng(3))).save(watch / "tile.png")
    Image.fromarray(synthetic.tile(False, 16, np.random.default_rng(4))).save(watch / "small.png")
    expected = _predict_json(tiny_run_dir, field)  # what `histod predict --json` says of the same file

    _once(settings)

    by_name = {r.name: r for r in rows(settings)}
    assert set(by_name) == {"field.png", "tile.png", "small.png"}
    assert all(r.status == STATUS_CLASSIFIED for r in by_name.values()), [(r.name, r.error) for r in by_name.values()]
    tiles = _tiles(settings)
    assert set(tiles) == {"field.png", "small.png"}  # the tile file meets the model's scale: no tiles row

    row, t = by_name["field.png"], tiles["field.png"]
    assert t.rule == tiling.DEFAULT_RULE.name and row.threshold == t.rule_cut == tiling.DEFAULT_RULE.cut
    assert row.p_malignant is not None and row.threshold is not None
    assert row.label == ("Malignant" if row.p_malignant >= row.threshold else "Benign") == expected["label"]
    assert row.p_malignant == pytest.approx(expected["score"], abs=1e-5)
    assert t.tile_threshold == pytest.approx(load_classifier(tiny_run_dir).threshold)
    assert (t.grid_tiles, t.tissue_tiles) == (48, len(truth)) == (expected["grid_tiles"], expected["tissue_tiles"])
    assert t.malignant_tiles == expected["malignant_tiles"] and t.backend == "image" and t.warnings == []
    assert t.data is not None and len(t.data) == 16 * len(truth)
    packed = np.frombuffer(t.data, tiling.TILE_RECORD)
    assert {(int(x), int(y)) for x, y in zip(packed["x"], packed["y"], strict=True)} == set(truth)
    given = {(d["x"], d["y"]): d["p"] for d in expected["tiles"]}  # type: ignore[attr-defined]
    assert all(given[(int(r["x"]), int(r["y"]))] == pytest.approx(float(r["p"]), abs=1e-5) for r in packed)

    small = tiles["small.png"]  # classified whole, with its warning kept in the row
    assert small.rule is None and small.tissue_tiles == 0 and small.data is None
    assert [w.split(":")[0] for w in small.warnings] == ["smaller_than_tile"]

    stored = Path(row.stored_path)
    assert stored.is_file() and stored.parent.parent == settings.processed_dir
    heatmap = stored.with_name("field.png.heatmap.png")
    with Image.open(heatmap) as png:
        assert png.format == "PNG"
    assert not any(watch.iterdir())

    db = settings.data_dir / "histod.db"
    code, out = _verify(db)
    assert code == 0 and "2 tile sets" in out, out
    flipped = t.data[:-1] + bytes([t.data[-1] ^ 1])
    code, out = _verify(_tampered(db, tmp_path, "UPDATE tiles SET data = ? WHERE id = ?", flipped, t.id))
    assert code == 1 and f"tiles row {t.id}: data does not match data_sha256" in out, out
    one_more = "UPDATE tiles SET malignant_tiles = malignant_tiles + 1 WHERE id = ?"
    code, out = _verify(_tampered(db, tmp_path, one_more, t.id))
    assert code == 1 and f"tiles row {t.id}: content does not match row_hash" in out, out

    got = CliRunner().invoke(cli, ["results", "--db", f"sqlite:///{db}", "--format", "json"])
    assert got.exit_code == 0, got.output
    listed = {r["name"]: r for r in json.loads(got.stdout)}
    assert (listed["field.png"]["rule"], listed["field.png"]["tissue_tiles"]) == (t.rule, len(truth))
    assert listed["small.png"]["scale_warnings"].startswith("smaller_than_tile: ")
    assert listed["tile.png"]["rule"] is None and listed["tile.png"]["scale_warnings"] is None

    got = CliRunner().invoke(cli, ["report", "--db", f"sqlite:///{db}", "--since", "1d", "--format", "json"])
    assert got.exit_code == 0, got.output
    counts = json.loads(got.stdout)["tiles"]
    assert counts == {"images": 1, "tissue_tiles": len(truth), "malignant_tiles": t.malignant_tiles, "with_warnings": 1}


@needs_openslide
def test_a_slide_is_tiled_through_openslide_and_an_unreadable_one_fails(tiny_run_dir: Path, tmp_path: Path) -> None:
    settings = service_settings(tmp_path, tiny_run_dir)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    image, truth = mosaic(6, 10, seed=5)
    pyramid(watch / "slide.tif", image, mpp=None)
    (watch / "broken.svs").write_bytes(b"II*\x00" + bytes(range(256)) * 8)  # a TIFF header, then nonsense
    glass = np.clip(GLASS + np.random.default_rng(0).normal(0, 2, (400, 400, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(glass).save(watch / "glass.png")

    _once(settings)

    by_name = {r.name: r for r in rows(settings)}
    assert by_name["slide.tif"].status == STATUS_CLASSIFIED
    t = _tiles(settings)["slide.tif"]
    assert t.backend == "openslide" and t.tissue_tiles == len(truth) and t.grid_tiles == 60
    assert by_name["slide.tif"].sha256 is not None and by_name["slide.tif"].size_bytes == (
        Path(by_name["slide.tif"].stored_path).stat().st_size
    )
    assert (by_name["broken.svs"].status, by_name["broken.svs"].error_reason) == (STATUS_FAILED, "corrupt")
    assert (by_name["glass.png"].status, by_name["glass.png"].error_reason) == (STATUS_FAILED, "no_tissue")
    assert {p.name for p in files_under(settings.failed_dir)} == {"broken.svs", "glass.png"}
    assert not list(settings.processed_dir.rglob("*.heatmap.png"))  # 40 tissue tiles: under heatmap_min_tiles (64)
    assert not any(watch.iterdir())


class TileCalls:
    """The real classifier; counts the predict calls of the tiles thread, and with ``hold_at`` makes that call wait
    until the test lets it go, so the test can look at an image being tiled and stop the service there (no sleeps,
    no timing)."""

    def __init__(self, classifier: object, hold_at: int | None = None) -> None:
        self.classifier = classifier
        self.image_size = int(classifier.image_size)  # type: ignore[attr-defined]
        self.threshold = float(classifier.threshold)  # type: ignore[attr-defined]
        self.hold_at = hold_at
        self.calls = 0
        self.holding = threading.Event()
        self.release = threading.Event()

    def predict(self, batch: NDArray[np.uint8]) -> NDArray[np.float32]:
        if threading.current_thread().name.startswith("histod-tiles"):
            self.calls += 1
            if self.calls == self.hold_at:
                self.holding.set()
                assert self.release.wait(60)
        return self.classifier.predict(batch)  # type: ignore[attr-defined,no-any-return]


def test_a_stop_while_an_image_is_tiled_records_nothing_of_it_and_the_next_start_records_it_once(
    tiny_run_dir: Path, tmp_path: Path
) -> None:
    settings = service_settings(tmp_path, tiny_run_dir)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    field, truth = field_png(watch, rows=14, cols=14)  # 131 tissue tiles: three batches (64, 64, 3)
    Image.fromarray(synthetic.tile(True, SIDE, np.random.default_rng(3))).save(watch / "tile.png")
    factory = factory_for(settings)
    classifier = load_classifier(tiny_run_dir, threads=1)
    predictor = TileCalls(classifier, hold_at=2)
    served = _register(factory, classifier, tiny_run_dir, "litert")
    stop = threading.Event()
    scale = tiling.Scale.of(classifier.run)
    with Pipeline(settings, factory, predictor, served, scale=scale, stop=stop) as pipeline:
        pipeline.submit([(field, utcnow()), (watch / "tile.png", utcnow())])

        def turned(done: Callable[[], bool]) -> Callable[[], bool]:
            def turn() -> bool:
                pipeline.pump(0.05)
                return done()

            return turn

        wait_for(turned(predictor.holding.is_set), what="the field's second batch of tiles")
        wait_for(turned(lambda: [r.name for r in rows(settings)] == ["tile.png"]), what="tile.png recorded meanwhile")

        progress = tiling_progress(pipeline)  # what the periodic report shows now
        assert progress == [{"path": str(field), "tiles_done": 64, "tiles_total": len(truth)}]
        now = utcnow()
        write_report(factory, settings.reports_dir, now, now, host="h", model_sha256=None, in_progress=progress)
        with reading(factory) as s:
            report = s.scalars(select(Report)).one()
        assert report.summary["in_progress"] == progress

        stop.set()  # what SIGTERM sets
        predictor.release.set()
        pipeline.finish_flight()
    assert [r.name for r in rows(settings)] == ["tile.png"]  # nothing of the field
    assert _tiles(settings) == {}
    assert field.exists()

    _once(settings)  # the next start: the field from the start, recorded once
    names = [r.name for r in rows(settings)]
    assert names == ["tile.png", "field.png"]
    assert _tiles(settings)["field.png"].tissue_tiles == len(truth)
    assert not field.exists()


class StopsBeforeMoving(Pipeline):
    """A pipeline whose process dies right after each record transaction: nothing is moved."""

    def _move(self, planned: Sequence[PlannedMove], *, attempts: int) -> None:
        return None


def test_an_image_recorded_before_a_crash_is_only_moved_not_tiled_again(tiny_run_dir: Path, tmp_path: Path) -> None:
    settings = service_settings(tmp_path, tiny_run_dir)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    field, _ = field_png(watch, rows=6, cols=8)
    factory = factory_for(settings)
    classifier = load_classifier(tiny_run_dir, threads=1)
    served = _register(factory, classifier, tiny_run_dir, "litert")
    scale = tiling.Scale.of(classifier.run)
    with StopsBeforeMoving(settings, factory, classifier, served, scale=scale) as first:
        first.process([(field, utcnow())])
    (row,) = rows(settings)
    assert field.exists() and not Path(row.stored_path).exists()

    counting = TileCalls(classifier)
    with Pipeline(settings, factory, counting, served, scale=scale) as second:  # the restart
        second.process([(field, utcnow())])
    assert counting.calls == 0
    assert [r.id for r in rows(settings)] == [row.id] and len(_tiles(settings)) == 1
    assert not field.exists() and Path(row.stored_path).is_file()
