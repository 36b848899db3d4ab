"""histod.tiling: the grid and its edges, the tissue mask, batches for a predictor, the aggregation rules, and the
model's scale recorded by `histod train` (RunInfo.tile_px / tile_mpp)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from histod import LABELS, synthetic, tiling
from histod.cli import cli
from histod.runs import MODEL_INFO, load_run

GLASS = (238, 236, 240)


def glass(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Empty slide glass: near-white with a slight tint and sensor noise."""
    rng = np.random.default_rng(seed)
    return np.clip(np.array(GLASS) + rng.normal(0, 3, (height, width, 3)), 0, 255).astype(np.uint8)


# --- the grid -----------------------------------------------------------------------------------------------------


def test_grid_covers_the_image_and_its_last_tiles_run_past_the_edge() -> None:
    grid = tiling.Grid(width=130, height=100, side=50)
    assert (grid.cols, grid.rows, len(grid)) == (3, 2, 6)
    assert [grid.origin(i) for i in range(6)] == [(0, 0), (50, 0), (100, 0), (0, 50), (50, 50), (100, 50)]
    assert grid.origins([5, 1]).tolist() == [[100, 50], [50, 0]]
    exact = tiling.Grid(100, 100, 50)
    assert (exact.cols, exact.rows) == (2, 2)


def test_a_tile_past_the_edge_is_padded_with_white() -> None:
    image = np.zeros((100, 130, 3), dtype=np.uint8)
    grid = tiling.Grid(130, 100, 50)
    inside = tiling.cut(image, grid, 0)
    assert inside.shape == (50, 50, 3) and not inside.any()
    edge = tiling.cut(image, grid, 2)  # x 100..150 of a 130 px wide image
    assert edge.shape == (50, 50, 3)
    assert not edge[:, :30].any()
    assert (edge[:, 30:] == 255).all()


def test_grid_refuses_empty_sizes() -> None:
    with pytest.raises(ValueError):
        tiling.Grid(0, 10, 5)


@pytest.mark.parametrize(
    ("size", "side", "expected"), [((75, 75), 50, False), ((76, 40), 50, True), ((4000, 3000), None, False)]
)
def test_should_tile_only_above_one_and_a_half_tiles(size: tuple[int, int], side: int | None, expected: bool) -> None:
    assert tiling.should_tile(max(size), side) is expected


# --- tissue -------------------------------------------------------------------------------------------------------


def test_otsu_threshold_falls_between_two_modes() -> None:
    rng = np.random.default_rng(0)
    low, high = rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 3000)
    threshold = tiling.otsu_threshold(np.concatenate([low, high]).clip(0, 1))
    assert low.max() < threshold <= high.min()
    overlapping = np.concatenate([rng.normal(0.25, 0.08, 4000), rng.normal(0.55, 0.08, 4000)]).clip(0, 1)
    assert tiling.otsu_threshold(overlapping) == pytest.approx(0.4, abs=0.03)
    assert tiling.otsu_threshold(np.full(10, 0.3)) == pytest.approx(0.3, abs=0.01)


def test_tissue_mask_keeps_stained_tissue_and_drops_glass_pen_and_black() -> None:
    rng = np.random.default_rng(1)
    image = glass(64, 256)
    image[:, :64] = synthetic.tile(False, 64, rng)  # benign H&E-like tissue
    image[:, 64:128] = synthetic.tile(True, 64, rng)  # malignant
    image[:, 128:160] = (40, 160, 60)  # green pen
    image[:, 160:192] = (10, 10, 12)  # black ink / unscanned
    mask, threshold = tiling.tissue_mask(image)
    assert tiling.MIN_SATURATION <= threshold <= tiling.MAX_SATURATION
    assert mask[:, :128].mean() > 0.95
    assert mask[:, 128:].mean() < 0.01


