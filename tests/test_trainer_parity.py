"""A run whose model.tflite fails the export parity check is kept whole: every artefact written, the failure
recorded in metrics.json and model.json, a non-zero exit with one line that says what to do. `histod evaluate`
and `histod predict` accept it; `histod serve` refuses it unless told otherwise.

The check is forced to fail with a tolerance of 0: two float32 runtimes never agree to the last bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from histod.cli import cli
from histod.runs import load_run
from histod.synthetic import write_images
from histod.trainer import export

TINY = ["--weights", "none", "--alpha", "0.35", "--image-size", "48", "--batch-size", "16", "--ema", "0"]
ARTEFACTS = (
    "config.json",
    "model.keras",
    "model.tflite",
    "model.json",
    "metrics.json",
    "split.csv",
    "classification_report.txt",
    "model_summary.txt",
    "confusion_matrix.png",
    "training_curves.png",
    "reliability_diagram.png",
)


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, ["--log-format", "json", *args])


def test_a_run_failing_export_parity_is_kept_marked_and_evaluable(
    synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "PARITY_TOLERANCE", 0.0)
    run = tmp_path / "run"
    trained = _invoke("train", str(synthetic_dataset), "--out", str(run), *TINY, "--head-epochs", "1", "--epochs", "1")
    assert trained.exit_code == 4, trained.output
    events = [json.loads(line) for line in trained.stderr.splitlines() if line.startswith("{")]
    errors = [str(e["message"]) for e in events if e["event"] == "error"]
    assert len(errors) == 1 and "the LiteRT export disagrees with the Keras model" in errors[0]
    assert f"The run in {run} is complete" in errors[0] and "--allow-parity-failure" in errors[0]
    assert f"run: {run}" in trained.stdout  # the validation summary is printed all the same

    for name in ARTEFACTS:
        assert (run / name).is_file(), name
    assert not (run / "checkpoint.npz").exists()
    assert load_run(run).parity == "failed"
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "parity_failed"
    assert m["parity"]["passed"] is False and m["parity"]["tolerance"] == 0.0
    assert m["parity"]["max_abs_diff"] > 0 and m["parity"]["images"] == m["n"]

    evaluated = _invoke("evaluate", "--json", "--model", str(run), str(synthetic_dataset))
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["n"] == 120
    images = write_images(tmp_path / "in", 2, size=48)
    predicted = _invoke("predict", "--model", str(run), *map(str, images))
    assert predicted.exit_code == 0, predicted.output
    assert len(predicted.stdout.strip().splitlines()) == 2

    data = tmp_path / "data"
    write_images(data / "prediction", 2, size=48)
    refused = _invoke("serve", "--once", "--data-dir", str(data), "--model", str(run))
    assert refused.exit_code == 4
    assert "failed the export parity check" in refused.stderr and "--allow-parity-failure" in refused.stderr
    assert len(list((data / "prediction").iterdir())) == 2  # nothing taken
    keras_served = _invoke("serve", "--once", "--data-dir", str(data), "--model", str(run), "--engine", "keras")
    assert keras_served.exit_code == 0, keras_served.output  # model.keras is the reference: nothing to refuse
    write_images(data / "prediction", 2, size=48, seed=5)
    allowed = _invoke("serve", "--once", "--allow-parity-failure", "--data-dir", str(data), "--model", str(run))
    assert allowed.exit_code == 0, allowed.output
    assert list((data / "prediction").iterdir()) == []
