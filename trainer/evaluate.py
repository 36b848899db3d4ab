"""Scoring, separate from fitting: pure functions of labels and p(malignant). Malignant is the positive class."""

from __future__ import annotations

import math
from collections.abc import Iterator
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
    auc: float | None = roc_auc(y, prob) if len(np.unique(y)) == 2 else None
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


def decision_threshold(
    y_true: ArrayLike, p: ArrayLike, fixed: float | None = None, target_sensitivity: float | None = None
) -> float:
    """``fixed`` when given (``--threshold``), else :func:`choose_threshold`'s choice on these validation data."""
    return fixed if fixed is not None else choose_threshold(y_true, p, target_sensitivity)


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


def roc_auc(y_true: ArrayLike, p: ArrayLike) -> float:
    """ROC AUC: the chance that a malignant image scores above a benign one, ties counting half (the Mann-Whitney
    U of the malignant images' mid-ranks; scikit-learn's roc_auc_score gives the same). Needs both classes."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    prob = np.asarray(p, dtype=np.float64).ravel()
    _, inverse, counts = np.unique(prob, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse.ravel()]  # 1-based, tied values share their mean
    n_pos = int(np.sum(y == 1))
    n_neg = int(y.size) - n_pos
    return float((np.sum(ranks[y == 1]) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def curves(y_true: ArrayLike, p: ArrayLike) -> dict[str, Any]:
    """The ROC curve (``fpr``, ``tpr`` from (0, 0)) and the precision-recall curve (``precision``, ``recall``), one
    point per distinct p from the highest down, and the average precision (sum over those points of the recall
    gained times the precision there): scikit-learn's roc_curve, precision_recall_curve and
    average_precision_score give the same. Malignant is the positive class; needs both classes."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    prob = np.asarray(p, dtype=np.float64).ravel()
    order = np.argsort(-prob, kind="mergesort")
    last = np.r_[np.flatnonzero(np.diff(prob[order])), y.size - 1]  # the last image of each distinct p
    tps = np.cumsum(y[order])[last].astype(np.float64)
    fps = (last + 1) - tps
    recall = tps / tps[-1]
    precision = tps / (tps + fps)
    return {
        "fpr": np.r_[0.0, fps / fps[-1]],
        "tpr": np.r_[0.0, recall],
        "precision": precision,
        "recall": recall,
        "average_precision": float(np.sum(np.diff(np.r_[0.0, recall]) * precision)),
    }


REPORT_HEADERS = ("precision", "recall", "f1-score", "support")


def report_text(y_true: ArrayLike, p: ArrayLike, threshold: float, digits: int = 4) -> str:
    """The classification report at ``threshold``: precision, recall, F1 and support per label, accuracy, macro
    and support-weighted averages (the layout of scikit-learn's classification_report, zero_division=0)."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    pred = (np.asarray(p, dtype=np.float64).ravel() >= threshold).astype(np.int64)
    rows: list[tuple[str, float, float, float, int]] = []
    for k, name in enumerate(LABELS):
        hit, called, support = int(np.sum((pred == k) & (y == k))), int(np.sum(pred == k)), int(np.sum(y == k))
        rows.append((name, _ratio(hit, called), _ratio(hit, support), _ratio(2 * hit, called + support), support))
    total = int(y.size)
    width = max(*(len(name) for name in LABELS), len("weighted avg"), digits)

    def line(name: str, precision: float, recall: float, f1: float, support: int) -> str:
        figures = "".join(f" {v:>9.{digits}f}" for v in (precision, recall, f1))
        return f"{name:>{width}s} {figures} {support:>9}\n"

    text = f"{'':>{width}s} " + "".join(f" {h:>9}" for h in REPORT_HEADERS) + "\n\n"
    text += "".join(line(name, pr, rc, f1, n) for name, pr, rc, f1, n in rows) + "\n"
    accuracy = _ratio(int(np.sum(pred == y)), total)
    text += f"{'accuracy':>{width}s} " + f" {'':>9} {'':>9} {accuracy:>9.{digits}f} {total:>9}\n"
    macro = [sum(float(row[i]) for row in rows) / len(rows) for i in (1, 2, 3)]
    weighted = [_ratio(0, 0) if not total else sum(float(row[i]) * row[4] for row in rows) / total for i in (1, 2, 3)]
    text += line("macro avg", macro[0], macro[1], macro[2], total)
    text += line("weighted avg", weighted[0], weighted[1], weighted[2], total)
    return text


# --- calibration -----------------------------------------------------------------------------------------------


def calibration_bins(y_true: ArrayLike, p: ArrayLike, bins: int = 10) -> list[dict[str, float | int]]:
    """Equal-width bins of p(malignant): per bin its count, mean p (confidence) and share truly malignant."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    prob = np.asarray(p, dtype=np.float64).ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    out: list[dict[str, float | int]] = []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        out.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "n": n,
                "mean_p": float(prob[mask].mean()) if n else math.nan,
                "malignant_share": float(y[mask].mean()) if n else math.nan,
            }
        )
    return out


