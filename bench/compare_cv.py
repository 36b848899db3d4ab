"""Two cross-validations of the same images, compared patient by patient: is recipe B better than recipe A?

    .venv/bin/python bench/compare_cv.py A/cv_predictions.csv B/cv_predictions.csv [--bootstrap 2000]

Either file may be gzipped (``.csv.gz``, as the runs kept in bench/results/ are).

Reads the out-of-fold predictions that `histod train --cv K` writes (every image scored by the model that never
saw its patient, decided at its own fold's threshold) and prints, for A, B and B - A: pooled balanced accuracy,
sensitivity, specificity and ROC AUC, with 95 % intervals from ONE bootstrap over patients shared by both
recipes (paired: each resample draws the same patients for A and B, so the difference's interval is not the
gap between two independent intervals). Both runs must hold the same images (same data, seed and K give the
same folds). Prints markdown; writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a file: make `histod` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from histod.trainer.evaluate import patient_resamples, resample_figures

KEYS = ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")


def load(path: Path) -> dict[str, tuple[str, int, float, bool]]:
    """path (relative to the data folder, as `--cv` writes it) -> (patient, true label, p, decided malignant)."""
    with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as fh:
        return {
            r["path"]: (r["group"], int(r["true"]), float(r["p_malignant"]), r["predicted_malignant"] == "1")
            for r in csv.DictReader(fh)
        }


def compare(a: Path, b: Path, n: int = 2000, seed: int = 0) -> dict[str, dict[str, Any]]:
    ra, rb = load(a), load(b)
    if ra.keys() != rb.keys():
        raise SystemExit(f"{a} and {b} do not hold the same images ({len(ra)} and {len(rb)})")
    paths = sorted(ra)
    g = np.array([ra[k][0] for k in paths])
    y = np.array([ra[k][1] for k in paths])
    if any(ra[k][1] != rb[k][1] for k in paths):
        raise SystemExit("the two runs disagree on labels")
    p = {"A": np.array([ra[k][2] for k in paths]), "B": np.array([rb[k][2] for k in paths])}
    called = {"A": np.array([ra[k][3] for k in paths]), "B": np.array([rb[k][3] for k in paths])}
    point = {side: resample_figures(y, p[side], called[side]) for side in ("A", "B")}
    point["B - A"] = {key: point["B"][key] - point["A"][key] for key in KEYS}
    draws: dict[str, list[dict[str, float]]] = {"A": [], "B": [], "B - A": []}
    for idx in patient_resamples(g, n, seed, labels=y):
        fa, fb = (resample_figures(y[idx], p[s][idx], called[s][idx]) for s in ("A", "B"))
        draws["A"].append(fa)
        draws["B"].append(fb)
        draws["B - A"].append({key: fb[key] - fa[key] for key in KEYS})
    out: dict[str, dict[str, Any]] = {}
    for side, rows in draws.items():
        out[side] = {
            key: (point[side][key], *np.percentile([r[key] for r in rows], [2.5, 97.5]).tolist()) for key in KEYS
        }
        if side == "B - A":  # how often B came out ahead
            out[side]["share_b_ahead"] = {key: float(np.mean([r[key] > 0 for r in rows])) for key in KEYS}
    out["n"] = {"images": len(paths), "patients": len(np.unique(g)), "resamples": len(draws["A"])}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    r = compare(args.a, args.b, args.bootstrap)
    print(
        f"A = {args.a}\nB = {args.b}\n{r['n']['images']} images, {r['n']['patients']} patients, "
        f"{r['n']['resamples']} paired resamples of patients\n"
    )
    print("| | " + " | ".join(k.replace("_", " ") for k in KEYS) + " |")
    print("|---" * (len(KEYS) + 1) + "|")
    for side in ("A", "B", "B - A"):
        cells = [
            f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]" if side == "B - A" else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
            for v, lo, hi in (r[side][k] for k in KEYS)
        ]
        print(f"| {side} | " + " | ".join(cells) + " |")
    ahead = r["B - A"]["share_b_ahead"]
    print("\nshare of resamples with B ahead: " + ", ".join(f"{k.replace('_', ' ')} {ahead[k]:.2f}" for k in KEYS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
