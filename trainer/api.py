"""What the CLI (and other code) calls: train(cfg) -> RUN_DIR, evaluate_folder(run_dir, data_dir), predict_paths.

train() reads top to bottom: find data -> build -> decode -> split -> fit -> score -> export -> write artefacts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from histod import LABELS, imaging
from histod.errors import ConfigError, DatasetError, ImageError, ModelError
from histod.logs import get_logger
from histod.runs import KERAS_FILE, MODEL_INFO, TFLITE_FILE, load_run
from histod.trainer import artefacts, data
from histod.trainer.config import TrainConfig
from histod.trainer.evaluate import (
    bootstrap_ci,
    calibration_bins,
    decision_threshold,
    expected_calibration_error,
    fit_calibration,
    metrics,
    report_text,
)

log = get_logger("histod.trainer")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if (out / MODEL_INFO).exists() or (out / KERAS_FILE).exists():
        raise ConfigError(f"--out {out} already holds a trained run; choose a new folder")


def _log_skipped(skipped: Sequence[data.Skipped]) -> None:
    for s in skipped:
        log.warning("image_skipped", path=str(s.path), reason=s.reason, error=s.message)
    if skipped:
        log.warning("images_skipped", count=len(skipped))


def train(cfg: TrainConfig) -> Path:
    """Train, evaluate and export one model; return the run directory (cfg.out)."""
    started = time.monotonic()
    # Fail fast, before anything slow: a bad folder, too few images or patients, a used RUN_DIR, unusable weights.
    samples = data.discover_all(cfg.data_dirs, cfg.group_pattern)
    pinned = data.read_patients(cfg.val_patients) if cfg.val_patients is not None else None
    # a dry run; the real one leaves out unreadable files
    data.split(samples, cfg.val_split, cfg.seed, cfg.split_by, pinned)
    _check_out(cfg.out)
    import keras

    from histod.trainer.export import export, fold_calibration, parity_allowance, predict_views, write_run_info
    from histod.trainer.fit import fit
    from histod.trainer.model import build_model

    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    cfg.save(cfg.out)
    log.info("dataset", data_dir=[str(d) for d in cfg.data_dirs], **data.counts(samples))

    images, labels, kept, skipped = data.load_images(samples, cfg.image_size)
    _log_skipped(skipped)
    for label, name in enumerate(data.CLASS_DIRS):
        if not np.any(labels == label):
            raise DatasetError(f"no readable {name} images ({len(skipped)} unreadable files)")
    split = data.split(kept, cfg.val_split, cfg.seed, cfg.split_by, pinned)
    index = {s.path: i for i, s in enumerate(kept)}
    train_idx = np.array([index[s.path] for s in split.train])
    val_idx = np.array([index[s.path] for s in split.val])
    x_train, y_train = images[train_idx], labels[train_idx]
    x_val, y_val = images[val_idx], labels[val_idx]
    log.info("split", train=data.counts(split.train), val=data.counts(split.val), skipped=len(skipped))

    result = fit(model, cfg, x_train, y_train, x_val, y_val, [s.group for s in split.train])

    p_views = predict_views(model, x_val, cfg.tta)  # (views, N); one view unless cfg.tta
    ece_uncalibrated = expected_calibration_error(y_val, p_views.mean(axis=0))
    scale, shift = 1.0, 0.0
    if cfg.calibrate:
        scale, shift = fit_calibration(y_val, p_views)
        fold_calibration(model, scale, shift)
        p_views = predict_views(model, x_val, cfg.tta)
    p_val = p_views.mean(axis=0)
    threshold = decision_threshold(y_val, p_val, cfg.threshold, cfg.target_sensitivity)
    scores = metrics(y_val, p_val, threshold)
    val_groups = np.array([s.group for s in split.val])
    ci = bootstrap_ci(y_val, p_val, val_groups, threshold)
    calibration: dict[str, Any] = {
        "ece": expected_calibration_error(y_val, p_val),
        "ece_uncalibrated": ece_uncalibrated,
        "method": "platt" if cfg.calibrate else "none",
        "scale": scale,
        "shift": shift,
        "bins": calibration_bins(y_val, p_val),
    }
    log.info(
        "validation",
        **{k: scores[k] for k in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")},
        ece=round(calibration["ece"], 4),
        calibration=f"{scale:.3f} {shift:+.3f}",
    )

    diff, n_checked = export(model, cfg.out, x_val, calibration_scale=scale)
    info = write_run_info(
        cfg.out,
        image_size=cfg.image_size,
        threshold=threshold,
        alpha=cfg.alpha,
        tta_views=cfg.tta,
        calibration=(scale, shift),
    )

    run = cfg.out
    rule = (
        "fixed"
        if cfg.threshold is not None
        else "max_balanced_accuracy"
        if cfg.target_sensitivity is None
        else f"sensitivity>={cfg.target_sensitivity}"
    )
    artefacts.write_metrics(
        run,
        {
            **scores,
            "split": "validation",
            "split_by": cfg.split_by,
            "threshold_rule": rule,
            "ci95": ci,
            "tta": cfg.tta,
            "ece": calibration["ece"],
            "calibration": calibration,
            "run_id": info.run_id,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.phases),
            "stopped_early": result.stopped_early,
            "history": {**result.history, "phase": result.phases},
            "counts": {
                "train": data.counts(split.train),
                "val": data.counts(split.val),
                "found": data.counts(samples),
                "skipped": len(skipped),
            },
            "groups": {"train": len({s.group for s in split.train}), "val": len({s.group for s in split.val})},
            "skipped": [{"path": str(s.path), "reason": s.reason, "message": s.message} for s in skipped],
            "seed": cfg.seed,
            "versions": artefacts.versions(),
            "sha256": {KERAS_FILE: info.keras_sha256, TFLITE_FILE: info.tflite_sha256},
            "parity": {"max_abs_diff": diff, "images": n_checked, "tolerance": parity_allowance(scale)},
            "wall_time_s": round(time.monotonic() - started, 1),
            "config": cfg.model_dump(mode="json"),
        },
    )
    (run / "classification_report.txt").write_text(report_text(y_val, p_val, threshold))
    (run / "model_summary.txt").write_text(artefacts.model_summary(model))
    root = data.common_root(data.data_folders(cfg.data_dirs))
    artefacts.write_split(run / "split.csv", root, {"train": split.train, "val": split.val}, skipped)
    artefacts.plot_confusion(
        run / "confusion_matrix.png", scores["confusion_matrix"], LABELS, f"validation (threshold {threshold:.3f})"
    )
    artefacts.plot_curves(run / "training_curves.png", result.history, result.phases, result.best_epoch)
    title = f"validation: ECE {calibration['ece']:.3f}" + (
        f" (Platt {scale:.2f}, {shift:+.2f})" if cfg.calibrate else ""
    )
    artefacts.plot_reliability(run / "reliability_diagram.png", calibration["bins"], title)
    log.info("run_written", run_dir=str(run), wall_time_s=round(time.monotonic() - started, 1))
    return run


# --- using a trained run ---------------------------------------------------------------------------------------


class Scorer(Protocol):
    """What scoring needs from a loaded model; histod.daemon.engine.Engine fits, and so does trainer.litert."""

    image_size: int
    threshold: float

    def predict(self, batch: NDArray[Any]) -> NDArray[np.float32]: ...


def load_scorer(run_dir: Path) -> Scorer:
    """The run's model.tflite through the trainer's own LiteRT helper (the trainer never imports the daemon)."""
    from histod.trainer.litert import LiteRTModel

    info = load_run(run_dir)
    path = run_dir / TFLITE_FILE
    if not path.is_file():
        raise ModelError(f"{run_dir} has no {TFLITE_FILE}")
    model = LiteRTModel(path)
    if model.image_size != info.image_size:
        raise ModelError(f"{path} takes {model.image_size} px input; {MODEL_INFO} says {info.image_size}")
    model.threshold = info.threshold
    model.tta = info.tta
    return model


def evaluate_folder(
    run_dir: Path, data_dir: Path, out: Path | None = None, scorer: Scorer | None = None
) -> dict[str, Any]:
    """Score a labelled folder (benign/, malignant/) with the run's model and its stored threshold.

    ``scorer`` defaults to the run's LiteRT model. Files are written only when ``out`` is given:
    metrics.json, classification_report.txt, confusion_matrix.png and predictions.csv.
    """
    info = load_run(run_dir)
    model = scorer if scorer is not None else load_scorer(run_dir)
    samples = data.discover(data_dir)
    images, labels, kept, skipped = data.load_images(samples, model.image_size)
    _log_skipped(skipped)
    if len(kept) == 0:
        raise DatasetError(f"no readable images in {data_dir}")
    p = model.predict(images)
    result = metrics(labels, p, model.threshold)
    result.update(
        run_id=info.run_id,
        run_dir=str(run_dir),
        data_dir=str(data_dir),
        skipped=[{"path": str(s.path), "reason": s.reason, "message": s.message} for s in skipped],
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        artefacts.write_json(out / "metrics.json", result)
        (out / "classification_report.txt").write_text(report_text(labels, p, model.threshold))
        artefacts.plot_confusion(
            out / "confusion_matrix.png", result["confusion_matrix"], LABELS, f"{data_dir.name} ({info.run_id})"
        )
        artefacts.write_predictions(out / "predictions.csv", data_dir, kept, p.tolist(), model.threshold)
    return result


@dataclass(frozen=True)
class Prediction:
    path: Path
    p_malignant: float | None  # None when the image could not be read
    label: str | None
    error: ImageError | None = None


def expand(paths: Sequence[Path]) -> list[Path]:
    """Files as given; folders become their image files (recursively, sorted). A missing path stays in the
    list, so that it gets its own error line."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and data.is_image(p))
        else:
            out.append(path)
    return out


def predict_paths(
    run_dir: Path, paths: Sequence[Path], scorer: Scorer | None = None, batch_size: int = 32
) -> Iterator[Prediction]:
    """Classify image files and folders; an unreadable file yields a Prediction with ``error`` set, never raises."""
    model = scorer if scorer is not None else load_scorer(run_dir)
    files = expand(paths)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        decoded: list[tuple[Path, NDArray[np.uint8] | ImageError]] = []
        for path in chunk:
            try:
                decoded.append((path, imaging.load(path, model.image_size)))
            except ImageError as exc:
                decoded.append((path, exc))
        good = [img for _, img in decoded if not isinstance(img, ImageError)]
        probs = iter(model.predict(np.stack(good)).tolist() if good else [])
        for path, img in decoded:
            if isinstance(img, ImageError):
                yield Prediction(path, None, None, img)
            else:
                p = float(next(probs))
                yield Prediction(path, p, LABELS[int(p >= model.threshold)])
