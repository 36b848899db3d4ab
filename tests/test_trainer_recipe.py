"""The training recipe: augmentation, test-time views, calibration, the moving average, presets, cross-validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from histod import tta
from histod.cli import cli
from histod.errors import ConfigError
from histod.runs import RunInfo, load_run
from histod.trainer import augment, data, presets
from histod.trainer.config import TrainConfig
from histod.trainer.evaluate import (
    apply_calibration,
    bootstrap_ci,
    calibration_bins,
    expected_calibration_error,
    fit_calibration,
)
from tests.conftest import tiny_config

TINY = ["--weights", "none", "--alpha", "0.35", "--image-size", "48", "--batch-size", "16", "--ema", "0"]


def _asymmetric(n: int = 2, size: int = 6) -> np.ndarray:
    return np.arange(n * size * size * 3, dtype=np.float32).reshape(n, size, size, 3)


# --- test-time views ---------------------------------------------------------------------------------------------


def test_the_eight_views_are_the_eight_symmetries_of_the_square() -> None:
    x = _asymmetric()
    seen = {tta.view(x, i)[0].tobytes() for i in range(8)}
    assert len(seen) == 8  # all distinct on an image with no symmetry
    expected = {np.rot90(x[0], k, axes=(0, 1)).tobytes() for k in range(4)}
    expected |= {np.rot90(x[0][:, ::-1], k, axes=(0, 1)).tobytes() for k in range(4)}
    assert seen == expected
    assert tta.views(x, 4).shape == (8, 6, 6, 3)
    assert tta.views(x, 1) is x
    with pytest.raises(ValueError, match="tta must be one of"):
        tta.views(x, 3)


def test_average_is_the_mean_over_views_per_image() -> None:
    p = np.array([0.1, 0.9, 0.3, 0.5], dtype=np.float32)  # two views of two images, view-major
    assert np.allclose(tta.average(p, 2), [0.2, 0.7])


def test_run_info_reads_the_old_boolean_tta() -> None:
    base = {
        "run_id": "r",
        "created": "now",
        "image_size": 48,
        "threshold": 0.5,
        "alpha": 0.35,
        "keras_sha256": "a",
        "tflite_sha256": "b",
    }
    assert RunInfo.model_validate({**base, "tta": True}).tta == 2
    assert RunInfo.model_validate({**base, "tta": False}).tta == 1
    assert RunInfo.model_validate({**base, "tta": 8}).tta == 8
    with pytest.raises(ValueError, match="tta must be one of"):
        RunInfo.model_validate({**base, "tta": 3})


# --- augmentation ------------------------------------------------------------------------------------------------


def test_dihedral_gives_each_image_one_of_its_symmetries() -> None:
    import tensorflow as tf

    tf.random.set_seed(1)
    x = _asymmetric(64)
    out = augment.dihedral(tf.constant(x)).numpy()
    changed = 0
    for before, after in zip(x, out, strict=True):
        options = {tta.view(before[None], i)[0].tobytes() for i in range(8)}
        assert after.tobytes() in options
        changed += after.tobytes() != before.tobytes()
    assert 40 <= changed <= 64  # 7 of 8 draws change the image


def test_pipeline_follows_the_config(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path / "o", augment=False, dihedral=False)
    assert augment.pipeline(cfg) is None
    cfg = tiny_config(tmp_path, tmp_path / "o", augment=True, dihedral=True)
    run = augment.pipeline(cfg)
    assert run is not None
    import tensorflow as tf

    out = run(tf.constant(_asymmetric(4, 8) % 256)).numpy()
    assert out.shape == (4, 8, 8, 3) and out.min() >= 0 and out.max() <= 255


# --- calibration and intervals -----------------------------------------------------------------------------------


def test_calibration_recovers_an_overconfident_and_biased_model() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=20_000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(np.int64)  # labels drawn from sigmoid(z)
    overconfident = 1 / (1 + np.exp(-3 * z))  # logits three times too large
    a, b = fit_calibration(y, overconfident, shift=False)  # temperature scaling: T = 1 / a
    assert 0.3 < a < 0.37 and b == 0.0
    fixed = apply_calibration(overconfident, a, b)
    assert expected_calibration_error(y, fixed) < 0.02 < expected_calibration_error(y, overconfident)
    biased = 1 / (1 + np.exp(-(3 * z + 1.5)))  # ... and shifted, as class weights do
    a, b = fit_calibration(y, biased)
    assert 0.3 < a < 0.37 and -0.6 < b < -0.4  # z = (logit - 1.5) / 3
    assert expected_calibration_error(y, apply_calibration(biased, a, b)) < 0.02
    assert expected_calibration_error(y, apply_calibration(biased, *fit_calibration(y, biased, shift=False))) > 0.03
    # monotone: the ranking (and so ROC AUC) is unchanged
    assert np.all(np.diff(fixed[np.argsort(overconfident)]) >= 0)


def test_calibration_stays_finite_when_a_small_split_is_separated() -> None:
    # 20 images, every malignant p above every benign one, logits within 0.01 of each other (a head barely
    # trained): hard 0/1 targets would drive the scale towards infinity; Platt's targets (N+1)/(N+2), 1/(N+2) stop
    # where the fitted p match them
    y = np.array([0] * 10 + [1] * 10)
    z = np.concatenate([np.linspace(-0.010, -0.001, 10), np.linspace(0.001, 0.010, 10)])
    a, b = fit_calibration(y, 1 / (1 + np.exp(-z)))
    assert 0 < a < 1000 and abs(b) < 0.1  # hard targets ran to a = 52,000
    p = apply_calibration(1 / (1 + np.exp(-z)), a, b)
    assert 0.9 < p[-1] < 0.99 and 0.01 < p[0] < 0.1  # about the targets' spread, not pinned at 0 and 1
    assert np.all(np.diff(p) > 0)


def test_calibration_bins_count_every_image() -> None:
    p = np.array([0.0, 0.05, 0.55, 0.95, 1.0])
    y = np.array([0, 0, 1, 1, 1])
    bins = calibration_bins(y, p, bins=10)
    assert sum(int(b["n"]) for b in bins) == 5
    assert bins[0]["n"] == 2 and bins[9]["n"] == 2 and bins[5]["n"] == 1
    assert expected_calibration_error(y, p) == pytest.approx((0.025 * 2 + 0.45 + 0.025 * 2) / 5)


def test_bootstrap_resamples_patients_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(30), 20)
    y = (rng.random(groups.size) < 0.4).astype(np.int64)
    p = np.clip(y * 0.3 + rng.random(groups.size) * 0.7, 0, 1)
    ci = bootstrap_ci(y, p, groups, 0.5, n=300, seed=1)
    from histod.trainer.evaluate import metrics

    m = metrics(y, p, 0.5)
    for key in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity"):
        lo, hi = ci[key]
        assert lo <= m[key] <= hi and hi - lo > 0.005
    # one group: resampling patients can only ever draw that patient, so the interval collapses
    one = bootstrap_ci(y, p, np.zeros_like(groups), 0.5, n=50)
    assert one["roc_auc"][0] == pytest.approx(one["roc_auc"][1])
    decided = bootstrap_ci(y, p, groups, 0.5, n=50, decisions=np.ones_like(y, dtype=bool))
    assert decided["sensitivity"] == [1.0, 1.0] and decided["specificity"] == [0.0, 0.0]


# --- split by image (the paper) ----------------------------------------------------------------------------------


def test_image_split_puts_a_patient_on_both_sides_patient_split_never(synthetic_dataset: Path) -> None:
    samples = data.discover(synthetic_dataset)
    by_patient = data.split(samples, 0.2, 0)
    assert not {s.group for s in by_patient.train} & {s.group for s in by_patient.val}
    by_image = data.split(samples, 0.2, 0, by="image")
    assert {s.group for s in by_image.train} & {s.group for s in by_image.val}
    with pytest.raises(ConfigError, match="use patient or image"):
        data.split(samples, 0.2, 0, by="slide")


# --- presets -----------------------------------------------------------------------------------------------------


def test_presets_are_valid_configs_and_record_their_name(tmp_path: Path) -> None:
    for name in presets.PRESETS:
        cfg = TrainConfig(data_dir=tmp_path, out=tmp_path / "o", **presets.preset(name))
        assert cfg.preset == name
    paper = TrainConfig(data_dir=tmp_path, out=tmp_path / "o", **presets.preset("paper"))
    assert (paper.scaling, paper.split_by, paper.threshold, paper.head_epochs) == ("unit", "image", 0.5, 0)
    assert (paper.image_size, paper.learning_rate, paper.fine_tune_layers, paper.freeze_batchnorm) == (
        224,
        1e-5,
        30,
        False,
    )
    assert (paper.ema, paper.calibrate, paper.dihedral, paper.class_weights) == (0.0, False, False, False)
    assert presets.preset(None) == {}
    with pytest.raises(ConfigError, match="unknown preset"):
        presets.preset("histology")  # the measured best recipe is the default: no preset names it


def test_train_with_the_defaults_writes_every_artefact_and_flags_win(synthetic_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", str(synthetic_dataset), "--out", str(run), *TINY]
    args += ["--head-epochs", "1", "--epochs", "1", "--tta", "2", "--no-dihedral"]
    result = CliRunner().invoke(cli, ["--log-format", "json", *args])
    assert result.exit_code == 0, result.output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["preset"] is None and cfg["calibrate"] is True and cfg["fine_tune_layers"] == 155  # the defaults
    assert cfg["image_size"] == 48 and cfg["dihedral"] is False and cfg["tta"] == 2  # flags win
    info = load_run(run)
    assert info.tta == 2 and info.calibration_scale > 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["tta"] == 2 and m["calibration"]["method"] == "platt"
    assert (m["calibration"]["scale"], m["calibration"]["shift"]) == (info.calibration_scale, info.calibration_shift)
    assert 0 <= m["ece"] <= 1 and len(m["calibration"]["bins"]) == 10
    lo, hi = m["ci95"]["balanced_accuracy"]
    assert lo <= m["balanced_accuracy"] <= hi
    assert (run / "reliability_diagram.png").stat().st_size > 1000
    # the final stretch says where its time goes: each step one log line with its seconds
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    steps = {e["event"]: e for e in events if "seconds" in e}
    for name in ("score.predicted", "score.calibrated", "score.bootstrapped", "export.saved", "artefacts.written"):
        assert steps[name]["seconds"] >= 0, name
    for name in ("export.converted", "export.parity"):
        assert steps[name]["seconds"] >= 0, name
    assert steps["export.parity"]["passed"] is True


def test_options_measured_to_buy_nothing_are_not_offered() -> None:
    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    for gone in (
        "--mixup",
        "--label-smoothing",
        "--lr-schedule",
        "--monitor",
        "--color-jitter",
        "--stain-jitter",
        "--head-bn-momentum",
        "histology",
    ):
        assert gone not in result.output, gone
    for field in ("mixup", "label_smoothing", "lr_schedule", "monitor", "color_jitter", "stain_jitter"):
        assert field not in TrainConfig.model_fields


def test_ema_keeps_the_averaged_weights_that_validation_scored(synthetic_dataset: Path, tmp_path: Path) -> None:
    """With ema the model holds the moving average that EarlyStopping saw score best: its loss on the validation
    images is the best epoch's recorded val_loss (keeping the raw weights, or their BatchNorm statistics, misses
    it by far more than the tolerance)."""
    from histod.trainer.fit import fit
    from histod.trainer.model import build_model, head_features
    from histod.trainer.score import keras_predict

    cfg = tiny_config(synthetic_dataset, tmp_path / "run", ema=0.9, head_epochs=3, epochs=1)
    images, labels, kept, _ = data.load_images(data.discover(synthetic_dataset), cfg.image_size)
    x_train, y_train, x_val, y_val = images[::2], labels[::2], images[1::2], labels[1::2]
    model = build_model(cfg)
    result = fit(model, cfg, x_train, y_train, x_val, y_val, groups=[s.group for s in kept[::2]])
    q = np.clip(keras_predict(model, x_val).astype(np.float64), 1e-7, 1 - 1e-7)
    loss = float(-np.mean(y_val * np.log(q) + (1 - y_val) * np.log(1 - q)))
    assert loss == pytest.approx(result.history["val_loss"][result.best_epoch - 1], abs=2e-4)
    # and its head BatchNorm holds the statistics of the averaged weights' features (SWA's BN update), not
    # moving averages gathered under the raw weights
    f = np.asarray(head_features(model).predict(x_train.astype(np.float32), verbose=0), dtype=np.float64)
    bn = model.get_layer("head_bn")
    assert np.allclose(np.asarray(bn.moving_mean), f.mean(axis=0), atol=1e-4)
    assert np.allclose(np.asarray(bn.moving_variance), f.var(axis=0), rtol=1e-3, atol=1e-5)
    bad = CliRunner().invoke(cli, ["train", str(synthetic_dataset), "--out", str(tmp_path / "x"), "--ema", "1"])
    assert bad.exit_code != 0 and "ema" in bad.output


def test_calibration_is_folded_into_the_served_model(tiny_run_dir: Path, tmp_path: Path) -> None:
    """Scaling the last layer gives sigmoid(a * logit(p) + b) from model.keras AND model.tflite."""
    import keras

    from histod.litert import LiteRTModel
    from histod.trainer.export import to_tflite
    from histod.trainer.score import fold_calibration, keras_predict

    model = keras.models.load_model(tiny_run_dir / "model.keras")
    x = np.random.default_rng(0).integers(0, 256, size=(6, 48, 48, 3)).astype(np.uint8)
    before = keras_predict(model, x)
    fold_calibration(model, 0.4, -0.7)
    after = keras_predict(model, x)
    assert np.allclose(after, apply_calibration(before, 0.4, -0.7), atol=1e-5)
    (tmp_path / "m.tflite").write_bytes(to_tflite(model))
    assert np.allclose(LiteRTModel(tmp_path / "m.tflite").predict(x), after, atol=1e-4)


# --- cross-validation --------------------------------------------------------------------------------------------


def test_cv_holds_every_patient_out_exactly_once(synthetic_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    args = ["train", str(synthetic_dataset), "--out", str(out), *TINY, "--head-epochs", "1", "--epochs", "0"]
    result = CliRunner().invoke(cli, ["--log-format", "json", *args, "--cv", "2", "--calibrate", "--tta", "2"])
    assert result.exit_code == 0, result.output
    assert "2-fold cross-validation" in result.stdout and "first view alone" in result.stdout
    summary = json.loads((out / "cv.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [1, 2]
    assert all(f["epochs"] == 1 and f["best_epoch"] == 1 and f["seconds"] > 0 for f in summary["folds"])
    # with 2 views each fold also scores its first view alone, thresholded on that view's monitoring p
    for key in ("balanced_accuracy", "roc_auc"):
        singles = [f["single_view"][key] for f in summary["folds"]]
        assert all(0.0 <= v <= 1.0 for v in singles)
        assert summary["mean_single_view"][key] == pytest.approx(sum(singles) / 2)
    # each fold's own Platt fit on its monitoring patients (a tiny model: not the identity)
    assert all(
        f["calibration"]["scale"] > 0 and f["calibration"] != {"scale": 1.0, "shift": 0.0} for f in summary["folds"]
    )
    with (out / "cv_predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == summary["n"] == len(data.discover(synthetic_dataset))
    assert len({r["path"] for r in rows}) == len(rows)  # each image scored once
    fold_of_patient: dict[str, set[str]] = {}
    for r in rows:
        fold_of_patient.setdefault(r["group"], set()).add(r["fold"])
        assert 0.0 <= float(r["p_malignant"]) <= 1.0
    assert all(len(f) == 1 for f in fold_of_patient.values())  # a patient is in one held-out fold only
    assert sum(f["n"] for f in summary["folds"]) == summary["n"]
    for key in ("balanced_accuracy", "roc_auc"):
        lo, hi = summary["pooled_ci95"][key]
        assert lo <= summary["pooled"][key] <= hi
    assert not (out / "model.keras").exists()  # an estimate, not a model
    again = CliRunner().invoke(cli, [*args, "--cv", "2"])
    assert again.exit_code == 2 and "already holds a cross-validation" in again.output


def test_train_with_the_paper_preset(synthetic_dataset: Path, tmp_path: Path) -> None:
    """The literal recipe end to end: one phase, pixels / 255, an image-level split, the fixed threshold 0.5."""
    run = tmp_path / "paper"
    args = ["train", str(synthetic_dataset), "--out", str(run), "--preset", "paper", *TINY, "--epochs", "1"]
    result = CliRunner().invoke(cli, ["--log-format", "json", *args])
    assert result.exit_code == 0, result.output
    m = json.loads((run / "metrics.json").read_text())
    assert m["threshold"] == 0.5 and m["threshold_rule"] == "fixed" and m["split_by"] == "image"
    assert m["history"]["phase"] == ["fine_tune"]  # no head warm-up
    with (run / "split.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    sides: dict[str, set[str]] = {}
    for row in rows:
        sides.setdefault(row["group"], set()).add(row["split"])
    assert any(len(s) == 2 for s in sides.values())  # a patient on both sides: what the paper did
    summary = (run / "model_summary.txt").read_text()
    assert "divide_by_255" in summary and "mobilenet_v2_scaling" not in summary
