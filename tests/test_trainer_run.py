"""The tiny session run directory: the RUN_DIR contract (histod.runs) and every artefact a run holds."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from histod.errors import ConfigError, DatasetError
from histod.runs import load_run, sha256_file
from histod.trainer.config import TrainConfig
from histod.trainer.evaluate import METRIC_KEYS

from .conftest import tiny_config


def test_tiny_run_dir_is_a_complete_run(tiny_run_dir: Path) -> None:
    for name in ("model.keras", "model.tflite", "model.json", "metrics.json", "config.json"):
        assert (tiny_run_dir / name).is_file(), name
    info = load_run(tiny_run_dir)
    assert info.image_size == 48
    assert info.alpha == 0.35
    assert 0.0 <= info.threshold <= 1.0
    assert info.labels == ("Benign", "Malignant")
    assert info.keras_sha256 == sha256_file(tiny_run_dir / "model.keras")
    assert info.tflite_sha256 == sha256_file(tiny_run_dir / "model.tflite")
    assert info.parity == "passed"
    assert not (tiny_run_dir / "checkpoint.npz").exists()  # a finished run keeps no checkpoint


def test_config_json_round_trips(tiny_run_dir: Path, synthetic_dataset: Path) -> None:
    cfg = TrainConfig.load(tiny_run_dir)
    assert cfg.data_dir == synthetic_dataset
    assert cfg.out == tiny_run_dir
    assert (cfg.alpha, cfg.weights, cfg.image_size, cfg.seed) == (0.35, "none", 48, 7)
    assert cfg.fine_tune_layers == 155  # the default: the whole base
    assert cfg.val_split == 0.2


def test_metrics_json(tiny_run_dir: Path) -> None:
    m = json.loads((tiny_run_dir / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert 0.0 <= m[key] <= 1.0, key
    assert m["threshold"] == load_run(tiny_run_dir).threshold
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    assert tn + fp == m["counts"]["val"]["benign"]
    assert fn + tp == m["counts"]["val"]["malignant"]
    assert m["balanced_accuracy"] == pytest.approx((m["sensitivity"] + m["specificity"]) / 2)
    counts = m["counts"]
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == sum(counts["found"].values()) == 120
    assert counts["skipped"] == 0
    history = m["history"]
    assert history["phase"] == ["head", "fine_tune"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        assert len(history[key]) == m["epochs_run"] == 2
        assert all(math.isfinite(v) for v in history[key])
    # the model holds the epoch with the lowest val_loss over both phases
    assert m["best_epoch"] == history["val_loss"].index(min(history["val_loss"])) + 1
    assert m["seed"] == 7
    assert m["sha256"] == {
        "model.keras": sha256_file(tiny_run_dir / "model.keras"),
        "model.tflite": sha256_file(tiny_run_dir / "model.tflite"),
    }
    assert m["status"] == "complete"
    parity = m["parity"]
    assert parity["passed"] is True and parity["images"] == sum(counts["val"].values())
    assert 0 <= parity["p99_abs_diff"] <= parity["max_abs_diff"] <= parity["tolerance"]
    assert parity["labels_disagreeing_beyond_tolerance"] == 0 and parity["threshold"] == m["threshold"]
    for package in ("tensorflow", "keras", "ai-edge-litert", "numpy", "scikit-learn", "python"):
        assert m["versions"][package] not in ("", "absent"), package
    assert m["config"]["alpha"] == 0.35


def test_the_tiny_model_learns_the_synthetic_task(tiny_run_dir: Path) -> None:
    """Two epochs on synthetic tiles: well above chance, or the pipeline (scaling, labels, split) is broken."""
    m = json.loads((tiny_run_dir / "metrics.json").read_text())
    assert m["roc_auc"] >= 0.75


def test_split_csv_lists_every_file_once_and_keeps_patients_apart(tiny_run_dir: Path, synthetic_dataset: Path) -> None:
    with (tiny_run_dir / "split.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    files = sorted(str(p.relative_to(synthetic_dataset)) for p in synthetic_dataset.rglob("*.png"))
    assert sorted(r["path"] for r in rows) == files
    for r in rows:
        assert r["label"] == Path(r["path"]).parts[0]
        assert Path(r["path"]).name.startswith(r["group"] + "_idx5_")  # IDC names: the patient id
    train = {r["group"] for r in rows if r["split"] == "train"}
    val = {r["group"] for r in rows if r["split"] == "val"}
    assert train
    assert val
    assert train.isdisjoint(val)


def test_reports_and_plots(tiny_run_dir: Path) -> None:
    report = (tiny_run_dir / "classification_report.txt").read_text()
    assert "Benign" in report
    assert "Malignant" in report
    summary = (tiny_run_dir / "model_summary.txt").read_text()
    for name in ("mobilenet_v2_scaling", "mobilenetv2_base", "pool", "head_bn", "head_dropout", "p_malignant"):
        assert name in summary
    assert "trainable params" in summary
    assert "(None, 1)" in summary
    for name in ("confusion_matrix.png", "training_curves.png", "reliability_diagram.png"):
        with Image.open(tiny_run_dir / name) as img:
            assert img.format == "PNG"
            assert img.width > 200


def test_an_existing_run_is_never_overwritten(tiny_run_dir: Path, synthetic_dataset: Path) -> None:
    from histod.trainer.api import train

    before = sha256_file(tiny_run_dir / "model.keras")
    with pytest.raises(ConfigError, match="already holds a trained run"):
        train(tiny_config(synthetic_dataset, tiny_run_dir))
    assert sha256_file(tiny_run_dir / "model.keras") == before


def test_unreadable_training_files_are_skipped_and_listed(tmp_path: Path) -> None:
    """A class whose every file is broken is a DatasetError naming the count (no TensorFlow work needed)."""
    from histod.trainer.api import train

    (tmp_path / "data" / "benign").mkdir(parents=True)
    (tmp_path / "data" / "malignant").mkdir(parents=True)
    for i in range(6):
        (tmp_path / "data" / "benign" / f"b{i}.png").write_bytes(b"garbage")
        (tmp_path / "data" / "malignant" / f"m{i}.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"no readable benign images .*12 unreadable"):
        train(tiny_config(tmp_path / "data", tmp_path / "run"))


def test_evaluate_folder_uses_the_stored_threshold(tiny_run_dir: Path, synthetic_dataset: Path, tmp_path: Path) -> None:
    from histod.daemon.classifier import load_classifier
    from histod.trainer.api import evaluate_folder

    result = evaluate_folder(tiny_run_dir, synthetic_dataset, load_classifier(tiny_run_dir), out=tmp_path / "eval")
    assert result["threshold"] == load_run(tiny_run_dir).threshold
    assert result["n"] == 120
    for key in METRIC_KEYS:
        assert 0.0 <= result[key] <= 1.0
    for name in ("metrics.json", "classification_report.txt", "confusion_matrix.png", "predictions.csv"):
        assert (tmp_path / "eval" / name).is_file()
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 120
