"""The commands on images larger than the model's training tiles: `histod predict` prints one summary line per
tiled image (every tile with --json, a heat-map PNG with --heatmap), `histod evaluate` scores a folder of them
image by image exactly as predict labels them and refuses a folder that mixes them with tile-sized images."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from histod import synthetic, tiling
from histod.cli import cli
from histod.runs import MODEL_INFO
from tests.tiles_support import GLASS, SIDE, field_png, mosaic, needs_openslide, pyramid

Inputs = tuple[Path, dict[tuple[int, int], bool], Path, Path]


# --- histod predict -----------------------------------------------------------------------------------------------


def _predict(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["predict", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def inputs(tmp_path: Path) -> Iterator[Inputs]:
    field, truth = field_png(tmp_path, rows=5, cols=6)
    tile = tmp_path / "tile.png"
    Image.fromarray(synthetic.tile(True, SIDE, np.random.default_rng(9))).save(tile)
    image, _ = mosaic(4, 6, seed=6)
    pyramid(tmp_path / "slide.tif", image, mpp=0.5)
    yield field, truth, tile, tmp_path / "slide.tif"


def test_predict_prints_one_summary_line_per_tiled_image(tiny_run_dir: Path, tmp_path: Path, inputs: Inputs) -> None:
    field, truth, tile, _ = inputs
    code, out, err = _predict("--model", str(tiny_run_dir), "--heatmap", str(tmp_path / "maps"), str(field), str(tile))
    assert code == 0, out + err
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{field} => ")
    assert f": {len(truth)} tissue tiles of 30, " in lines[0]
    assert f"rule {tiling.DEFAULT_RULE.name}: " in lines[0]
    assert f"heat-map {tmp_path / 'maps' / 'field.png.heatmap.png'}" in lines[0]
    assert lines[1].startswith(f"{tile} => ") and "(p_malignant=" in lines[1]
    with Image.open(tmp_path / "maps" / "field.png.heatmap.png") as png:
        assert png.format == "PNG"
    assert [p.name for p in (tmp_path / "maps").iterdir()] == ["field.png.heatmap.png"]


@needs_openslide
def test_predict_json_gives_every_tile_and_the_warnings(tiny_run_dir: Path, inputs: Inputs) -> None:
    field, truth, tile, slide = inputs
    code, out, err = _predict("--model", str(tiny_run_dir), "--json", str(field), str(slide), str(tile))
    assert code == 0, out + err
    records = [json.loads(line) for line in out.strip().splitlines()]
    by_name = {Path(r["path"]).name: r for r in records}
    tiled = by_name["field.png"]
    assert {(t["x"], t["y"]) for t in tiled["tiles"]} == set(truth)
    assert tiled["tissue_tiles"] == len(tiled["tiles"]) == len(truth)
    assert tiled["rule"] == tiling.DEFAULT_RULE.name and tiled["label"] in ("Benign", "Malignant")
    assert all(0 <= t["p"] <= 1 for t in tiled["tiles"])
    assert by_name["slide.tif"]["backend"] == "openslide"
    assert by_name["slide.tif"]["warnings"][0].startswith("mpp_unknown_model")
    assert set(by_name["tile.png"]) == {"path", "label", "p_malignant"}


def test_predict_warns_on_stderr_when_the_scale_does_not_fit(tiny_run_dir: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    Image.fromarray(synthetic.tile(False, 16, np.random.default_rng(0))).save(small)
    code, out, err = _predict("--model", str(tiny_run_dir), str(small))
    assert code == 0
    assert out.startswith(f"{small} => ")
    assert f"warning: {small}: smaller_than_tile" in err


def test_predict_takes_the_slides_in_a_folder(tiny_run_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(synthetic.tile(True, SIDE, np.random.default_rng(1))).save(folder / "tile.png")
    (folder / "scan.svs").write_bytes(b"II*\x00" + bytes(range(256)) * 8)  # a slide name, not a readable slide
    code, out, _ = _predict("--model", str(tiny_run_dir), str(folder))
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{folder / 'scan.svs'} => error (")
    assert lines[1].startswith(f"{folder / 'tile.png'} => ")
    assert code == 1


def test_heat_maps_of_images_of_one_name_do_not_overwrite_each_other(tiny_run_dir: Path, tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        field_png(tmp_path / folder, rows=3, cols=4)
    code, out, err = _predict("--model", str(tiny_run_dir), "--heatmap", str(tmp_path / "maps"), str(tmp_path))
    assert code == 0, out + err
    maps = tmp_path / "maps"
    assert sorted(p.name for p in maps.iterdir()) == ["field.png-2.heatmap.png", "field.png.heatmap.png"]
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"{tmp_path / 'a' / 'field.png'} => ")
    assert lines[0].endswith(f"; heat-map {maps / 'field.png.heatmap.png'}")
    assert lines[1].startswith(f"{tmp_path / 'b' / 'field.png'} => ")
    assert lines[1].endswith(f"; heat-map {maps / 'field.png-2.heatmap.png'}")


# --- histod evaluate ----------------------------------------------------------------------------------------------


def _field(path: Path, malignant: bool, seed: int, rows: int = 3, cols: int = 4) -> None:
    """Synthetic tiles of one class on glass, one grid cell in three left empty."""
    rng = np.random.default_rng(seed)
    image = np.clip(GLASS + rng.normal(0, 3, (rows * SIDE, cols * SIDE, 3)), 0, 255).astype(np.uint8)
    for r in range(rows):
        for c in range(cols):
            if (r + c) % 3:
                image[r * SIDE : (r + 1) * SIDE, c * SIDE : (c + 1) * SIDE] = synthetic.tile(malignant, SIDE, rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


@pytest.fixture
def fields(tmp_path: Path) -> Path:
    """A labelled folder of fields (each about 3 x 4 of the model's tiles)."""
    root = tmp_path / "fields"
    for i in range(3):
        _field(root / "benign" / f"b{i}.png", False, seed=i)
        _field(root / "malignant" / f"m{i}.png", True, seed=10 + i)
    return root


def test_evaluate_tiles_a_folder_of_fields_and_labels_each_as_predict_does(
    tiny_run_dir: Path, fields: Path, tmp_path: Path
) -> None:
    got = CliRunner().invoke(cli, ["evaluate", "--model", str(tiny_run_dir), str(fields), "--out", str(tmp_path / "e")])
    assert got.exit_code == 0, got.output
    assert f"each image tiled at the model's scale and labelled by rule {tiling.DEFAULT_RULE.name}" in got.stdout
    result = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert (result["n"], result["tiled"], result["rule"]) == (6, 6, tiling.DEFAULT_RULE.name)
    assert result["threshold"] == tiling.DEFAULT_RULE.cut
    with (tmp_path / "e" / "predictions.csv").open() as fh:
        evaluated = {Path(row["path"]).name: row for row in csv.DictReader(fh)}
    code, out, err = _predict("--model", str(tiny_run_dir), "--json", str(fields))
    assert code == 0, out + err
    predicted = {Path(r["path"]).name: r for r in map(json.loads, out.strip().splitlines())}
    assert set(evaluated) == set(predicted)
    for name, row in evaluated.items():
        assert float(row["p_malignant"]) == pytest.approx(predicted[name]["score"], abs=1e-6)
        assert row["predicted"] == predicted[name]["label"].lower()


def test_evaluate_refuses_a_folder_mixing_tiles_and_larger_images(
    tiny_run_dir: Path, fields: Path, tmp_path: Path
) -> None:
    Image.fromarray(synthetic.tile(True, SIDE, np.random.default_rng(0))).save(fields / "malignant" / "tile.png")
    got = CliRunner().invoke(cli, ["evaluate", "--model", str(tiny_run_dir), str(fields)])
    assert got.exit_code == 3
    assert "mixes images of about the model's tile size (1, such as " in got.output
    assert "with larger images that are tiled (6, such as " in got.output and "separate folders" in got.output


def test_evaluate_with_a_model_of_unknown_scale_says_each_image_was_squashed(
    tiny_run_dir: Path, fields: Path, tmp_path: Path
) -> None:
    run = tmp_path / "old-run"
    shutil.copytree(tiny_run_dir, run)
    info = json.loads((run / MODEL_INFO).read_text())
    info.pop("tile_px")
    (run / MODEL_INFO).write_text(json.dumps(info))
    got = CliRunner().invoke(cli, ["evaluate", "--model", str(run), str(fields), "--json"])
    assert got.exit_code == 0, got.output
    result = json.loads(got.stdout)
    assert result["tiled"] == 0 and result["rule"] is None and result["n"] == 6
    assert [w["warning"].split(":")[0] for w in result["warnings"]] == ["scale_unknown"] * 6
