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

from histod import LABELS, readers, slides, tiling
from histod.errors import ConfigError, DatasetError, ExportParityError, ImageError
from histod.logs import get_logger
from histod.runs import CONFIG_FILE, KERAS_FILE, MODEL_INFO, TFLITE_FILE, RunInfo, load_run
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
    def train_groups(self) -> list[str]:
        return [s.group for s in self.split.train]

    @property
    def val_groups(self) -> NDArray[Any]:
        return np.array([s.group for s in self.split.val])


def _load_images(cfg: TrainConfig, found: list[data.Sample], val_patients: set[str] | None) -> _Images:
    folders = [str(d) for d in cfg.data_dirs]
    log.info("dataset.found", data_dir=folders if len(folders) > 1 else folders[0], **data.counts(found))
    images, labels, kept, skipped = data.load_images(found, cfg.image_size)
    _log_skipped(skipped)
    for label, name in enumerate(data.CLASS_DIRS):
        if not np.any(labels == label):
            raise DatasetError(f"no readable {name} images in {', '.join(folders)} ({len(skipped)} unreadable files)")
    split = data.split(kept, cfg.val_split, cfg.seed, cfg.split_by, val_patients)
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
        root = data.common_root(data.data_folders(cfg.data_dirs))  # split.csv names images relative to it
        artefacts.write_split(run / "split.csv", root, {"train": imgs.split.train, "val": imgs.split.val}, imgs.skipped)
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


