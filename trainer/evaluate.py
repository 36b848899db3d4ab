"""Scoring, separate from fitting: pure functions of labels and p(malignant). Malignant is the positive class."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from histod import LABELS

METRIC_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "roc_auc",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
)


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def metrics(y_true: ArrayLike, p: ArrayLike, threshold: float) -> dict[str, Any]:
    """Accuracy, balanced accuracy, ROC AUC (None with one class only), sensitivity, specificity, precision, F1,
    the confusion matrix ``[[tn, fp], [fn, tp]]`` (rows true benign/malignant), counts and the threshold."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(np.int64).ravel()
    prob = np.asarray(p, dtype=np.float64).ravel()
    pred = (prob >= threshold).astype(np.int64)
    tp = int(np.sum((pred == 1) & (y == 1)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    precision = _ratio(tp, tp + fp)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    auc: float | None = float(roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else None
    return {
        "accuracy": _ratio(tp + tn, y.size),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "roc_auc": auc,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": precision,
        "f1": f1,
        "threshold": float(threshold),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "labels": list(LABELS),
        "n": int(y.size),
        "n_benign": int(np.sum(y == 0)),
        "n_malignant": int(np.sum(y == 1)),
    }


def choose_threshold(y_true: ArrayLike, p: ArrayLike, target_sensitivity: float | None = None) -> float:
    """The decision threshold on p(malignant), chosen on validation data.

    Default: the threshold that maximises balanced accuracy (ties: the one closest to 0.5). With
    ``target_sensitivity``: the highest threshold whose sensitivity reaches the target (fewest false alarms).
    The value returned is the midpoint between neighbouring scores, so it is robust to tiny numeric changes
    (e.g. Keras vs LiteRT).
    """
    y = np.asarray(y_true).astype(np.int64).ravel()
    prob = np.asarray(p, dtype=np.float64).ravel()
    if y.size == 0 or len(np.unique(y)) < 2:
        return 0.5
    candidates = _candidates(prob)
    if target_sensitivity is not None:
        positives = prob[y == 1]
        ok = [t for t in candidates if np.mean(positives >= t) >= target_sensitivity - 1e-12]
        return float(max(ok)) if ok else float(min(candidates))
    best, best_score = 0.5, -math.inf
    for t in candidates:
        pred = prob >= t
        score = (np.mean(pred[y == 1]) + np.mean(~pred[y == 0])) / 2
        if score > best_score + 1e-12 or (abs(score - best_score) <= 1e-12 and abs(t - 0.5) < abs(best - 0.5)):
            best, best_score = float(t), float(score)
    return best


def _candidates(prob: NDArray[np.float64]) -> list[float]:
    values = np.unique(prob)
    mids = (values[:-1] + values[1:]) / 2 if values.size > 1 else np.array([], dtype=np.float64)
    low = max(0.0, float(values[0]) - 1e-6)
    high = min(1.0, float(values[-1]) + 1e-6)
    return sorted({low, high, *[float(m) for m in mids]})


def report_text(y_true: ArrayLike, p: ArrayLike, threshold: float) -> str:
    """scikit-learn's classification report at ``threshold``."""
    from sklearn.metrics import classification_report

    y = np.asarray(y_true).astype(np.int64).ravel()
    pred = (np.asarray(p, dtype=np.float64).ravel() >= threshold).astype(np.int64)
    text: str = classification_report(y, pred, labels=[0, 1], target_names=list(LABELS), digits=4, zero_division=0)
    return text
