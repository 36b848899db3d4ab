"""Training on several data folders with uneven patients: the per-patient cap in the training pipeline, pinned
validation patients and pinned folds, end to end on generated images."""

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
from histod.errors import ConfigError
from histod.synthetic import tile
from histod.trainer import data
from histod.trainer.config import TrainConfig
from histod.trainer.fit import class_weights, datasets

TINY = ["--weights", "none", "--alpha", "0.35", "--image-size", "32", "--batch-size", "16", "--ema", "0"]
SHORT = ["--head-epochs", "1", "--epochs", "0"]


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
    train, _ = datasets(cfg, x, y, x[:4], y[:4], groups)
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


def test_class_weights_of_a_capped_epoch() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    share = np.r_[np.full(80, 0.125), np.ones(20)]  # 80 benign tiles of one capped patient: 10 per epoch
    # an epoch of 30: 20 benign, 10 malignant
    assert class_weights(labels, share) == pytest.approx({0: 30 / 40, 1: 30 / 20})
    assert class_weights(labels) == pytest.approx({0: 100 / 180, 1: 100 / 20})


def test_one_or_several_data_folders(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="at least one data folder"):
        TrainConfig(data_dir=(), out=tmp_path / "o")
    assert TrainConfig.model_validate({"data_dir": [tmp_path], "out": tmp_path / "o"}).data_dir == tmp_path
    assert TrainConfig(data_dir=(tmp_path, tmp_path / "b"), out=tmp_path / "o").data_dirs == (tmp_path, tmp_path / "b")


# --- a short fit -------------------------------------------------------------------------------------------------


def _fit_steps(tmp_path: Path, cap: int, groups: list[str] | None) -> int:
    """The optimizer steps of a 2-epoch head-only fit of a tiny model on 60 images (20 of one patient)."""
    from histod.trainer.fit import fit
    from histod.trainer.model import build_model

    rng = np.random.default_rng(0)
    y = np.array([i % 2 for i in range(60)], dtype=np.int64)
    x = np.stack([tile(bool(label), 32, rng) for label in y])
    cfg = TrainConfig(
        data_dir=tmp_path,
        out=tmp_path / "run",
        weights="none",
        image_size=32,
        batch_size=4,
        head_epochs=2,
        epochs=0,
        ema=0.0,
        patient_cap=cap,
    )
    model = build_model(cfg)
    result = fit(model, cfg, x, y, x[:8], y[:8], groups=groups)
    assert result.phases == ["head", "head"]
    return int(model.optimizer.iterations.numpy())


def test_a_capped_fit_takes_capped_epochs(tmp_path: Path) -> None:
    groups = ["slide"] * 20 + [f"p{i}" for i in range(40)]  # one patient with 20 images, 40 with one each
    assert _fit_steps(tmp_path, 0, groups) == 2 * math.ceil(60 / 4)
    assert _fit_steps(tmp_path, 5, groups) == 2 * math.ceil((5 + 40) / 4)
    with pytest.raises(ConfigError, match="needs each training image's patient"):
        _fit_steps(tmp_path, 5, None)


# --- the command line ---------------------------------------------------------------------------------------------


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
def two_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """dev: 3 tiles of patients 1-12; extra: 2 more tiles of 1-6 and a 30-tile 'slide' of patient 7; both under
    data/, named relative to tmp_path (the working directory)."""
    monkeypatch.chdir(tmp_path)
    _tiles(tmp_path / "data" / "dev", range(1, 13), 3, 0, seed=1)
    _tiles(tmp_path / "data" / "extra", range(1, 7), 2, 10, seed=2)
    _tiles(tmp_path / "data" / "extra", range(7, 8), 30, 10, seed=3)
    return Path("data/dev"), Path("data/extra")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_val_patients_that_are_not_in_the_data(two_folders: tuple[Path, Path], tmp_path: Path) -> None:
    dev, extra = two_folders
    listed = tmp_path / "val.txt"
    listed.write_text("2\n99\nP-7\n")
    train = ["--log-format", "console", "train"]
    result = CliRunner().invoke(cli, [*train, str(dev), str(extra), "--out", "run", "--val-patients", str(listed)])
    assert result.exit_code == 3
    assert "error: 2 validation patients have no images in the data: 99, P-7" in result.output
    missing = CliRunner().invoke(cli, [*train, str(dev), "--out", "run", "--val-patients", "nowhere.txt"])
    assert missing.exit_code == 2 and "--val-patients nowhere.txt" in missing.output
    assert not Path("run").exists()