def test_an_all_glass_image_has_no_tissue_and_an_all_tissue_image_is_all_tissue() -> None:
    thumbnail = np.asarray(Image.fromarray(glass(500, 500)).reduce(5))  # as slides.classify sees it
    assert tiling.tissue_mask(thumbnail)[0].mean() == 0.0
    rng = np.random.default_rng(2)
    tissue = np.concatenate([synthetic.tile(bool(i % 2), 64, rng) for i in range(4)], axis=1)
    assert tiling.tissue_mask(tissue)[0].mean() > 0.95


def test_tissue_shares_per_tile_from_a_mask_at_a_smaller_scale() -> None:
    grid = tiling.Grid(width=150, height=100, side=50)  # 3 x 2 tiles
    mask = np.zeros((20, 30), dtype=bool)  # 10 mask pixels per tile side
    mask[0:10, 0:10] = True  # tile 0 full
    mask[0:10, 10:15] = True  # tile 1 half
    mask[10:20, 20:30] = True  # tile 5 full
    assert tiling.tissue_shares(mask, grid).tolist() == [1.0, 0.5, 0.0, 0.0, 0.0, 1.0]


def test_tissue_share_counts_the_part_of_an_edge_tile_past_the_image_as_background() -> None:
    grid = tiling.Grid(width=125, height=50, side=50)  # the third tile is half outside
    mask = np.ones((10, 25), dtype=bool)
    assert tiling.tissue_shares(mask, grid).tolist() == [1.0, 1.0, 0.5]


# --- batches for a predictor --------------------------------------------------------------------------------------


def test_predict_batches_resizes_to_the_model_input_and_keeps_the_order() -> None:
    seen: list[tuple[int, ...]] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.shape)
        return batch[:, 0, 0, 0].astype(np.float32) / 255

    tiles = [(i * 3, np.full((50, 50, 3), i * 20, dtype=np.uint8)) for i in range(7)]
    out = list(tiling.predict_batches(iter(tiles), predict, size=32, batch_size=3))
    assert seen == [(3, 32, 32, 3), (3, 32, 32, 3), (1, 32, 32, 3)]
    indices = [i for batch, _ in out for i in batch]
    p = np.concatenate([probs for _, probs in out])
    assert indices == [0, 3, 6, 9, 12, 15, 18]
    assert p == pytest.approx([i * 20 / 255 for i in range(7)])


def test_resize_matches_what_decode_does_to_a_tile_file(tmp_path: Path) -> None:
    from histod import imaging

    tile = synthetic.tile(True, 50, np.random.default_rng(3))
    Image.fromarray(tile).save(tmp_path / "t.png")
    assert np.array_equal(tiling.resize(tile, 96), imaging.load(tmp_path / "t.png", 96))


# --- aggregation --------------------------------------------------------------------------------------------------


P = np.array([0.9, 0.8, 0.2, 0.1, 0.05, 0.3])
AREA = np.array([100.0, 50.0, 100.0, 100.0, 100.0, 50.0])


def test_share_rule_weighs_tiles_by_their_tissue_area() -> None:
    result = tiling.aggregate(P, AREA, threshold=0.5, rule=tiling.Rule("share", cut=0.25))
    assert result.n_tissue == 6 and result.n_malignant == 2
    assert result.malignant_area_px == 150.0
    assert result.malignant_share == pytest.approx(150 / 500)
    assert result.score == pytest.approx(0.3)
    assert result.label == LABELS[1]
    assert result.rule == "share>=0.25"
    assert tiling.aggregate(P, AREA, 0.5, tiling.Rule("share", cut=0.35)).label == LABELS[0]


@pytest.mark.parametrize(
    ("rule", "score", "label"),
    [
        (tiling.Rule("max"), 0.9, 1),
        (tiling.Rule("mean"), (90 + 40 + 20 + 10 + 5 + 15) / 500, 0),
        (tiling.Rule("topk", k=2), 0.85, 1),
        (tiling.Rule("topk", k=0.5), (0.9 + 0.8 + 0.3) / 3, 1),
        (tiling.Rule("topk", k=0.5, cut=0.7), (0.9 + 0.8 + 0.3) / 3, 0),
        (tiling.Rule("count", cut=3), 2, 0),
    ],
)
def test_each_rule_scores_and_labels(rule: tiling.Rule, score: float, label: int) -> None:
    result = tiling.aggregate(P, AREA, threshold=0.5, rule=rule)
    assert result.score == pytest.approx(score)
    assert result.label == LABELS[label]