def _finish(
    cfg: TrainConfig, imgs: _Images, record: dict[str, Any], scored: Scored, parity: Parity, started: float
) -> None:
    """model.json (with the model's scale: --tile-px, or the training images' median side), then metrics.json
    complete; the checkpoint goes: the run is done."""
    from histod.trainer.export import write_run_info

    info = write_run_info(
        cfg.out,
        image_size=cfg.image_size,
        threshold=scored.threshold,
        alpha=cfg.alpha,
        tta_views=cfg.tta,
        calibration=(scored.scale, float(scored.calibration["shift"])),
        parity=parity.status,
        tile_px=cfg.tile_px or tiling.native_side(s.path for s in imgs.split.train),
        tile_mpp=cfg.tile_mpp,
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


def train(
    cfg: TrainConfig, *, resume: bool = False, on_epoch: Callable[[int, int], None] | None = None
) -> Path:
    """Train, score and export one model into cfg.out; return it. With ``resume``, go on from the checkpoint an
    interrupted run left in cfg.out (its config.json is the caller's to load). ``on_epoch(done, at_most)`` is
    told after each epoch. Raises ExportParityError, after the whole run is written and marked, when
    model.tflite disagrees with model.keras."""
    started = time.monotonic()
    # Fail fast, before anything slow: a bad folder, too few images or patients, a used RUN_DIR, unusable weights.
    found = data.discover_all(cfg.data_dirs, cfg.group_pattern)
    pinned = data.read_patients(cfg.val_patients) if cfg.val_patients is not None else None
    # a dry run; the real one leaves out unreadable files
    data.split(found, cfg.val_split, cfg.seed, cfg.split_by, pinned)
    _check_out(cfg.out, resume)
    import keras

    from histod.trainer.fit import fit
    from histod.trainer.model import build_model
    from histod.trainer.score import score

    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    cfg.save(cfg.out)
    imgs = _load_images(cfg, found, pinned)
    fitted = fit(
        model,
        cfg,
        imgs.x_train,
        imgs.y_train,
        imgs.x_val,
        imgs.y_val,
        cfg.out / CHECKPOINT_FILE,
        groups=imgs.train_groups,
        on_epoch=on_epoch,
    )
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
    _finish(cfg, imgs, record, scored, parity, started)
    if not parity.passed:
        raise ExportParityError(
            f"the LiteRT export disagrees with the Keras model: {parity.problem()}. The run in {cfg.out} is complete "
            f"and marked (model.json parity: failed): compare `histod evaluate --model {cfg.out} DATA_DIR` with its "
            "metrics.json, then serve it with --allow-parity-failure or --engine keras, or train it again"
        )
    return cfg.out


# --- using a trained run ---------------------------------------------------------------------------------------


class Scorer(Protocol):
    """What scoring needs from a loaded model: histod.daemon.classifier.Classifier (the CLI passes the service's
    classifier, so `histod evaluate` and `histod predict` score exactly as `histod serve` classifies). ``run`` is its
    model.json, whose tile_px and tile_mpp say which images are cut into tiles (histod.tiling)."""

    image_size: int
    threshold: float
    run: RunInfo

    def predict(self, batch: NDArray[Any]) -> NDArray[np.float32]: ...


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
    p_malignant: float | None  # None when the image could not be read; a tiled image's rule score
    label: str | None
    error: ImageError | None = None
    tiled: tiling.TiledResult | None = None  # an image cut into tiles: p_malignant is its rule's score
    warnings: tuple[str, ...] = ()


def expand(paths: Sequence[Path]) -> list[Path]:
    """Files as given; folders become their image and slide files (recursively, sorted). A missing path stays in
    the list, so that it gets its own error line."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and (data.is_image(p) or readers.is_slide(p)))
        else:
            out.append(path)
    return out


def predict_paths(scorer: Scorer, paths: Sequence[Path], batch_size: int = 32) -> Iterator[Prediction]:
    """Classify image files and folders; an unreadable file yields a Prediction with ``error`` set, never raises.
    An image of about the model's training tiles is classified whole (batched); a much larger one (a field, a
    slide) tile by tile (histod.slides.classify)."""
    scale = tiling.Scale(scorer.image_size, scorer.threshold, scorer.run.tile_px, scorer.run.tile_mpp)
    files = expand(paths)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        decoded: list[tuple[Path, slides.Whole | tiling.TiledResult | ImageError]] = []
        for path in chunk:
            try:
                with readers.open_reader(path) as reader:
                    decoded.append((path, slides.classify(reader, scorer.predict, scale)))
            except ImageError as exc:
                decoded.append((path, exc))
        good = [r.image for _, r in decoded if isinstance(r, slides.Whole)]
        probs = iter(scorer.predict(np.stack(good)).tolist() if good else [])
        for path, r in decoded:
            if isinstance(r, ImageError):
                yield Prediction(path, None, None, r)
            elif isinstance(r, tiling.TiledResult):
                yield Prediction(path, r.aggregate.score, r.label, tiled=r, warnings=r.warnings)
            else:
                p = float(next(probs))
                yield Prediction(path, p, LABELS[int(p >= scorer.threshold)], warnings=r.warnings)


def evaluate_folder(
    run_dir: Path,
    data_dir: Path,
    scorer: Scorer,
    out: Path | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score a labelled folder (benign/, malignant/) with the run's model (``scorer``), each image as `histod
    predict` classifies it: images of about the model's tiles by p at the stored threshold; a folder of larger
    images (fields, slides), each tiled, by its rule's score at the rule's cut (``tiled``, ``rule`` in the
    result). A folder holding both is refused: a tile's p and a tiled image's score are not one scale. 95 %
    intervals come from a bootstrap over patients, grouped by the run's own group_pattern, as in training.

    Files are written only when ``out`` is given: metrics.json (with ``ci95``), classification_report.txt,
    predictions.csv, and the plots confusion_matrix.png, roc_curve.png, pr_curve.png and reliability.png.
    ``progress(done, total)`` is called after each image scored.
    """
    from histod.trainer.evaluate import bootstrap_ci, calibration_bins, expected_calibration_error

    info = load_run(run_dir)
    samples = data.discover(data_dir, _group_pattern(run_dir))
    kept: list[data.Sample] = []
    skipped: list[data.Skipped] = []
    scores: list[float] = []
    tiled: list[tuple[Path, str]] = []  # (path, rule)
    warnings: list[dict[str, str]] = []
    threshold = scorer.threshold  # a tiled image's rule cut when the folder's images are tiled
    predictions = predict_paths(scorer, [s.path for s in samples])
    for done, (sample, pred) in enumerate(zip(samples, predictions, strict=True), start=1):
        if progress is not None:
            progress(done, len(samples))
        warnings += [{"path": str(pred.path), "warning": w} for w in pred.warnings]
        if pred.error is not None:
            skipped.append(data.Skipped(pred.path, pred.error.reason, str(pred.error.args[0])))
            continue
        assert pred.p_malignant is not None
        kept.append(sample)
        scores.append(pred.p_malignant)
        if pred.tiled is not None:
            tiled.append((pred.path, pred.tiled.aggregate.rule))
            threshold = pred.tiled.aggregate.cut
    _log_skipped(skipped)
    if not kept:
        raise DatasetError(f"no readable images in {data_dir}")
    if tiled and len(tiled) < len(kept):
        whole = next(s.path for s in kept if s.path not in {path for path, _ in tiled})
        raise DatasetError(
            f"{data_dir} mixes images of about the model's tile size ({len(kept) - len(tiled)}, such as {whole}) "
            f"with larger images that are tiled ({len(tiled)}, such as {tiled[0][0]}): a tile's p and a tiled "
            "image's score are not on one scale; evaluate them from separate folders"
        )
    labels = np.array([s.label for s in kept], dtype=np.int64)
    p = np.array(scores, dtype=np.float64)
    result = metrics(labels, p, threshold)
    groups = [s.group for s in kept]
    n_groups = len(set(groups))
    both_classes = len(set(labels.tolist())) == 2
    bins = calibration_bins(labels, p)
    result.update(
        run_id=info.run_id,
        run_dir=str(run_dir),
        data_dir=str(data_dir),
        groups=n_groups,
        # one patient gives nothing to resample; two classes are needed for every figure
        ci95=bootstrap_ci(labels, p, groups, threshold) if n_groups > 1 and both_classes else None,
        ece=expected_calibration_error(labels, p),
        tiled=len(tiled),
        rule=tiled[0][1] if tiled else None,
        skipped=[{"path": str(s.path), "reason": s.reason, "message": s.message} for s in skipped],
        warnings=warnings,
    )
    if out is not None:
        title = f"{data_dir.name} ({info.run_id})"
        out.mkdir(parents=True, exist_ok=True)
        artefacts.write_json(out / "metrics.json", {**result, "calibration_bins": bins})
        (out / "classification_report.txt").write_text(report_text(labels, p, threshold))
        artefacts.plot_confusion(out / "confusion_matrix.png", result["confusion_matrix"], LABELS, title)
        if both_classes:
            artefacts.plot_roc_pr(out / "roc_curve.png", out / "pr_curve.png", labels, p, threshold, title)
        artefacts.plot_reliability(out / "reliability.png", bins, f"{title}, ECE {result['ece']:.3f}")
        artefacts.write_predictions(out / "predictions.csv", data_dir, kept, p.tolist(), threshold)
    return result