def expected_calibration_error(y_true: ArrayLike, p: ArrayLike, bins: int = 10) -> float:
    """ECE over equal-width bins of p(malignant): sum over bins of (n_bin / N) * |mean p - share malignant|."""
    table = calibration_bins(y_true, p, bins)
    total = sum(int(b["n"]) for b in table)
    if total == 0:
        return 0.0
    return float(sum(int(b["n"]) / total * abs(b["mean_p"] - b["malignant_share"]) for b in table if b["n"]))


def _logit(p: NDArray[np.float64]) -> NDArray[np.float64]:
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return np.asarray(np.log(q / (1 - q)), dtype=np.float64)


def fit_calibration(y_true: ArrayLike, p_views: ArrayLike, *, shift: bool = True) -> tuple[float, float]:
    """Platt scaling of the model's logit z: (a, b) minimising the log loss of the mean over test-time views of
    sigmoid(a * z + b). ``p_views`` is (N,) or (views, N). ``shift=False`` fits a alone (b = 0): temperature
    scaling (Guo et al. 2017, T = 1 / a).

    Monotone in z (a > 0), so without test-time views it cannot change the ranking (ROC AUC), and with the
    threshold moved the same way it cannot change a label; it only makes p(malignant) honest. The shift is what
    undoes the bias that class weights put into p (they train the model as if the classes were balanced); a
    temperature alone cannot.

    The targets are Platt's (1999) regularised ones, (N+ + 1) / (N+ + 2) for malignant and 1 / (N- + 2) for
    benign, not 1 and 0: on a small validation split that the model happens to separate, hard targets have no
    finite optimum and the scale runs off (199 on 20 images was seen), which calibrates nothing and magnifies
    float noise. On thousands of images the targets are within 0.001 of 1 and 0."""
    from scipy.optimize import minimize

    y = np.asarray(y_true, dtype=np.float64).ravel()
    z = _logit(np.atleast_2d(np.asarray(p_views, dtype=np.float64)))
    if y.size == 0 or len(np.unique(y)) < 2:
        return 1.0, 0.0
    n_pos, n_neg = float(np.sum(y == 1)), float(np.sum(y == 0))
    t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def nll(w: NDArray[np.float64]) -> float:
        a, b = math.exp(float(w[0])), float(w[1]) if shift else 0.0  # a = exp(w0) > 0 keeps the ranking
        q = np.clip(np.mean(1.0 / (1.0 + np.exp(-(a * z + b))), axis=0), 1e-12, 1 - 1e-12)
        return float(-np.mean(t * np.log(q) + (1 - t) * np.log(1 - q)))

    best = minimize(nll, np.zeros(2), method="Nelder-Mead", options={"xatol": 1e-5, "fatol": 1e-9})
    return math.exp(float(best.x[0])), float(best.x[1]) if shift else 0.0


def apply_calibration(p: ArrayLike, scale: float, shift: float) -> NDArray[np.float64]:
    """sigmoid(scale * logit(p) + shift)."""
    z = scale * _logit(np.asarray(p, dtype=np.float64)) + shift
    return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float64)


def patient_resamples(
    groups: ArrayLike, n: int, seed: int = 0, labels: ArrayLike | None = None
) -> Iterator[NDArray[np.int64]]:
    """``n`` bootstrap draws of GROUPS (patients) with replacement, each yielded as the indices of its images;
    with ``labels``, a draw holding one class only (no ROC AUC, no balanced accuracy) is drawn but not yielded."""
    g = np.asarray(groups).ravel()
    y = None if labels is None else np.asarray(labels).ravel()
    unique = np.unique(g)
    members = [np.flatnonzero(g == u) for u in unique]
    rng = np.random.default_rng(seed)
    for _ in range(n):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(unique), size=len(unique))])
        if y is None or len(np.unique(y[idx])) == 2:
            yield idx


def resample_figures(y: NDArray[np.int64], p: NDArray[np.float64], called: NDArray[np.bool_]) -> dict[str, float]:
    """Balanced accuracy, ROC AUC, sensitivity and specificity of one resample, from its p and decisions."""
    sens, spec = float(np.mean(called[y == 1])), float(np.mean(~called[y == 0]))
    return {
        "balanced_accuracy": (sens + spec) / 2,
        "roc_auc": roc_auc(y, p),
        "sensitivity": sens,
        "specificity": spec,
    }


def bootstrap_ci(
    y_true: ArrayLike,
    p: ArrayLike,
    groups: ArrayLike,
    threshold: float,
    n: int = 1000,
    seed: int = 0,
    decisions: ArrayLike | None = None,
) -> dict[str, list[float]]:
    """95 % intervals of balanced accuracy, ROC AUC, sensitivity and specificity by resampling GROUPS (patients)
    with replacement: tiles of one patient are not independent, so resampling tiles would make them too narrow.
    ``decisions`` (bool per image) replaces ``p >= threshold`` where each image had its own threshold."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    prob = np.asarray(p, dtype=np.float64).ravel()
    called = prob >= threshold if decisions is None else np.asarray(decisions, dtype=bool).ravel()
    samples: dict[str, list[float]] = {"balanced_accuracy": [], "roc_auc": [], "sensitivity": [], "specificity": []}
    for idx in patient_resamples(groups, n, seed, labels=y):
        for k, v in resample_figures(y[idx], prob[idx], called[idx]).items():
            samples[k].append(v)
    return {
        k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else [math.nan, math.nan]
        for k, v in samples.items()
    }
