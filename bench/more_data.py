"""Training with more data: idc-dev (8,127 patches) against idc-dev + idc-extra (28,676 patches of the same 223
patients), the default recipe (TrainConfig's defaults, alpha 0.35 ImageNet weights), on the same patients.

    .venv/bin/python bench/more_data.py run both+cap100 --fold 1     # one training, scored on fold 1's patients
    .venv/bin/python bench/more_data.py cv both+cap100               # pool the 5 folds of a variant
    .venv/bin/python bench/more_data.py table                        # every result so far, as Markdown tables
    .venv/bin/python bench/more_data.py rescore                      # re-score the saved predictions

Protocol:

* Folds: ``trainer.data.folds`` drawn on idc-dev alone (5 folds, seed 42), then pinned by patient
  (``data.pinned_folds``), so every variant holds out the same patients with all their images, whichever folder
  they come from. Fold 1 is the 43 validation patients of ``histod train idc-dev --seed 42``.
* Inside a fold, the training patients are split again (``trainer.cv.inner_split``, as ``histod train --cv``
  does): the monitoring patients drive EarlyStopping and fit the Platt scaling and the threshold, and the
  held-out patients only score (``trainer.cv.run_fold``).
* A variant's name: the data (``dev`` or ``both``), then ``+`` changes: ``cap<K>`` (``--patient-cap K``; without
  it a variant trains on all its images in every epoch), ``frac<F>`` (a random share F of the fitting images;
  monitoring and held-out images unchanged), ``nocomplete`` (without the idc-extra images of the complete slides
  on the training side). ``dev`` keeps the
  inner split ``histod train --cv`` draws on idc-dev alone; the held-out side of every variant is all of its
  patients' images (idc-dev + idc-extra), also scored on their idc-dev images alone.
* 95 % intervals: bootstrap over held-out patients. Minutes: wall and process CPU time (both cores), with the load.

Writes bench/results/more-data/<variant>-fold<k>.json (+ .csv.gz of the held-out predictions) and cv5-<variant>.json.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, SHARED, load_average, machine, say, self_peak_rss_mb

OUT = RESULTS / "more-data"
DEV, EXTRA = SHARED / "data" / "idc-dev", SHARED / "data" / "idc-extra"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
BASELINE = RESULTS / "cv5-histology-128.json"  # the recipe on idc-dev alone, 5 folds (8 views and single view)
KEYS = ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")
K, SEED = 5, 42


@dataclass(frozen=True)
class Variant:
    name: str
    data: str  # "dev" or "both"
    extras: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields over the defaults
    frac: float = 1.0
    nocomplete: bool = False

    @classmethod
    def parse(cls, name: str) -> Variant:
        head, *changes = name.split("+")
        if head not in ("dev", "both"):
            raise SystemExit(f"{name}: a variant starts with dev or both")
        extras: dict[str, Any] = {"patient_cap": 0}  # all images unless a change says otherwise
        frac, nocomplete = 1.0, False
        for change in changes:
            if change.startswith("cap"):
                extras["patient_cap"] = int(change[3:])
            elif change.startswith("frac"):
                frac = float(change[4:])
            elif change == "nocomplete":
                nocomplete = True
            else:
                raise SystemExit(f"{name}: unknown change {change!r} (cap<K>, frac<F>, nocomplete)")
        return cls(name, head, extras, frac, nocomplete)


@dataclass
class Data:
    samples: list[Any]
    images: NDArray[np.uint8]
    labels: NDArray[np.int64]
    extra: NDArray[np.bool_]  # the image comes from idc-extra
    complete: frozenset[str]  # patients whose whole slide idc-dev + idc-extra hold
    folds: list[tuple[NDArray[np.int64], NDArray[np.int64]]]


def load(image_size: int) -> Data:
    from histod.trainer import data

    dev = data.discover(DEV)
    fold_of = data.fold_of_patients(dev, data.folds(dev, K, SEED))
    assert {dev[j].group for j in data.folds(dev, K, SEED)[0][1]} == {s.group for s in data.split(dev, 0.2, SEED).val}
    samples = data.discover_all([DEV, EXTRA])
    say(f"decoding {len(samples)} images at {image_size} px")
    images, labels, kept, skipped = data.load_images(samples, image_size)
    assert not skipped, skipped[:3]
    extra = np.array([EXTRA in s.path.parents for s in kept])
    return Data(kept, images, labels, extra, complete_slides(), data.pinned_folds(kept, fold_of))


def complete_slides() -> frozenset[str]:
    """The patients whose every patch idc-dev + idc-extra hold (idc-extra's manifest, complete_slide = 1)."""
    with (EXTRA / "manifest.csv").open() as fh:
        return frozenset(r["patient_id"] for r in csv.DictReader(fh) if r["complete_slide"] == "1")


def parts(v: Variant, d: Data, fold: int, cfg: Any) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """(fitting, monitoring, held-out) image indices of variant ``v`` in ``fold``."""
    from histod.trainer.cv import inner_split

    train_idx, val_idx = d.folds[fold - 1]
    if v.data == "dev":
        train_idx = train_idx[~d.extra[train_idx]]
    fit_idx, mon_idx = inner_split(cfg, d.samples, train_idx)
    if v.nocomplete:
        drop = np.array([d.extra[j] and d.samples[j].group in d.complete for j in range(len(d.samples))])
        fit_idx, mon_idx = fit_idx[~drop[fit_idx]], mon_idx[~drop[mon_idx]]
    if v.frac < 1:
        rng = np.random.default_rng(SEED)
        fit_idx = np.sort(rng.choice(fit_idx, size=round(v.frac * len(fit_idx)), replace=False))
    return fit_idx, mon_idx, val_idx


def scores(y: NDArray[np.int64], p: Any, decided: Any, groups: NDArray[np.str_]) -> dict[str, Any]:
    from histod.trainer.evaluate import bootstrap_ci, metrics

    m = metrics(y, np.asarray(decided, dtype=np.float64), 0.5)
    m["roc_auc"] = metrics(y, p, 0.5)["roc_auc"]
    return {
        **{k: m[k] for k in KEYS},
        "ci95": bootstrap_ci(y, p, groups, 0.5, decisions=decided),
        "n": len(y),
        "patients": len(set(groups.tolist())),
    }


def views(
    y: NDArray[np.int64], p: Any, decided: Any, groups: NDArray[np.str_], extra: NDArray[np.bool_]
) -> dict[str, Any]:
    """The held-out scores on all images, on the idc-dev images alone, and on the patients other than the
    complete slides (whose thousands of images otherwise dominate the patch-level figures)."""
    sparse = ~np.isin(groups, sorted(complete_slides()))
    return {
        "held_out_all": scores(y, p, decided, groups),
        "held_out_dev_images": scores(y[~extra], p[~extra], decided[~extra], groups[~extra]),
        "held_out_sparse_patients": scores(y[sparse], p[sparse], decided[sparse], groups[sparse]),
    }


def read_predictions(path: Path) -> tuple[Any, ...]:
    """(labels, p, decisions, groups, from idc-extra) of a saved .csv.gz of held-out predictions."""
    with gzip.open(path, "rt") as fh:
        rows = list(csv.DictReader(fh))
    return (
        np.array([int(r["true"]) for r in rows]),
        np.array([float(r["p_malignant"]) for r in rows]),
        np.array([r["predicted_malignant"] == "1" for r in rows]),
        np.array([r["group"] for r in rows]),
        np.array([r["extra"] == "1" for r in rows]),
    )


def rescore() -> None:
    """Recompute every saved fold's held-out scores from its predictions (after a change to ``views``)."""
    for path in sorted(OUT.glob("*-fold*.json")):
        r = json.loads(path.read_text())
        r.update(views(*read_predictions(path.with_suffix(".csv.gz"))))
        path.write_text(json.dumps(r, indent=2) + "\n")


def counts(d: Data, idx: NDArray[np.int64]) -> dict[str, int]:
    return {
        "images": len(idx),
        "malignant": int(d.labels[idx].sum()),
        "from_extra": int(d.extra[idx].sum()),
        "patients": len({d.samples[j].group for j in idx}),
    }


def run(name: str, fold: int) -> Path:
    from histod.trainer.config import TrainConfig
    from histod.trainer.cv import run_fold

    v = Variant.parse(name)
    conditions = machine()
    started, cpu_started = time.monotonic(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="histod-more-data-") as tmp:
        dirs = (DEV,) if v.data == "dev" else (DEV, EXTRA)
        cfg = TrainConfig(data_dir=dirs, out=Path(tmp), weights=str(WEIGHTS), **v.extras)
        d = load(cfg.image_size)
        fit_idx, mon_idx, val_idx = parts(v, d, fold, cfg)
        say(f"{name} fold {fold}: fit {counts(d, fit_idx)}, monitor {counts(d, mon_idx)}, held out {len(val_idx)}")
        wall0, cpu0 = time.monotonic(), time.process_time()
        result = run_fold(cfg, d.images, d.labels, d.samples, (fit_idx, mon_idx, val_idx), fold)
        train_wall, train_cpu = time.monotonic() - wall0, time.process_time() - cpu0
    y, groups = d.labels[val_idx], np.array([d.samples[j].group for j in val_idx])
    out: dict[str, Any] = {
        "benchmark": "more-data",
        "variant": name,
        "fold": fold,
        "conditions": {**conditions, "load_average_at_end": load_average()},
        "config": cfg.model_dump(mode="json"),
        "fit": counts(d, fit_idx),
        "monitor": counts(d, mon_idx),
        "held_out": counts(d, val_idx),
        "row": result.row,
        **views(y, result.p, result.decided, groups, d.extra[val_idx]),
        "train_wall_s": round(train_wall, 1),
        "train_cpu_s": round(train_cpu, 1),
        "wall_s": round(time.monotonic() - started, 1),
        "cpu_s": round(time.process_time() - cpu_started, 1),
        "peak_rss_mb": round(self_peak_rss_mb(), 1),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    stem = OUT / f"{name}-fold{fold}"
    with gzip.open(stem.with_suffix(".csv.gz"), "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "group", "true", "extra", "p_malignant", "predicted_malignant"])
        for j, p, dec in zip(val_idx.tolist(), result.p.tolist(), result.decided.tolist(), strict=True):
            s = d.samples[j]
            w.writerow(
                [
                    s.path.relative_to(SHARED / "data").as_posix(),
                    s.group,
                    s.label,
                    int(d.extra[j]),
                    f"{p:.6f}",
                    int(dec),
                ]
            )
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    a, b = out["held_out_all"], out["held_out_dev_images"]
    say(
        f"{name} fold {fold}: all held-out {a['balanced_accuracy']:.4f} / {a['roc_auc']:.4f}, their idc-dev images "
        f"{b['balanced_accuracy']:.4f} / {b['roc_auc']:.4f}; {result.row['epochs']} epochs, "
        f"{train_wall / 60:.1f} min wall, {train_cpu / 60:.1f} min CPU"
    )
    return stem.with_suffix(".json")


def pooled(name: str) -> dict[str, Any]:
    """The 5 folds of ``name`` pooled (every patient held out once), in each of ``views``."""
    folds = [json.loads((OUT / f"{name}-fold{k}.json").read_text()) for k in range(1, K + 1)]
    parts_ = [read_predictions(OUT / f"{name}-fold{k}.csv.gz") for k in range(1, K + 1)]
    y, p, dec, groups, extra = (np.concatenate([f[i] for f in parts_]) for i in range(5))
    summary: dict[str, Any] = {"variant": name, "k": K, "patients": len(set(groups.tolist()))}
    for view, scored in views(y, p, dec, groups, extra).items():
        summary[view] = {
            "mean": {k: float(np.mean([f[view][k] for f in folds])) for k in KEYS},
            "sd": {k: float(np.std([f[view][k] for f in folds], ddof=1)) for k in KEYS},
            "pooled": scored,
        }
    summary.update(
        train_wall_s=[f["train_wall_s"] for f in folds],
        train_cpu_s=[f["train_cpu_s"] for f in folds],
        epochs=[f["row"]["epochs"] for f in folds],
    )
    (OUT / f"cv5-{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="train and score one variant on one fold")
    one.add_argument("variant")
    one.add_argument("--fold", type=int, default=1, choices=range(1, K + 1))
    cv = sub.add_parser("cv", help="pool a variant's 5 folds")
    cv.add_argument("variant")
    sub.add_parser("table", help="the Markdown tables of every result")
    sub.add_parser("rescore", help="recompute the saved folds' scores from their predictions")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from histod.logs import configure

    configure("info", "console", stream=sys.stderr)
    if args.command == "run":
        run(args.variant, args.fold)
    elif args.command == "cv":
        s = pooled(args.variant)
        say(f"cv5 {args.variant}: {s['held_out_all']['mean']}")
    elif args.command == "rescore":
        rescore()
    else:
        from bench.more_data_tables import show

        show()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
