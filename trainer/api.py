"""What the CLI (and other code) calls: train(cfg) -> RUN_DIR, evaluate_folder(...), predict_paths(...).

train() reads top to bottom: check -> build -> load and split the images -> fit -> score -> write the run ->
export model.tflite and check it against model.keras -> model.json. Everything a run is made of is on disk
before the one check that can still fail after training (the export's parity): a run that fails it is complete
and marked, not thrown away. After every epoch the fitting state is in RUN_DIR/checkpoint.npz, so an
interrupted run goes on with `histod train ... --resume` (train(cfg, resume=True)).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from histod import LABELS, imaging
from histod.errors import ConfigError, DatasetError, ExportParityError, ImageError
from histod.logs import get_logger
from histod.runs import CONFIG_FILE, KERAS_FILE, MODEL_INFO, TFLITE_FILE, load_run
from histod.trainer import artefacts, data
from histod.trainer.checkpoint import CHECKPOINT_FILE
from histod.trainer.config import TrainConfig
from histod.trainer.evaluate import metrics, report_text

if TYPE_CHECKING:
    from histod.trainer.export import Parity
    from histod.trainer.fit import FitResult
    from histod.trainer.score import Scored

log = get_logger("histod.trainer")


def _log_skipped(skipped: Sequence[data.Skipped]) -> None:
    for s in skipped:
        log.warning("image.skipped", path=str(s.path), reason=s.reason, error=s.message)
    if skipped:
        log.warning("images.skipped", count=len(skipped))


# --- train: the steps, in order ----------------------------------------------------------------------------------


def _check_out(out: Path, resume: bool) -> None:
    """A new run needs a folder without one; a resumed run needs the folder of an unfinished one."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    interrupted = (out / CHECKPOINT_FILE).exists()
    complete = (out / MODEL_INFO).exists() and not interrupted
    if resume:
        if complete:
            raise ConfigError(f"--out {out} holds a finished run: there is nothing to resume")
        if not (out / CONFIG_FILE).is_file():
            raise ConfigError(f"--out {out} holds no run to resume (no {CONFIG_FILE})")
    elif interrupted:
        raise ConfigError(
            f"--out {out} holds an interrupted run: add --resume to go on with it, or choose a new folder"
        )
    elif complete or (out / KERAS_FILE).exists():
        raise ConfigError(f"--out {out} already holds a trained run; choose a new folder")


@dataclass
class _Images:
    """The decoded images and their split: what fitting and scoring read."""

    found: list[data.Sample]
    skipped: list[data.Skipped]
    split: data.Split
    x_train: NDArray[np.uint8]
    y_train: NDArray[np.int64]
    x_val: NDArray[np.uint8]
    y_val: NDArray[np.int64]

    @property
    def val_groups(self) -> NDArray[Any]:
        return np.array([s.group for s in self.split.val])


def _load_images(cfg: TrainConfig, found: list[data.Sample]) -> _Images:
    log.info("dataset.found", data_dir=str(cfg.data_dir), **data.counts(found))
    images, labels, kept, skipped = data.load_images(found, cfg.image_size)
    _log_skipped(skipped)
    for label, name in enumerate(data.CLASS_DIRS):
        if not np.any(labels == label):
            raise DatasetError(f"no readable {name} images in {cfg.data_dir} ({len(skipped)} unreadable files)")
    split = data.split(kept, cfg.val_split, cfg.seed, cfg.split_by)
    index = {s.path: i for i, s in enumerate(kept)}
    train_idx = np.array([index[s.path] for s in split.train])
    val_idx = np.array([index[s.path] for s in split.val])
    log.info("split.made", train=data.counts(split.train), val=data.counts(split.val), skipped=len(skipped))
    return _Images(found, list(skipped), split, images[train_idx], labels[train_idx], images[val_idx], labels[val_idx])


def _record(cfg: TrainConfig, imgs: _Images, fitted: FitResult, scored: Scored) -> dict[str, Any]:
    """metrics.json's content, all but what the export adds (parity, run_id, sha256, wall time)."""
    split = imgs.split
    return {
        **scored.metrics,
        "split": "validation",
        "split_by": cfg.split_by,
        "threshold_rule": scored.rule,
        "ci95": scored.ci95,
        "tta": cfg.tta,
        "ece": scored.calibration["ece"],
        "calibration": scored.calibration,
        "best_epoch": fitted.best_epoch,
        "epochs_run": len(fitted.phases),
        "stopped_early": fitted.stopped_early,
        "resumed": fitted.resumed,
        "history": {**fitted.history, "phase": fitted.phases},
        "counts": {
            "train": data.counts(split.train),
            "val": data.counts(split.val),
            "found": data.counts(imgs.found),
            "skipped": len(imgs.skipped),
        },
        "groups": {"train": len({s.group for s in split.train}), "val": len({s.group for s in split.val})},
        "skipped": [{"path": str(s.path), "reason": s.reason, "message": s.message} for s in imgs.skipped],
        "seed": cfg.seed,
        "versions": artefacts.versions(),
        "config": cfg.model_dump(mode="json"),
    }