def test_resume_refuses_another_list_of_data_folders(two_folders: tuple[Path, Path], tmp_path: Path) -> None:
    dev, extra = two_folders
    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(data_dir=(dev, extra), out=run, weights="none", image_size=48, ema=0.0).save(run)
    for given in ([dev], [extra, dev], [dev, extra, tmp_path / "data"]):
        result = CliRunner().invoke(cli, ["train", *map(str, given), "--out", str(run), "--resume"])
        assert result.exit_code == 2, result.output
        assert f"DATA_DIR {' '.join(map(str, given))} (the run has data/dev data/extra)" in result.output
    # the same folders, given as another path to each, pass that check; only the flag that differs is named
    same = [str(tmp_path / dev), str(tmp_path / extra)]
    other = CliRunner().invoke(cli, ["train", *same, "--out", str(run), "--resume", "--image-size", "64"])
    assert other.exit_code == 2
    assert "--image-size 64 (the run has 48)" in other.output and "DATA_DIR" not in other.output


@pytest.mark.slow
def test_train_on_two_folders_with_pinned_validation_patients(two_folders: tuple[Path, Path], tmp_path: Path) -> None:
    dev, extra = two_folders
    listed = tmp_path / "val.txt"
    listed.write_text("2\n5\n9\n")
    args = ["train", str(dev), str(extra), "--out", "run", *TINY, *SHORT, "--val-patients", str(listed)]
    result = CliRunner().invoke(cli, [*args, "--patient-cap", "4"])
    assert result.exit_code == 0, result.output
    config = json.loads(Path("run/config.json").read_text())
    assert config["data_dir"] == ["data/dev", "data/extra"]
    assert (config["patient_cap"], config["val_patients"]) == (4, str(listed))
    rows = _rows(Path("run/split.csv"))
    assert len(rows) == 12 * 3 + 6 * 2 + 30
    # named below the folder holding both, so each row says which folder its image is in
    assert {r["path"].split("/")[0] for r in rows} == {"dev", "extra"}
    assert all((tmp_path / "data" / r["path"]).is_file() for r in rows)
    val = [r for r in rows if r["split"] == "val"]
    assert {r["group"] for r in val} == {"2", "5", "9"}
    assert {r["path"].split("/")[0] for r in val} == {"dev", "extra"}  # patients 2 and 5 from both folders
    assert len(val) == 3 * 3 + 2 * 2
    metrics = json.loads(Path("run/metrics.json").read_text())
    assert metrics["groups"] == {"train": 9, "val": 3}
    assert metrics["status"] == "complete"
    again = CliRunner().invoke(cli, [*args, "--cv", "2"])
    assert again.exit_code == 2 and "--val-patients pins one validation split" in again.output


@pytest.mark.slow
def test_cross_validation_over_two_folders_holds_out_patients(two_folders: tuple[Path, Path]) -> None:
    dev, extra = two_folders
    args = ["train", str(dev), str(extra), "--out", "cv", *TINY, *SHORT, "--val-split", "0.5", "--cv", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = _rows(Path("cv/cv_predictions.csv"))
    assert len(rows) == 12 * 3 + 6 * 2 + 30
    fold_of: dict[str, set[str]] = {}
    for r in rows:
        fold_of.setdefault(r["group"], set()).add(r["fold"])
    assert len(fold_of) == 12 and all(len(folds) == 1 for folds in fold_of.values())
    assert {f for folds in fold_of.values() for f in folds} == {"1", "2"}
    for patient in ("1", "6"):  # in both folders: every image in the one fold
        assert {r["path"].split("/")[0] for r in rows if r["group"] == patient} == {"dev", "extra"}
    summary = json.loads(Path("cv/cv.json").read_text())
    assert summary["patients"] == 12 and summary["config"]["data_dir"] == ["data/dev", "data/extra"]


@pytest.mark.slow
def test_cross_validation_on_pinned_folds_with_a_patient_cap(two_folders: tuple[Path, Path], tmp_path: Path) -> None:
    from histod.trainer.cv import cross_validate

    dev, extra = two_folders
    found = data.discover_all([dev])
    fold_of = data.fold_of_patients(found, data.folds(found, 2, 0))
    cfg = TrainConfig(
        data_dir=(dev, extra),
        out=tmp_path / "cv",
        weights="none",
        alpha=0.35,
        image_size=32,
        batch_size=16,
        head_epochs=1,
        epochs=0,
        ema=0.0,
        patient_cap=10,  # patient 7's 30-tile slide takes turns
    )
    summary = cross_validate(cfg, 2, fold_of)
    assert summary["n"] == 12 * 3 + 6 * 2 + 30 and summary["patients"] == 12
    rows = _rows(tmp_path / "cv" / "cv_predictions.csv")
    assert {(r["group"], int(r["fold"])) for r in rows} == set(fold_of.items())
    assert {r["path"].split("/")[0] for r in rows} == {"dev", "extra"}
    assert [f["n"] for f in summary["folds"]] == [sum(int(r["fold"]) == k for r in rows) for k in (1, 2)]
    with pytest.raises(ConfigError, match="pinned folds are 2"):
        cross_validate(cfg.model_copy(update={"out": tmp_path / "cv3"}), 3, fold_of)
