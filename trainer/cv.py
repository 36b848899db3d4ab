"""`histod train --cv K`: k-fold patient-grouped cross-validation of a recipe. An estimate, not a model.

Every patient is held out exactly once. In each fold the training patients are split again (the same patient-
grouped split `histod train` makes) into a fitting part and a monitoring part: the monitoring patients drive
EarlyStopping and choose the decision threshold, so the held-out fold only ever scores. Writes OUT/cv.json (per
fold, mean and standard deviation over folds, and the pooled out-of-fold figures with a 95 % bootstrap interval
over patients) and OUT/cv_predictions.csv. With --tta N > 1 each fold also reports its first view alone
(``single_view``: its own threshold on the monitoring patients), so the views' share of a result can be told
from the model's. No model is kept: train one with the same flags and no --cv.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from histod.errors import ConfigError
from histod.logs import get_logger
from histod.trainer import artefacts, data
from histod.trainer.config import TrainConfig
from histod.trainer.evaluate import bootstrap_ci, decision_threshold, expected_calibration_error, metrics

log = get_logger("histod.trainer")

KEYS = ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")
SUMMARY = "cv.json"


def cross_validate(cfg: TrainConfig, k: int, fold_of: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Train and score ``k`` models, one per held-out fold of patients; return (and write) the summary.

    ``fold_of`` (patient id -> fold 1..k) pins the folds, e.g. to those ``data.folds`` drew on another data set
    of the same patients; by default they are drawn from the images found (``data.folds``)."""
    if k < 2:
        raise ConfigError(f"--cv {k}: need at least 2 folds")
    if cfg.val_patients is not None:
        raise ConfigError("--val-patients pins one validation split; --cv holds out every patient once")
    started = time.monotonic()
    samples = data.discover_all(cfg.data_dirs, cfg.group_pattern)
    _folds(samples, k, cfg, fold_of)  # fail fast: too few patients for k folds, or patients without a fold
    if (cfg.out / SUMMARY).exists():
        raise ConfigError(f"--out {cfg.out} already holds a cross-validation; choose a new folder")
    cfg.out.mkdir(parents=True, exist_ok=True)
    cfg.save(cfg.out)
    images, labels, kept, skipped = data.load_images(samples, cfg.image_size)
    p_oof = np.full(len(kept), np.nan)
    decided = np.zeros(len(kept), dtype=bool)
    fold_of_image = np.zeros(len(kept), dtype=np.int64)
    rows: list[dict[str, Any]] = []
    for i, (train_idx, val_idx) in enumerate(_folds(kept, k, cfg, fold_of), start=1):
        fit_idx, mon_idx = inner_split(cfg, kept, train_idx)
        fold = run_fold(cfg, images, labels, kept, (fit_idx, mon_idx, val_idx), i)
        p_oof[val_idx], decided[val_idx], fold_of_image[val_idx] = fold.p, fold.decided, i
        rows.append(fold.row)
    summary = summarize(cfg, kept, labels, p_oof, decided, rows)
    summary.update(skipped=len(skipped), wall_time_s=round(time.monotonic() - started, 1))
    artefacts.write_json(cfg.out / SUMMARY, summary)
    root = data.common_root(data.data_folders(cfg.data_dirs))
    _write_predictions(cfg.out / "cv_predictions.csv", root, kept, p_oof, decided, fold_of_image)
    return summary


def _folds(
    samples: list[data.Sample], k: int, cfg: TrainConfig, fold_of: Mapping[str, int] | None
) -> list[tuple[NDArray[np.int64], NDArray[np.int64]]]:
    if fold_of is None:
        return data.folds(samples, k, cfg.seed, cfg.split_by)
    pinned = data.pinned_folds(samples, fold_of)
    if len(pinned) != k:
        raise ConfigError(f"--cv {k}: the pinned folds are {len(pinned)}")
    return pinned