def _write_run(
    model: Any, cfg: TrainConfig, imgs: _Images, fitted: FitResult, scored: Scored, record: dict[str, Any]
) -> None:
    """Everything but model.tflite and model.json: model.keras, metrics.json, reports, plots, split.csv."""
    from histod.trainer.export import save_keras
    from histod.trainer.score import timed

    run = cfg.out
    with timed("export.saved", path=str(run / KERAS_FILE)):
        save_keras(model, run)
    with timed("artefacts.written", run_dir=str(run)):
        artefacts.write_metrics(run, {**record, "status": "exporting"})
        (run / "classification_report.txt").write_text(report_text(imgs.y_val, scored.p, scored.threshold))
        (run / "model_summary.txt").write_text(artefacts.model_summary(model))
        artefacts.write_split(
            run / "split.csv", cfg.data_dir, {"train": imgs.split.train, "val": imgs.split.val}, imgs.skipped
        )
        matrix = scored.metrics["confusion_matrix"]
        artefacts.plot_confusion(
            run / "confusion_matrix.png", matrix, LABELS, f"validation (threshold {scored.threshold:.3f})"
        )
        artefacts.plot_curves(run / "training_curves.png", fitted.history, fitted.phases, fitted.best_epoch)
        platt = f" (Platt {scored.scale:.2f}, {scored.calibration['shift']:+.2f})" if cfg.calibrate else ""
        artefacts.plot_reliability(
            run / "reliability_diagram.png",
            scored.calibration["bins"],
            f"validation: ECE {scored.calibration['ece']:.3f}{platt}",
        )


def _export(model: Any, cfg: TrainConfig, imgs: _Images, scored: Scored) -> Parity:
    """model.tflite, and how far it agrees with model.keras on the validation images (export.Parity)."""
    from histod.trainer.export import check_parity, litert_p, save_tflite
    from histod.trainer.score import timed

    with timed("export.converted", path=str(cfg.out / TFLITE_FILE)):
        path = save_tflite(model, cfg.out)
    with timed("export.parity") as out:
        parity = check_parity(scored.p, litert_p(path, imgs.x_val, cfg.tta), scored.threshold, scored.scale)
        out.update(parity.record())
    return parity


