"""Training on several data folders with uneven patients: the per-patient cap and weights in the training
pipeline, pinned validation patients and pinned folds, end to end on generated images."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pydantic import ValidationError

from histod.cli import cli
from histod.synthetic import tile
from histod.trainer import data
from histod.trainer.config import TrainConfig
from histod.trainer.fit import class_weights, datasets

TINY = ["--weights", "none", "--alpha", "0.35", "--image-size", "32", "--batch-size", "16"]


def _indexed(n: int) -> np.ndarray:
    """(n, 8, 8, 3) uint8 images whose first pixel spells their index (red * 256 + green)."""
    x = np.zeros((n, 8, 8, 3), dtype=np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    return x


def _index_of(batch: object) -> list[int]:
    x = np.asarray(batch)
    return [int(v) for v in x[:, 0, 0, 0].astype(int) * 256 + x[:, 0, 0, 1].astype(int)]


def _uneven(tmp_path: Path) -> tuple[TrainConfig, np.ndarray, np.ndarray, list[str]]:
    sizes = {"sparse1": 3, "sparse2": 6, "mid": 12, "slide": 300}
    groups = [g for g, n in sizes.items() for _ in range(n)]
    labels = np.array([i % 3 == 0 for i in range(len(groups))], dtype=np.int64)
    cfg = TrainConfig(
        data_dir=tmp_path, out=tmp_path / "run", augment=False, dihedral=False, batch_size=8, patient_cap=0
    )
    return cfg, _indexed(len(groups)), labels, groups


def test_a_capped_epoch_draws_at_most_cap_images_per_patient_afresh(tmp_path: Path) -> None:
    cfg, x, y, groups = _uneven(tmp_path)
    cfg = cfg.model_copy(update={"patient_cap": 10})
    train, _ = datasets(cfg, x, y, x[:4], y[:4], class_weights(y), groups)
    assert int(train.cardinality()) == math.ceil((3 + 6 + 10 + 10) / 8)
    epochs = []
    for _ in range(3):  # Keras starts each epoch with a new iteration
        seen = [i for xb, yb in train for i in _index_of(xb)]
        assert len(seen) == len(set(seen)) == 29
        per_patient = {g: sum(groups[i] == g for i in seen) for g in ("sparse1", "sparse2", "mid", "slide")}
        assert per_patient == {"sparse1": 3, "sparse2": 6, "mid": 10, "slide": 10}
        epochs.append(seen)
    assert len({tuple(e) for e in epochs}) == 3
    for xb, yb in train.take(2):  # labels travel with their images
        assert np.asarray(yb).tolist() == [float(y[i]) for i in _index_of(xb)]


def test_sqrt_weighting_gives_each_image_its_patient_and_class_weight(tmp_path: Path) -> None:
    cfg, x, y, groups = _uneven(tmp_path)
    cfg = cfg.model_copy(update={"patient_weighting": "sqrt"})
    share = data.patient_share(groups, weighting="sqrt")
    by_class = class_weights(y, share)
    train, _ = datasets(cfg, x, y, x[:4], y[:4], by_class, groups)
    got: dict[int, float] = {}
    for xb, _yb, wb in train:
        got.update(zip(_index_of(xb), np.asarray(wb).tolist(), strict=True))
    assert len(got) == len(groups)
    for i, w in got.items():
        assert w == pytest.approx(share[i] * by_class[int(y[i])], rel=1e-6)
    # the weighted classes balance: equal total weight for benign and malignant
    total = np.array([got[i] for i in range(len(groups))])
    assert total[y == 0].sum() == pytest.approx(total[y == 1].sum(), rel=1e-6)
    # a tile of the 300-tile slide weighs 10x less than one of the 3-tile patient (same class)
    assert share[groups.index("sparse1")] / share[groups.index("slide")] == pytest.approx(10.0)


def test_class_weights_of_a_capped_epoch() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    share = np.r_[np.full(80, 0.125), np.ones(20)]  # 80 benign tiles of one capped patient: 10 per epoch
    # an epoch of 30: 20 benign, 10 malignant
    assert class_weights(labels, share) == pytest.approx({0: 30 / 40, 1: 30 / 20})
    assert class_weights(labels) == pytest.approx({0: 100 / 180, 1: 100 / 20})


def test_cap_and_weighting_are_one_choice(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="set patient_cap to 0"):
        TrainConfig(data_dir=tmp_path, out=tmp_path / "o", patient_weighting="sqrt")
    assert TrainConfig(data_dir=tmp_path, out=tmp_path / "o", patient_cap=0, patient_weighting="sqrt").patient_cap == 0
    assert TrainConfig.model_validate({"data_dir": [tmp_path], "out": tmp_path / "o"}).data_dir == tmp_path
    assert TrainConfig(data_dir=(tmp_path, tmp_path / "b"), out=tmp_path / "o").data_dirs == (tmp_path, tmp_path / "b")


# --- end to end ---------------------------------------------------------------------------------------------------


def _tiles(root: Path, patients: range, tiles: int, first_x: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for p in patients:
        for k in range(tiles):
            label = int(k == 1 or (k > 1 and rng.random() < 0.4))
            folder = root / data.CLASS_DIRS[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(tile(bool(label), 40, rng)).save(
                folder / f"{p}_idx5_x{50 * (first_x + k)}_y0_class{label}.png"
            )


@pytest.fixture
def two_folders(tmp_path: Path) -> Path:
    """data/dev: 3 tiles of patients 1-12; data/extra: 2 more tiles of 1-6 and a 30-tile 'slide' of patient 7."""
    _tiles(tmp_path / "data" / "dev", range(1, 13), 3, 0, seed=1)
    _tiles(tmp_path / "data" / "extra", range(1, 7), 2, 10, seed=2)
    _tiles(tmp_path / "data" / "extra", range(7, 8), 30, 10, seed=3)
    return tmp_path / "data"


@pytest.mark.slow
def test_train_on_a_folder_of_folders_with_pinned_validation_patients(two_folders: Path, tmp_path: Path) -> None:
    listed = tmp_path / "val.txt"
    listed.write_text("2\n5\n9\n")
    run = tmp_path / "run"
    args = ["train", str(two_folders), "--out", str(run), *TINY, "--head-epochs", "1", "--epochs", "0"]
    result = CliRunner().invoke(cli, [*args, "--val-patients", str(listed), "--patient-cap", "4"])
    assert result.exit_code == 0, result.output
    with (run / "split.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 * 3 + 6 * 2 + 30
    val = [r for r in rows if r["split"] == "val"]
    assert {r["group"] for r in val} == {"2", "5", "9"}
    assert {r["path"].split("/")[0] for r in val} == {"dev", "extra"}  # named relative to the folder of folders
    assert len(val) == 3 * 3 + 2 * 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["groups"] == {"train": 9, "val": 3}
    assert metrics["config"]["patient_cap"] == 4
    assert metrics["config"]["data_dir"] == str(two_folders)
    again = CliRunner().invoke(cli, [*args, "--val-patients", str(listed), "--cv", "2"])
    assert again.exit_code == 2 and "--val-patients pins one validation split" in again.output


@pytest.mark.slow
def test_cross_validation_on_pinned_folds_over_two_folders(two_folders: Path, tmp_path: Path) -> None:
    from histod.trainer.cv import cross_validate

    dev = data.discover_all([two_folders / "dev"])
    fold_of = data.fold_of_patients(dev, data.folds(dev, 2, 0))
    cfg = TrainConfig(
        data_dir=(two_folders / "dev", two_folders / "extra"),
        out=tmp_path / "cv",
        weights="none",
        alpha=0.35,
        image_size=32,
        batch_size=16,
        head_epochs=1,
        epochs=0,
        patient_cap=0,
        patient_weighting="sqrt",
    )
    summary = cross_validate(cfg, 2, fold_of)
    assert summary["n"] == 12 * 3 + 6 * 2 + 30 and summary["patients"] == 12
    with (tmp_path / "cv" / "cv_predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["group"], int(r["fold"])) for r in rows} == set(fold_of.items())
    assert {r["path"].split("/")[0] for r in rows} == {"dev", "extra"}
    assert [f["n"] for f in summary["folds"]] == [sum(int(r["fold"]) == k for r in rows) for k in (1, 2)]
    with pytest.raises(Exception, match="pinned folds are 2"):
        cross_validate(cfg.model_copy(update={"out": tmp_path / "cv3"}), 3, fold_of)