def test_rule_names_say_their_parameters() -> None:
    assert tiling.Rule("topk", k=5).name == "topk5"
    assert tiling.Rule("topk", k=0.1, cut=0.6).name == "topk0.1>=0.6"
    assert tiling.Rule("share", cut=0.02).name == "share>=0.02"
    assert tiling.Rule("max").name == "max"


def test_aggregate_refuses_no_tiles_and_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="no tissue tiles"):
        tiling.aggregate(np.array([]), np.array([]), 0.5)
    with pytest.raises(ValueError, match="areas"):
        tiling.aggregate(P, AREA[:3], 0.5)


def test_a_tiled_result_packs_its_tiles_into_one_array() -> None:
    result = tiling.TiledResult(
        aggregate=tiling.aggregate(P[:2], AREA[:2], 0.5),
        x=np.array([0, 50]),
        y=np.array([100, 100]),
        p=P[:2].astype(np.float32),
        tissue=np.array([1.0, 0.5], dtype=np.float32),
        width=200,
        height=200,
        tile_side=50.0,
        level=0,
        n_tiles=16,
        backend="image",
        mpp=0.5,
        warnings=(),
        thumbnail=np.zeros((4, 4, 3), dtype=np.uint8),
    )
    records = np.frombuffer(result.packed(), dtype=tiling.TILE_RECORD)
    assert records["x"].tolist() == [0, 50] and records["y"].tolist() == [100, 100]
    assert records["p"].tolist() == pytest.approx([0.9, 0.8])
    assert result.tiles()[1] == {"x": 50, "y": 100, "p": pytest.approx(0.8), "tissue": 0.5}
    # 150 px² of malignant tissue at 0.5 µm/px
    assert result.malignant_area_mm2 == pytest.approx(150 * 0.25 / 1e6)
    assert json.loads(json.dumps(result.summary()))["malignant_tiles"] == 2


# --- the model's scale ----------------------------------------------------------------------------------------------


def test_native_side_is_the_median_longer_side(tmp_path: Path) -> None:
    paths = []
    for i, size in enumerate([(50, 50), (50, 42), (30, 50), (60, 60), (50, 50)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", size).save(path)
        paths.append(path)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert tiling.native_side([*paths, tmp_path / "bad.png"]) == 50
    assert tiling.native_side([]) is None


def test_a_run_without_a_tile_size_reads_as_unknown(tiny_run_dir: Path, tmp_path: Path) -> None:
    info = json.loads((tiny_run_dir / MODEL_INFO).read_text())
    info.pop("tile_px"), info.pop("tile_mpp")
    (tmp_path / MODEL_INFO).write_text(json.dumps(info))
    old = load_run(tmp_path)
    assert old.tile_px is None and old.tile_mpp is None


def test_train_records_the_median_tile_side(tiny_run_dir: Path) -> None:
    info = load_run(tiny_run_dir)
    assert info.tile_px == synthetic.SyntheticSpec().size  # the synthetic tiles' side, not the model's input
    assert info.tile_mpp is None


@pytest.mark.slow
def test_train_flags_set_the_tile_side_and_microns(synthetic_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    flags = ["--weights", "none", "--alpha", "0.35", "--image-size", "48", "--batch-size", "16"]
    result = CliRunner().invoke(
        cli,
        [
            "train",
            str(synthetic_dataset),
            "--out",
            str(run),
            *flags,
            "--head-epochs",
            "1",
            "--epochs",
            "0",
            "--tile-px",
            "40",
            "--tile-mpp",
            "0.25",
        ],
    )
    assert result.exit_code == 0, result.output
    info = load_run(run)
    assert (info.tile_px, info.tile_mpp) == (40, 0.25)
    assert (
        CliRunner().invoke(cli, ["train", str(synthetic_dataset), "--out", str(run), "--tile-px", "0"]).exit_code == 2
    )
