"""Everything a run directory holds besides the models: metrics.json, classification_report.txt,
confusion_matrix.png, training_curves.png, model_summary.txt and split.csv. Plots use matplotlib's Agg backend."""

from __future__ import annotations

import csv
import json
import math
import platform
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from histod.runs import METRICS_FILE
from histod.trainer.data import CLASS_DIRS, Sample, Skipped

PACKAGES = ("histod", "tensorflow", "keras", "ai-edge-litert", "numpy", "scikit-learn", "pillow", "matplotlib")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(_clean(data), indent=2) + "\n")
    return path


def write_metrics(run_dir: Path, data: dict[str, Any]) -> Path:
    return write_json(run_dir / METRICS_FILE, data)


def write_split(path: Path, data_dir: Path, splits: dict[str, Sequence[Sample]], skipped: Sequence[Skipped]) -> Path:
    """split.csv: every file found, its label, group and split (train, val, or skipped with the reason)."""
    labels = {s.path: s for side in splits.values() for s in side}
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "group", "split", "reason"])
        for name, side in splits.items():
            for s in side:
                writer.writerow([relative(s.path, data_dir), CLASS_DIRS[s.label], s.group, name, ""])
        for sk in skipped:
            sample = labels.get(sk.path)
            label = CLASS_DIRS[sample.label] if sample else sk.path.parent.name.lower()
            writer.writerow([relative(sk.path, data_dir), label, sample.group if sample else "", "skipped", sk.reason])
    return path


def write_predictions(
    path: Path, data_dir: Path, samples: Sequence[Sample], p: Iterable[float], threshold: float
) -> Path:
    """predictions.csv of an evaluation: path, true label, p(malignant), predicted label."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "p_malignant", "predicted"])
        for s, prob in zip(samples, p, strict=True):
            predicted = CLASS_DIRS[int(float(prob) >= threshold)]
            writer.writerow([relative(s.path, data_dir), CLASS_DIRS[s.label], f"{float(prob):.6f}", predicted])
    return path


def relative(path: Path, root: Path) -> str:
    """``path`` below ``root`` (either may be relative to the working directory), else ``path`` as it is."""
    try:
        return path.absolute().relative_to(root.absolute()).as_posix()
    except ValueError:
        return str(path)


def model_summary(model: Any) -> str:
    """The custom layers (the scaling, the base as one block, the head) as a table, plus totals."""
    rows = [("name", "type", "output shape", "trainable", "params")]
    for layer in model.layers:
        shape = getattr(layer, "output", None)
        shape_text = str(tuple(shape.shape)) if shape is not None else "?"
        params = sum(_size(w) for w in layer.weights)
        flag = str(bool(layer.trainable))
        inner = getattr(layer, "layers", None)
        if layer.trainable and inner:  # the base: say how much of it is unfrozen
            weighted = [sub for sub in inner if sub.weights]
            flag = f"{sum(1 for sub in weighted if sub.trainable)} of {len(weighted)} layers"
        rows.append((layer.name, type(layer).__name__, shape_text, flag, f"{params:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    total = sum(_size(w) for w in model.weights)
    trainable = sum(_size(w) for w in model.trainable_weights)
    lines += [
        "",
        f"total params:         {total:,}",
        f"trainable params:     {trainable:,}",
        f"non-trainable params: {total - trainable:,}",
        "",
        "input: float32 RGB 0..255, shape (N, S, S, 3); output: p(malignant), shape (N, 1)",
    ]
    return "\n".join(lines) + "\n"


def _size(weight: Any) -> int:
    n = 1
    for d in weight.shape:
        n *= int(d)
    return n


def plot_confusion(path: Path, matrix: list[list[int]], labels: Sequence[str], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=120)
    ax.imshow(matrix, cmap="Blues")
    top = max(max(r) for r in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    ax.set_xticks([0, 1], labels=list(labels))
    ax.set_yticks([0, 1], labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(path: Path, history: dict[str, list[float]], phases: Sequence[str], best_epoch: int) -> Path:
    """Accuracy and loss per epoch, train and validation; the best epoch and the start of fine-tuning marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = list(range(1, len(history.get("loss", [])) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for ax, key in zip(axes, ("accuracy", "loss"), strict=True):
        ax.plot(epochs, history.get(key, []), marker="o", label=f"train {key}")
        ax.plot(epochs, history.get(f"val_{key}", []), marker="o", label=f"validation {key}")
        if best_epoch:
            ax.axvline(best_epoch, color="green", linestyle="--", label=f"best epoch ({best_epoch})")
        if "fine_tune" in phases and "head" in phases:
            start = phases.index("fine_tune") + 0.5
            ax.axvline(start, color="grey", linestyle=":", label="fine-tuning starts")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reliability(path: Path, bins: Sequence[dict[str, Any]], title: str) -> Path:
    """Reliability diagram: share truly malignant against mean p(malignant) per bin, the diagonal being a
    perfectly calibrated model; bar widths cover each bin, and the count of images is written above it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=120)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    used = [b for b in bins if b["n"]]
    ax.bar(
        [(b["low"] + b["high"]) / 2 for b in used],
        [b["malignant_share"] for b in used],
        width=[b["high"] - b["low"] for b in used],
        edgecolor="black",
        alpha=0.6,
        label="share malignant",
    )
    ax.plot([b["mean_p"] for b in used], [b["malignant_share"] for b in used], marker="o", color="C3", label="model")
    for b in used:
        ax.text((b["low"] + b["high"]) / 2, min(1.0, b["malignant_share"] + 0.03), str(b["n"]), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("mean p(malignant) in bin")
    ax.set_ylabel("share truly malignant")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_roc_pr(roc_path: Path, pr_path: Path, y_true: Any, p: Any, threshold: float, title: str) -> tuple[Path, Path]:
    """The ROC curve (with its AUC) and the precision-recall curve (with average precision), Malignant the
    positive class; the operating point at ``threshold`` marked on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from histod.trainer.evaluate import curves, roc_auc

    y = np.asarray(y_true).astype(int).ravel()
    prob = np.asarray(p, dtype=float).ravel()
    called = prob >= threshold
    tpr_at = float(called[y == 1].mean())
    fpr_at = float(called[y == 0].mean())
    precision_at = float(y[called].mean()) if called.any() else 1.0

    c = curves(y, prob)
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=120)
    ax.plot(c["fpr"], c["tpr"], label=f"ROC (AUC {roc_auc(y, prob):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="chance")
    ax.plot([fpr_at], [tpr_at], marker="o", color="C3", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(roc_path)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=120)
    ax.plot(c["recall"], c["precision"], label=f"PR (average precision {c['average_precision']:.3f})")
    ax.axhline(float(y.mean()), color="grey", linestyle="--", label="share malignant")
    ax.plot([tpr_at], [precision_at], marker="o", color="C3", label=f"threshold {threshold:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(pr_path)
    plt.close(fig)
    return roc_path, pr_path
