"""Scoring a fitted model: the one sequence `histod train` and `histod train --cv` share.

    predict the test-time views -> calibrate (Platt) -> choose the threshold -> metrics -> patient bootstrap

Calibration and the threshold are fitted on the *tuning* images; the metrics are those of the *scored* images.
`histod train` tunes and scores on its validation split, and folds the calibration into the model, so that
model.keras and model.tflite output the calibrated p it scored. `histod train --cv` tunes on each fold's
monitoring patients and scores the held-out fold. Each step is logged with its seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from histod import tta
from histod.logs import get_logger
from histod.trainer.config import TrainConfig
from histod.trainer.evaluate import (
    apply_calibration,
    bootstrap_ci,
    calibration_bins,
    decision_threshold,
    expected_calibration_error,
    fit_calibration,
    metrics,
)
from histod.trainer.model import OUTPUT_LAYER

log = get_logger("histod.trainer")

Labelled = tuple[NDArray[np.uint8], NDArray[np.int64]]


@contextmanager
def timed(event: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """Log ``event`` with the seconds its block took, the ``fields`` and whatever the block puts in the dict."""
    started = time.monotonic()
    extra: dict[str, Any] = {}
    yield extra
    log.info(event, seconds=round(time.monotonic() - started, 2), **fields, **extra)


def keras_predict(model: Any, images: NDArray[Any], batch_size: int = 32) -> NDArray[np.float32]:
    """p(malignant) (N,) from the Keras model, inference mode."""
    if len(images) == 0:
        return np.zeros((0,), dtype=np.float32)
    out = model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)
    return np.asarray(out, dtype=np.float32).reshape(-1)


def predict_views(model: Any, images: NDArray[Any], n: int, batch_size: int = 32) -> NDArray[np.float32]:
    """p(malignant) of each of the first ``n`` test-time views (histod.tta), shape (n, N)."""
    return np.stack([keras_predict(model, tta.view(images, i), batch_size) for i in range(n)])


def fold_calibration(model: Any, scale: float, shift: float) -> None:
    """Platt scaling inside the model: sigmoid(w.x + c) becomes sigmoid(scale * (w.x + c) + shift) by scaling the
    last Dense layer's kernel and bias, so model.keras, model.tflite and every server output calibrated p."""
    layer = model.get_layer(OUTPUT_LAYER)
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * scale, bias * scale + shift])


@dataclass
class Scored:
    threshold: float
    rule: str  # how the threshold was chosen
    metrics: dict[str, Any]  # of the scored images at the threshold (evaluate.metrics)
    p: NDArray[np.float64]  # calibrated p of the scored images, the mean over their views
    views: NDArray[np.float64]  # (views, N) calibrated p of the scored images
    tuning_views: NDArray[np.float64]  # (views, N) calibrated p of the tuning images
    calibration: dict[str, Any]  # method, scale, shift, ece, ece_uncalibrated, bins (of the scored images)
    ci95: dict[str, list[float]] | None  # patient-bootstrap intervals, when groups were given

    @property
    def scale(self) -> float:
        return float(self.calibration["scale"])


def threshold_rule(cfg: TrainConfig) -> str:
    if cfg.threshold is not None:
        return "fixed"
    return "max_balanced_accuracy" if cfg.target_sensitivity is None else f"sensitivity>={cfg.target_sensitivity}"


def score(
    model: Any,
    cfg: TrainConfig,
    tuning: Labelled,
    scored: Labelled | None = None,
    groups: NDArray[Any] | None = None,
    *,
    fold: bool = False,
) -> Scored:
    """Calibrate and threshold on ``tuning``, score ``scored`` (None: the tuning images themselves). ``groups``
    (of the scored images) adds 95 % intervals from a bootstrap over them. ``fold`` puts the calibration into
    the model and predicts again, so p is exactly what the saved model outputs."""
    x_tune, y_tune = tuning
    with timed("score.predicted", views=cfg.tta, images=len(x_tune) + (0 if scored is None else len(scored[0]))):
        tune_views = predict_views(model, x_tune, cfg.tta).astype(np.float64)
        held_views = None if scored is None else predict_views(model, scored[0], cfg.tta).astype(np.float64)
    y = y_tune if scored is None else scored[1]
    ece_before = expected_calibration_error(y, (tune_views if held_views is None else held_views).mean(axis=0))
    scale, shift = 1.0, 0.0
    if cfg.calibrate:
        with timed("score.calibrated") as out:
            scale, shift = fit_calibration(y_tune, tune_views)
            if fold:  # the model's own outputs from now on: what model.keras and model.tflite will give
                fold_calibration(model, scale, shift)
                tune_views = predict_views(model, x_tune, cfg.tta).astype(np.float64)
                if scored is not None:
                    held_views = predict_views(model, scored[0], cfg.tta).astype(np.float64)
            else:
                tune_views = apply_calibration(tune_views, scale, shift)
                held_views = None if held_views is None else apply_calibration(held_views, scale, shift)
            out.update(scale=round(scale, 4), shift=round(shift, 4), folded=fold)
    views = tune_views if held_views is None else held_views
    p = views.mean(axis=0)
    threshold = decision_threshold(y_tune, tune_views.mean(axis=0), cfg.threshold, cfg.target_sensitivity)
    ci95 = None
    if groups is not None:
        with timed("score.bootstrapped", groups=len(set(np.asarray(groups).tolist()))):
            ci95 = bootstrap_ci(y, p, groups, threshold)
    return Scored(
        threshold=threshold,
        rule=threshold_rule(cfg),
        metrics=metrics(y, p, threshold),
        p=p,
        views=views,
        tuning_views=tune_views,
        calibration={
            "method": "platt" if cfg.calibrate else "none",
            "scale": scale,
            "shift": shift,
            "ece": expected_calibration_error(y, p),
            "ece_uncalibrated": ece_before,
            "bins": calibration_bins(y, p),
        },
        ci95=ci95,
    )
