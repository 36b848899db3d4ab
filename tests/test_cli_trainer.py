"""`histod train`, `histod evaluate`, `histod predict` as a user runs them: exit codes, messages, output formats."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from histod import LABELS
from histod.cli import cli
from histod.runs import load_run
from histod.synthetic import SyntheticSpec, make_dataset, write_images

TINY = ["--weights", "none", "--alpha", "0.35", "--image-size", "48", "--batch-size", "16", "--ema", "0"]


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, ["--log-format", "json", *args])


def _no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(path)


# --- train: bad input fails fast with a message that names the problem -----------------------------------------


def test_train_without_class_folders(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "tiles" / "a.png")
    result = _invoke("train", str(tmp_path / "data"), "--out", str(tmp_path / "run"))
    assert result.exit_code == 3
    assert '"event": "error"' in result.stderr  # JSON logs: the error line is an event too
    assert "benign/ and malignant/" in result.stderr
    _no_traceback(result)
    assert not (tmp_path / "run").exists()


def test_train_with_an_empty_class(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "Benign" / "a.png")
    (tmp_path / "data" / "Malignant").mkdir()
    result = _invoke("train", str(tmp_path / "data"), "--out", str(tmp_path / "run"))
    assert result.exit_code == 3
    assert "Malignant has no images" in result.stderr
    _no_traceback(result)


def test_train_with_too_few_images(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data", SyntheticSpec(patients=2, tiles_per_patient=2, size=32))
    result = _invoke("train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *TINY)
    assert result.exit_code == 3
    assert "too few images" in result.stderr
    _no_traceback(result)


def test_train_with_too_few_patients(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data", SyntheticSpec(patients=3, tiles_per_patient=6, size=32))
    result = _invoke("train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *TINY)
    assert result.exit_code == 3
    assert "too few patients/groups" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--val-split", "1.5"], "--val-split"),
        (["--weights", "resnet50"], "--weights"),
        (["--batch-size", "0"], "--batch-size"),
        (["--group-pattern", r"^(\d+)_"], "named group"),
    ],
)
def test_train_with_bad_flags(synthetic_dataset: Path, tmp_path: Path, flags: list[str], message: str) -> None:
    result = _invoke("train", str(synthetic_dataset), "--out", str(tmp_path / "run"), *flags)
    assert result.exit_code == 2
    assert message in result.stderr
    _no_traceback(result)


def test_train_end_to_end_head_only(synthetic_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _invoke(
        "train", str(synthetic_dataset), "--out", str(run), *TINY, "--head-epochs", "1", "--epochs", "0", "--seed", "3"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == f"run: {run}"
    assert "balanced accuracy" in result.stdout
    assert load_run(run).image_size == 48
    # progress was visible while training: one log line per epoch
    epochs = [json.loads(line) for line in result.stderr.splitlines() if '"event": "train.epoch"' in line]
    assert [(e["phase"], e["epoch"], e["phase_epoch"]) for e in epochs] == [("head", "1/1", "1/1")]
    assert epochs[0]["epoch_s"] > 0 and epochs[0]["eta_s"] == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["history"]["phase"] == ["head"]
    assert metrics["config"]["epochs"] == 0


# --- predict -----------------------------------------------------------------------------------------------------


def test_predict_lines_and_an_unreadable_file(tiny_run_dir: Path, tmp_path: Path) -> None:
    good = write_images(tmp_path / "in", 3, size=60)
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    result = _invoke("predict", "--model", str(tiny_run_dir), str(tmp_path / "in"), str(good[0]))
    assert result.exit_code == 1
    _no_traceback(result)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5  # three from the folder and the broken one, plus good[0] named again
    threshold = load_run(tiny_run_dir).threshold
    for line in lines:
        name, _, verdict = line.partition(" => ")
        if name == str(broken):
            assert verdict.startswith("error (")
            continue
        label, p = verdict.split(" (p_malignant=")
        assert label in LABELS
        assert 0.0 <= float(p.rstrip(")")) <= 1.0
    assert "1 of 5 images could not be read" in result.stderr
    assert threshold == load_run(tiny_run_dir).threshold


def test_predict_json_with_the_model_from_the_environment(
    tiny_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HISTOD_MODEL", str(tiny_run_dir))
    files = write_images(tmp_path, 4, size=48)
    result = _invoke("predict", "--json", *map(str, files))
    assert result.exit_code == 0, result.output
    threshold = load_run(tiny_run_dir).threshold
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(f) for f in files]
    for r in records:
        assert 0.0 <= r["p_malignant"] <= 1.0
        assert r["label"] == LABELS[int(r["p_malignant"] >= threshold)]


def test_predict_csv_has_a_row_per_file_and_a_summary_line(tiny_run_dir: Path, tmp_path: Path) -> None:
    files = write_images(tmp_path, 3, size=48)
    missing = tmp_path / "gone.png"
    args = ["predict", "--format", "csv", "--model", str(tiny_run_dir), *map(str, files), str(missing)]
    result = CliRunner().invoke(cli, ["--log-format", "console", *args])
    assert result.exit_code == 1
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["path"] for r in rows] == [*map(str, files), str(missing)]
    assert rows[-1]["error"] == "missing" and all(r["label"] in LABELS for r in rows[:3])
    assert "error: 1 of 4 images could not be read (3 of 4 images classified in" in result.stderr
    assert "\r" not in result.stderr  # not a terminal: no progress line


def test_predict_json_error_record(tiny_run_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "gone.png"
    result = _invoke("predict", "--json", "--model", str(tiny_run_dir), str(missing))
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "path": str(missing),
        "error": "missing",
        "message": f"{missing} does not exist",
    }


def test_predict_without_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HISTOD_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    files = write_images(tmp_path, 1, size=48)
    result = _invoke("predict", str(files[0]))
    assert result.exit_code == 2
    assert "no model" in result.stderr


def test_predict_with_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    files = write_images(tmp_path / "in", 1, size=48)
    result = _invoke("predict", "--model", str(tmp_path), str(files[0]))
    assert result.exit_code == 4
    assert "model.json is missing" in result.stderr
    _no_traceback(result)


# --- evaluate ----------------------------------------------------------------------------------------------------


def test_evaluate_json_writes_nothing(
    tiny_run_dir: Path, synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = _invoke("evaluate", "--json", "--model", str(tiny_run_dir), str(synthetic_dataset))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "precision", "f1"):
        assert 0.0 <= data[key] <= 1.0
    assert data["threshold"] == load_run(tiny_run_dir).threshold
    assert sum(map(sum, data["confusion_matrix"])) == data["n"] == 120
    assert list(tmp_path.iterdir()) == []
    # patient-bootstrap intervals, grouped by the IDC names' patient ids as in training
    assert data["groups"] == 12
    assert set(data["ci95"]) == {"balanced_accuracy", "roc_auc", "sensitivity", "specificity"}
    for key, (low, high) in data["ci95"].items():
        assert 0.0 <= low <= data[key] <= high <= 1.0, key
    assert '"event": "evaluate.done"' in result.stderr


def test_evaluate_text_and_out(tiny_run_dir: Path, synthetic_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = _invoke("evaluate", "--model", str(tiny_run_dir), str(synthetic_dataset), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "balanced accuracy" in result.stdout
    assert "true Malignant" in result.stdout
    assert "95 % intervals: bootstrap over 12 patients" in result.stdout
    assert "done: 120 images scored in" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "classification_report.txt",
        "confusion_matrix.png",
        "metrics.json",
        "pr_curve.png",
        "predictions.csv",
        "reliability.png",
        "roc_curve.png",
    ]
    written = json.loads((out / "metrics.json").read_text())
    assert written["ci95"]["roc_auc"][0] <= written["roc_auc"] and len(written["calibration_bins"]) == 10
    for png in ("pr_curve.png", "roc_curve.png", "reliability.png"):
        with Image.open(out / png) as image:
            assert image.size[0] > 300
    as_csv = _invoke("evaluate", "--format", "csv", "--model", str(tiny_run_dir), str(synthetic_dataset))
    rows = {r["metric"]: r for r in csv.DictReader(io.StringIO(as_csv.stdout))}
    assert float(rows["roc_auc"]["value"]) == pytest.approx(written["roc_auc"])
    assert float(rows["roc_auc"]["ci95_low"]) == pytest.approx(written["ci95"]["roc_auc"][0])


def test_evaluate_a_folder_without_classes(tiny_run_dir: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "tiles", 2, size=48)
    result = _invoke("evaluate", "--model", str(tiny_run_dir), str(tmp_path))
    assert result.exit_code == 3
    assert "benign/ and malignant/" in result.stderr


def test_help_does_not_import_tensorflow() -> None:
    code = "import sys; from histod.cli import cli; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_every_hyper_parameter_has_a_train_flag_or_is_the_papers() -> None:
    from histod.commands_trainer import train
    from histod.trainer.config import TrainConfig
    from histod.trainer.presets import PRESET_ONLY, PRESETS

    flags = {name.lstrip("-") for param in train.params for name in param.opts}
    for field in TrainConfig.model_fields:
        if field in ("data_dir", "out"):
            continue
        if field in PRESET_ONLY:  # set by --preset paper, the recipe it exists for
            assert field in PRESETS["paper"] and field.replace("_", "-") not in flags, field
        else:
            assert field.replace("_", "-") in flags, field