def inner_split(
    cfg: TrainConfig, kept: list[data.Sample], train_idx: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """A fold's training images split again by patient (as ``histod train`` splits): (fitting, monitoring)."""
    index = {s.path: j for j, s in enumerate(kept)}
    inner = data.split([kept[j] for j in train_idx], cfg.val_split, cfg.seed, cfg.split_by)
    return (
        np.array([index[s.path] for s in inner.train], dtype=np.int64),
        np.array([index[s.path] for s in inner.val], dtype=np.int64),
    )


@dataclass(frozen=True)
class Fold:
    row: dict[str, Any]  # the fold's figures, as cv.json lists them
    p: NDArray[np.float64]  # p(malignant) of the held-out images, calibrated, averaged over the views
    decided: NDArray[np.bool_]  # p >= the threshold chosen on the monitoring patients


def run_fold(
    cfg: TrainConfig,
    images: NDArray[np.uint8],
    labels: NDArray[np.int64],
    kept: list[data.Sample],
    parts: tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]],
    i: int,
) -> Fold:
    """Fit on ``parts`` = (fitting, monitoring, held-out) image indices: EarlyStopping, Platt scaling and the
    threshold follow the monitoring images; the held-out ones only score."""
    import keras

    from histod.trainer.fit import fit
    from histod.trainer.model import build_model
    from histod.trainer.score import score

    fit_idx, mon_idx, val_idx = parts
    fold_started = time.monotonic()
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed + i)
    model = build_model(cfg)
    groups = [kept[j].group for j in fit_idx]
    fitted = fit(model, cfg, images[fit_idx], labels[fit_idx], images[mon_idx], labels[mon_idx], groups=groups)
    # Platt and the threshold on the monitoring patients, as histod train fits them on its validation split
    scored = score(model, cfg, (images[mon_idx], labels[mon_idx]), (images[val_idx], labels[val_idx]))
    m = scored.metrics
    row = {
        "fold": i,
        **{key: m[key] for key in (*KEYS, "threshold", "confusion_matrix")},
        "n": len(val_idx),
        "val_patients": len({kept[j].group for j in val_idx}),
        "calibration": {"scale": scored.scale, "shift": scored.calibration["shift"]},
        "epochs": len(fitted.phases),
        "best_epoch": fitted.best_epoch,
        "seconds": round(time.monotonic() - fold_started, 1),
    }
    if cfg.tta > 1:
        row["single_view"] = _single_view(
            cfg, labels[mon_idx], scored.tuning_views[0], labels[val_idx], scored.views[0]
        )
    log.info("cv.fold", **{key: row[key] for key in ("fold", *KEYS, "n")})
    return Fold(row, scored.p, scored.p >= scored.threshold)


def summarize(
    cfg: TrainConfig,
    kept: list[data.Sample],
    labels: NDArray[np.int64],
    p_oof: NDArray[np.float64],
    decided: NDArray[np.bool_],
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """Per fold, mean and standard deviation over folds, and the pooled out-of-fold figures with a 95 % bootstrap
    interval over patients: every image scored by the model that never saw its patient, at its fold's threshold."""
    groups = np.array([s.group for s in kept])
    pooled = metrics(labels, decided.astype(np.float64), 0.5)
    pooled["roc_auc"] = metrics(labels, p_oof, 0.5)["roc_auc"]
    return {
        "k": len(rows),
        "n": len(kept),
        "patients": len(set(groups.tolist())),
        "folds": rows,
        "mean": {key: float(np.mean([r[key] for r in rows])) for key in KEYS},
        "sd": {key: float(np.std([r[key] for r in rows], ddof=1)) for key in KEYS},
        **(
            {"mean_single_view": {key: float(np.mean([r["single_view"][key] for r in rows])) for key in KEYS}}
            if cfg.tta > 1
            else {}
        ),
        "pooled": {key: pooled[key] for key in KEYS},
        "pooled_ci95": bootstrap_ci(labels, p_oof, groups, 0.5, decisions=decided),
        "ece_pooled": expected_calibration_error(labels, p_oof),
        "config": cfg.model_dump(mode="json"),
    }


def _single_view(cfg: TrainConfig, y_mon: Any, p_mon: Any, y_val: Any, p_val: Any) -> dict[str, float]:
    """A fold's figures from its first test-time view alone, thresholded on the monitoring patients' first view."""
    m = metrics(y_val, p_val, decision_threshold(y_mon, p_mon, cfg.threshold, cfg.target_sensitivity))
    return {key: m[key] for key in (*KEYS, "threshold")}


def _write_predictions(path: Path, root: Path, kept: list[data.Sample], p: Any, decided: Any, fold_of: Any) -> None:
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "group", "true", "fold", "p_malignant", "predicted_malignant"])
        for s, pi, di, fi in zip(kept, p.tolist(), decided.tolist(), fold_of.tolist(), strict=True):
            out.writerow([artefacts.relative(s.path, root), s.group, s.label, fi, f"{pi:.6f}", int(di)])