def _finish(cfg: TrainConfig, record: dict[str, Any], scored: Scored, parity: Parity, started: float) -> None:
    """model.json, then metrics.json complete; the checkpoint goes: the run is done."""
    from histod.trainer.export import write_run_info

    info = write_run_info(
        cfg.out,
        image_size=cfg.image_size,
        threshold=scored.threshold,
        alpha=cfg.alpha,
        tta_views=cfg.tta,
        calibration=(scored.scale, float(scored.calibration["shift"])),
        parity=parity.status,
    )
    wall = round(time.monotonic() - started, 1)
    artefacts.write_metrics(
        cfg.out,
        {
            **record,
            "status": "complete" if parity.passed else "parity_failed",
            "parity": parity.record(),
            "run_id": info.run_id,
            "sha256": {KERAS_FILE: info.keras_sha256, TFLITE_FILE: info.tflite_sha256},
            "wall_time_s": wall,
        },
    )
    (cfg.out / CHECKPOINT_FILE).unlink(missing_ok=True)
    log.info("run.written", run_dir=str(cfg.out), status=parity.status, wall_time_s=wall)


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Train, score and export one model into cfg.out; return it. With ``resume``, go on from the checkpoint an
    interrupted run left in cfg.out (its config.json is the caller's to load). Raises ExportParityError, after
    the whole run is written and marked, when model.tflite disagrees with model.keras."""
    started = time.monotonic()
    # Fail fast, before anything slow: a bad folder, too few images or patients, a used RUN_DIR, unusable weights.
    found = data.discover(cfg.data_dir, cfg.group_pattern)
    data.split(found, cfg.val_split, cfg.seed, cfg.split_by)  # a dry run; the real one leaves out unreadable files
    _check_out(cfg.out, resume)
    import keras

    from histod.trainer.fit import fit
    from histod.trainer.model import build_model
    from histod.trainer.score import score

    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    cfg.save(cfg.out)
    imgs = _load_images(cfg, found)
    fitted = fit(model, cfg, imgs.x_train, imgs.y_train, imgs.x_val, imgs.y_val, cfg.out / CHECKPOINT_FILE)
    scored = score(model, cfg, (imgs.x_val, imgs.y_val), groups=imgs.val_groups, fold=True)
    m = scored.metrics
    log.info(
        "validation.scored",
        **{k: m[k] for k in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity", "threshold")},
        ece=round(scored.calibration["ece"], 4),
        calibration=f"{scored.scale:.3f} {scored.calibration['shift']:+.3f}",
    )
    record = _record(cfg, imgs, fitted, scored)
    _write_run(model, cfg, imgs, fitted, scored, record)
    parity = _export(model, cfg, imgs, scored)
    _finish(cfg, record, scored, parity, started)
    if not parity.passed:
        raise ExportParityError(
            f"the LiteRT export disagrees with the Keras model: {parity.problem()}. The run in {cfg.out} is complete "
            f"and marked (model.json parity: failed): compare `histod evaluate --model {cfg.out} DATA_DIR` with its "
            "metrics.json, then serve it with --allow-parity-failure or --engine keras, or train it again"
        )
    return cfg.out


# --- using a trained run ---------------------------------------------------------------------------------------


class Scorer(Protocol):
    """What scoring needs from a loaded model: histod.daemon.engine.Engine (the CLI passes the service's engine,
    so `histod evaluate` and `histod predict` score exactly as `histod serve` classifies)."""

    image_size: int
    threshold: float

    def predict(self, batch: NDArray[Any]) -> NDArray[np.float32]: ...


def evaluate_folder(
    run_dir: Path,
    data_dir: Path,
    scorer: Scorer,
    out: Path | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Score a labelled folder (benign/, malignant/) with the run's model (``scorer``) and its stored threshold,
    with 95 % intervals from a bootstrap over patients (grouped by the run's own group_pattern, as in training).

    Files are written only when ``out`` is given: metrics.json (with ``ci95``), classification_report.txt,
    predictions.csv, and the plots confusion_matrix.png, roc_curve.png, pr_curve.png and reliability.png.
    ``progress(done, total)`` is called after each batch of images scored.
    """
    from histod.trainer.evaluate import bootstrap_ci, calibration_bins, expected_calibration_error

    info = load_run(run_dir)
    samples = data.discover(data_dir, _group_pattern(run_dir))
    images, labels, kept, skipped = data.load_images(samples, scorer.image_size)
    _log_skipped(skipped)
    if len(kept) == 0:
        raise DatasetError(f"no readable images in {data_dir}")
    chunks: list[NDArray[np.float32]] = []
    for start in range(0, len(images), batch_size):
        chunks.append(np.asarray(scorer.predict(images[start : start + batch_size]), dtype=np.float32).ravel())
        if progress is not None:
            progress(min(start + batch_size, len(images)), len(images))
    p = np.concatenate(chunks)
    result = metrics(labels, p, scorer.threshold)
    groups = [s.group for s in kept]
    n_groups = len(set(groups))
    bins = calibration_bins(labels, p)
    result.update(
        run_id=info.run_id,
        run_dir=str(run_dir),
        data_dir=str(data_dir),
        groups=n_groups,
        # one patient gives nothing to resample; two classes are needed for every figure
        ci95=bootstrap_ci(labels, p, groups, scorer.threshold)
        if n_groups > 1 and len(set(labels.tolist())) == 2
        else None,
        ece=expected_calibration_error(labels, p),
        skipped=[{"path": str(s.path), "reason": s.reason, "message": s.message} for s in skipped],
    )
    if out is not None:
        title = f"{data_dir.name} ({info.run_id})"
        out.mkdir(parents=True, exist_ok=True)
        artefacts.write_json(out / "metrics.json", {**result, "calibration_bins": bins})
        (out / "classification_report.txt").write_text(report_text(labels, p, scorer.threshold))
        artefacts.plot_confusion(out / "confusion_matrix.png", result["confusion_matrix"], LABELS, title)
        if len(set(labels.tolist())) == 2:
            artefacts.plot_roc_pr(out / "roc_curve.png", out / "pr_curve.png", labels, p, scorer.threshold, title)
        artefacts.plot_reliability(out / "reliability.png", bins, f"{title}, ECE {result['ece']:.3f}")
        artefacts.write_predictions(out / "predictions.csv", data_dir, kept, p.tolist(), scorer.threshold)
    return result


def _group_pattern(run_dir: Path) -> str | None:
    """The patient pattern the run was trained with (its config.json), so that evaluation groups as training
    did; None (the built-in patterns) when the run does not say."""
    import json

    try:
        config = json.loads((run_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    pattern = config.get("group_pattern") if isinstance(config, dict) else None
    return pattern if isinstance(pattern, str) else None


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


def predict_paths(scorer: Scorer, paths: Sequence[Path], batch_size: int = 32) -> Iterator[Prediction]:
    """Classify image files and folders; an unreadable file yields a Prediction with ``error`` set, never raises."""
    files = expand(paths)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        decoded: list[tuple[Path, NDArray[np.uint8] | ImageError]] = []
        for path in chunk:
            try:
                decoded.append((path, imaging.load(path, scorer.image_size)))
            except ImageError as exc:
                decoded.append((path, exc))
        good = [img for _, img in decoded if not isinstance(img, ImageError)]
        probs = iter(scorer.predict(np.stack(good)).tolist() if good else [])
        for path, img in decoded:
            if isinstance(img, ImageError):
                yield Prediction(path, None, None, img)
            else:
                p = float(next(probs))
                yield Prediction(path, p, LABELS[int(p >= scorer.threshold)])
