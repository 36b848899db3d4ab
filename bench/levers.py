"""One training recipe change at a time, scored on validation PATIENTS, with 95 % bootstrap intervals.

    .venv/bin/python bench/levers.py run baseline dihedral lr_1e-4 ...   # train and score these levers
    .venv/bin/python bench/levers.py table                               # the table of every lever run so far
    .venv/bin/python bench/levers.py list                                # the levers and what they change
    .venv/bin/python bench/levers.py patients NAME | context NAME         # where a lever's errors are

Protocol (the same split as bench/accuracy.py and ``histod train --seed 42``):

* Outer split: ``trainer.data.split`` (stratified, grouped by patient, 20 %, seed 42). The validation patients
  are scored once per lever, at the end; they never steer training.
* Inner split: the same function applied to the training patients. Its patients drive EarlyStopping and
  ReduceLROnPlateau and choose the decision threshold (max balanced accuracy), which is then applied unchanged
  to the validation patients.
* Levers with ``refit`` (the ``+all`` names) train on the monitoring patients too, as ``histod train`` trains on
  all its training patients, and decide at p = 0.5; ``subset`` trains on a share of the fitting patients.
* Every lever starts from ``BASE`` (histod's own recipe at 96 px, alpha 0.35 ImageNet weights, 3 head epochs and
  up to 12 fine-tuning epochs) and changes only what its row says. Same seed for every lever: one run each, so a
  difference inside the intervals is not evidence.
* Each lever's p(malignant) is kept for all 8 flips/rotations of the validation (and monitoring) images, so the
  test-time-augmentation and threshold-rule rows cost no training: they re-score a trained lever.

Writes bench/results/levers/<lever>.json (+ .npz of the predictions); ``table`` prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHARED, load_average, machine, say, shared_data, shared_weights
from histod.trainer.presets import PRESETS

RESULTS = Path(__file__).resolve().parent / "results" / "levers"
ALPHA1_WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_no_top_imagenet_then_dogs_last30.h5"

BASE: dict[str, Any] = {
    "image_size": 96,
    "alpha": 0.35,
    "head_epochs": 3,
    "epochs": 12,
    "seed": 42,
    "val_split": 0.2,
}

# --preset histology as a change to BASE (dihedral, rate 1e-4, whole base, 30 epochs): derived, so it cannot drift;
# less the weights' moving average, Platt scaling and test-time views, which joined the preset after the rows below
# that build on HISTOLOGY were run (lever histology+ema and its re-scored rows measure them)
# ... and less its input size: the preset went to 128 px in the eighth session, after the rows built on HISTOLOGY
# were run at BASE's 96 px; levers at 128 px say so in their names
LATER = ("ema", "calibrate", "tta", "image_size")  # the levers score calibration (the ECE column) and views
HISTOLOGY: dict[str, Any] = {k: v for k, v in PRESETS["histology"].items() if BASE.get(k) != v and k not in LATER}
# lever histology+ema, and the base of its variants (seeds, patience, MixUp)
HISTOLOGY_EMA: dict[str, Any] = {**HISTOLOGY, "ema": PRESETS["histology"]["ema"]}
STAIN_NORM = "stain_norm"  # not a TrainConfig field: run_lever normalises the arrays before training and scoring
# not a TrainConfig field: train on all 180 training patients (fitting + monitoring), as `histod train` does, and
# decide at p = 0.5 (the balance point of a class-weighted model). The monitoring patients are then inside the
# training set, so the loss they give EarlyStopping and ReduceLROnPlateau is in-sample: in effect a fixed schedule
REFIT = "refit"
# not a TrainConfig field: train on this share of the fitting patients only (drawn by patient, seed 42): a point
# on the learning curve, with the monitoring and validation patients unchanged
SUBSET = "subset"
NOT_CONFIG = (STAIN_NORM, REFIT, SUBSET)
RESCORED = (
    "baseline",
    "dihedral+lr+all+30",
    "histology+ema",
    "histology+ema+seed1",
    "histology+ema+seed2",
    "histology+ema+seed2+p8",
    "histology+ema+128",
    "histology+ema+128+seed1",
    "histology+ema+128+all",
    "histology+ema+128+noaug",
    "histology+ema+128+all+seed1",
    "histology+ema+128+all+45",
    "histology+ema+128+half",
    "histology+ema+128+3q",
)  # levers also shown with test-time views and the other threshold

LEVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("histod's default recipe at 96 px (batch 8, fine-tune Adam 1e-5, last 30 layers)", {}),
    "dihedral": ("+ vertical flips and 90° rotations", {"dihedral": True}),
    "stain": ("+ H&E stain jitter in HED space (sigma 0.05)", {"stain_jitter": 0.05}),
    "color": ("+ brightness/contrast/saturation/hue jitter (strength 1)", {"color_jitter": 1.0}),
    "lr_1e-4": ("fine-tune learning rate 1e-4 instead of 1e-5", {"learning_rate": 1e-4}),
    "cosine": ("cosine decay of the fine-tune rate instead of ReduceLROnPlateau", {"lr_schedule": "cosine"}),
    "unfreeze_60": ("unfreeze the last 60 base layers instead of 30", {"fine_tune_layers": 60}),
    "unfreeze_all": ("unfreeze the whole base (155 layers)", {"fine_tune_layers": 155}),
    "bn_adapt": ("the base's BatchNorm adapts while fine-tuning (not frozen)", {"freeze_batchnorm": False}),
    "smooth_0.1": ("label smoothing 0.1", {"label_smoothing": 0.1}),
    "size_128": ("input 128 px instead of 96", {"image_size": 128}),
    "size_160": ("input 160 px instead of 96", {"image_size": 160}),
    "batch_32": ("batch 32 instead of 8", {"batch_size": 32}),
    # stacks of the levers that helped alone
    "dihedral+lr": ("dihedral + lr_1e-4", {"dihedral": True, "learning_rate": 1e-4}),
    "dihedral+lr+all": (
        "dihedral + lr_1e-4 + unfreeze_all",
        {"dihedral": True, "learning_rate": 1e-4, "fine_tune_layers": 155},
    ),
    "dihedral+lr+all+30": (
        "dihedral + lr_1e-4 + unfreeze_all, up to 30 fine-tuning epochs (the candidate for --preset histology)",
        dict(HISTOLOGY),
    ),
    "dihedral+lr+all+30+128": (
        "the histology candidate at 128 px",
        {**HISTOLOGY, "image_size": 128},
    ),
    "dihedral+lr+alpha1": (
        "dihedral + lr_1e-4 at alpha 1.0 (the ../shared alpha 1.0 base: ImageNet, last 30 layers dog-tuned)",
        {"dihedral": True, "learning_rate": 1e-4, "alpha": 1.0, "weights": str(ALPHA1_WEIGHTS)},
    ),
    "histology+b32": (
        "the histology preset at batch 32 instead of 8",
        {**HISTOLOGY, "batch_size": 32},
    ),
    "histology+b32+128": (
        "the histology preset at batch 32 and 128 px",
        {**HISTOLOGY, "batch_size": 32, "image_size": 128},
    ),
    "stain_norm": (
        "+ stain normalisation: each image's H&E concentrations standardised to the training images' (Reinhard, "
        "in HED space)",
        {STAIN_NORM: True},
    ),
    "histology+b32+hbn0.9": (
        "the histology preset at batch 32, head BatchNorm momentum 0.9 instead of 0.99 (its moving statistics "
        "keep up with a base that learns at 1e-4)",
        {**HISTOLOGY, "batch_size": 32, "head_bn_momentum": 0.9},
    ),
    "histology+auc": (
        "the histology preset with EarlyStopping, ReduceLROnPlateau and the best epoch on the monitoring patients' "
        "ROC AUC instead of their loss",
        {**HISTOLOGY, "monitor": "val_auc"},
    ),
    "histology+ema": (
        "the histology preset, validation, EarlyStopping and the kept model on an exponential moving average of "
        "the weights (Adam EMA, momentum 0.999: about the last 1,000 steps)",
        HISTOLOGY_EMA,
    ),
    "histology+ema+seed1": (
        "histology+ema again with training seed 1 instead of 42 (the same patients): how far one run's noise goes",
        {**HISTOLOGY_EMA, "seed": 1},
    ),
    "histology+ema+seed2": (
        "histology+ema again with training seed 2",
        {**HISTOLOGY_EMA, "seed": 2},
    ),
    "histology+ema+seed2+p8": (
        "histology+ema+seed2 with EarlyStopping's patience 8 instead of 5 (the moving average's loss is smooth)",
        {**HISTOLOGY_EMA, "seed": 2, "patience": 8},
    ),
    "histology+ema+128": (
        "histology+ema at 128 px instead of 96 (128 px helped the baseline; the stack without the average swung and "
        "stopped early there)",
        {**HISTOLOGY_EMA, "image_size": 128},
    ),
    "histology+ema+128+seed1": (
        "histology+ema+128 again with training seed 1",
        {**HISTOLOGY_EMA, "image_size": 128, "seed": 1},
    ),
    "histology+lr3e-5": (
        "the histology preset with the whole base fine-tuned at 3e-5 instead of 1e-4",
        {**HISTOLOGY, "learning_rate": 3e-5},
    ),
    "histology+mixup": (
        "the histology preset with MixUp (alpha 0.2) of the training images and labels (soft labels dull the pull "
        "of wrong ones)",
        {**HISTOLOGY, "mixup": 0.2},
    ),
    "histology+ema+mixup": (
        "histology+ema with MixUp (alpha 0.2) as well",
        {**HISTOLOGY_EMA, "mixup": 0.2},
    ),
    "histology+alpha1": (
        "the histology preset at alpha 1.0 (the ../shared alpha 1.0 base: ImageNet, last 30 layers dog-tuned; the "
        "whole base is fine-tuned anyway)",
        {**HISTOLOGY, "alpha": 1.0, "weights": str(ALPHA1_WEIGHTS)},
    ),
    "histology+ema+128+all": (
        "histology+ema+128 trained on all 180 training patients (fitting and monitoring, 6,504 images: 25 % more), "
        "threshold 0.5; the monitoring loss is in-sample, so in effect a fixed schedule",
        {**HISTOLOGY_EMA, "image_size": 128, REFIT: True},
    ),
    "histology+ema+128+all+seed1": (
        "histology+ema+128+all again with training seed 1",
        {**HISTOLOGY_EMA, "image_size": 128, REFIT: True, "seed": 1},
    ),
    "histology+ema+128+all+45": (
        "histology+ema+128+all with up to 45 fine-tuning epochs instead of 30 (its best epochs came near the end)",
        {**HISTOLOGY_EMA, "image_size": 128, REFIT: True, "epochs": 45},
    ),
    "histology+ema+128+half": (
        "histology+ema+128 trained on half of the fitting patients (72 of 144): a point on the learning curve",
        {**HISTOLOGY_EMA, "image_size": 128, SUBSET: 0.5},
    ),
    "histology+ema+128+3q": (
        "histology+ema+128 trained on three quarters of the fitting patients (108 of 144): the learning curve",
        {**HISTOLOGY_EMA, "image_size": 128, SUBSET: 0.75},
    ),
    "histology+ema+128+noaug": (
        "histology+ema+128 without the paper's rotation, zoom and shear (flips and 90° rotations stay): its "
        "training loss is as high as the monitoring loss; does the augmentation hold it back?",
        {**HISTOLOGY_EMA, "image_size": 128, "augment": False},
    ),
    "dihedral+lr+128": ("dihedral + lr_1e-4 + size_128", {"dihedral": True, "learning_rate": 1e-4, "image_size": 128}),
}


def set_results(path: Path) -> None:
    global RESULTS
    RESULTS = path


def score(
    y: NDArray[np.int64], p: NDArray[np.float32], groups: NDArray[Any], threshold: float, boot: int
) -> dict[str, Any]:
    from histod.trainer.evaluate import bootstrap_ci, expected_calibration_error, metrics

    m = metrics(y, p, threshold)
    return {
        **{k: m[k] for k in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1", "threshold")},
        "ece": expected_calibration_error(y, p),
        "ci95": bootstrap_ci(y, p, groups, threshold, n=boot, seed=0),
    }


def prepare(data_dir: Path, size: int, seed: int, val_split: float) -> dict[str, Any]:
    from histod.trainer import data

    samples = data.discover(data_dir)
    say(f"decoding {len(samples)} images from {data_dir} at {size} px")
    images, labels, kept, _ = data.load_images(samples, size)
    outer = data.split(kept, val_split, seed)
    inner = data.split(outer.train, val_split, seed)
    index = {s.path: i for i, s in enumerate(kept)}

    def take(side: list[Any]) -> NDArray[np.int64]:
        return np.array([index[s.path] for s in side])

    fit_idx, mon_idx, val_idx = take(inner.train), take(inner.val), take(outer.val)
    return {
        "x_fit": images[fit_idx],
        "y_fit": labels[fit_idx],
        "x_mon": images[mon_idx],
        "y_mon": labels[mon_idx],
        "x_val": images[val_idx],
        "y_val": labels[val_idx],
        "g_fit": np.array([s.group for s in inner.train]),
        "g_mon": np.array([s.group for s in inner.val]),
        "g_val": np.array([s.group for s in outer.val]),
        "patients": {
            "fit": len({s.group for s in inner.train}),
            "monitor": len({s.group for s in inner.val}),
            "validation": len({s.group for s in outer.val}),
        },
    }


def _hed(x: NDArray[np.uint8]) -> NDArray[np.float32]:
    from histod.trainer.augment import HED_FROM_RGB

    od = -np.log((x.astype(np.float32) + 1.0) / 256.0)
    return np.asarray(od @ HED_FROM_RGB.astype(np.float32), dtype=np.float32)


def stain_stats(x: NDArray[np.uint8]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The target: median over images of each image's mean and sd of its H, E and D concentrations."""
    hed = np.concatenate([_hed(x[i : i + 512]).reshape(-1, x.shape[1] * x.shape[2], 3) for i in range(0, len(x), 512)])
    return np.median(hed.mean(axis=1), axis=0), np.median(hed.std(axis=1), axis=0)


def stain_normalise(x: NDArray[np.uint8], mean: NDArray[np.float32], sd: NDArray[np.float32]) -> NDArray[np.uint8]:
    """Reinhard's colour transfer in HED optical-density space, per image: (c - mean_i) / sd_i * sd + mean."""
    from histod.trainer.augment import RGB_FROM_HED

    out = np.empty_like(x)
    for i in range(0, len(x), 512):
        hed = _hed(x[i : i + 512])
        mu, s = hed.mean(axis=(1, 2), keepdims=True), hed.std(axis=(1, 2), keepdims=True)
        hed = (hed - mu) / np.maximum(s, 1e-3) * sd + mean
        rgb = 256.0 * np.exp(-(hed @ RGB_FROM_HED.astype(np.float32))) - 1.0
        out[i : i + 512] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return out


def run_lever(name: str, d: dict[str, Any], data_dir: Path, weights: str, boot: int) -> dict[str, Any]:
    import keras

    from histod.trainer.config import TrainConfig
    from histod.trainer.export import predict_views
    from histod.trainer.fit import fit
    from histod.trainer.model import build_model

    what, change = LEVERS[name]
    if change.get(STAIN_NORM):
        target = stain_stats(d["x_fit"])
        d = {**d, **{k: stain_normalise(d[k], *target) for k in ("x_fit", "x_mon", "x_val")}}
    config = {k: v for k, v in change.items() if k not in NOT_CONFIG}
    x_train, y_train = d["x_fit"], d["y_fit"]
    if change.get(SUBSET):
        fit_patients = np.unique(d["g_fit"])
        rng = np.random.default_rng(BASE["seed"])
        kept = np.isin(d["g_fit"], rng.permutation(fit_patients)[: round(len(fit_patients) * float(change[SUBSET]))])
        x_train, y_train = x_train[kept], y_train[kept]
    if change.get(REFIT):
        x_train, y_train = np.concatenate([x_train, d["x_mon"]]), np.concatenate([y_train, d["y_mon"]])
    with tempfile.TemporaryDirectory(prefix=f"histod-lever-{name}-") as tmp:
        cfg = TrainConfig(data_dir=data_dir, out=Path(tmp), **{**BASE, "weights": weights, **config})
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    started = time.monotonic()
    model = build_model(cfg)
    result = fit(model, cfg, x_train, y_train, d["x_mon"], d["y_mon"])
    train_s = time.monotonic() - started
    p_mon = predict_views(model, d["x_mon"], 8)
    p_val = predict_views(model, d["x_val"], 8)
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        RESULTS / f"{name}.npz", p_mon=p_mon, p_val=p_val, y_mon=d["y_mon"], y_val=d["y_val"], g_val=d["g_val"]
    )
    threshold = threshold_for(bool(change.get(REFIT)), d["y_mon"], p_mon[0])
    row = {
        "lever": name,
        "what": what,
        "change": change,
        "config": cfg.model_dump(mode="json", exclude={"data_dir", "out"}),
        "validation": score(d["y_val"], p_val[0], d["g_val"], threshold, boot),
        "epochs_run": len(result.phases),
        "best_epoch": result.best_epoch,
        "history": result.history,
        "train_min": round(train_s / 60, 2),
        "patients": d["patients"],
        "train_images": len(x_train),
        "conditions": {**machine(), "load_average_at_end": load_average()},
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def threshold_for(in_sample: bool, y_mon: NDArray[np.int64], p_mon: NDArray[np.float32], rule: str = "bac") -> float:
    """The decision threshold of a rule (see ``rescore``), chosen on the monitoring patients. p = 0.5 when the
    rule says so or when the model trained on those patients (``in_sample``): a threshold chosen there is
    in-sample."""
    from histod.trainer.evaluate import choose_threshold

    if rule == "half" or in_sample:
        return 0.5
    return float(choose_threshold(y_mon, p_mon, 0.95 if rule == "sens95" else None))


def rescore(name: str, views: int, rule: str, boot: int) -> dict[str, Any]:
    """A trained lever re-scored with ``views`` test-time views and a threshold rule, all chosen on the inner
    monitoring patients: ``bac`` (max balanced accuracy), ``sens95`` (highest threshold reaching 0.95) or
    ``half`` (p = 0.5, chosen on nothing; a lever trained on the monitoring patients too only has this one)."""
    z = np.load(RESULTS / f"{name}.npz")
    p_mon, p_val = z["p_mon"][:views].mean(axis=0), z["p_val"][:views].mean(axis=0)
    threshold = threshold_for(refit(name), z["y_mon"], p_mon, rule)
    return score(z["y_val"], p_val, z["g_val"], threshold, boot)


def refit(name: str) -> bool:
    """Whether the lever trained on its monitoring patients too (their threshold or calibration is in-sample)."""
    return bool(LEVERS.get(name, ("", {}))[1].get(REFIT))


def rules(name: str) -> tuple[tuple[int, str], ...]:
    """The re-scored rows of a lever in RESCORED: views and threshold rule."""
    if refit(name):
        return ((2, "half"), (8, "half"))
    return ((2, "bac"), (8, "bac"), (1, "sens95"), (8, "sens95"), (1, "half"), (8, "half"))


def calibrated_ece(name: str, views: int, shift: bool) -> float:
    """ECE on the validation patients after Platt scaling (``shift``) or temperature scaling fitted on the
    monitoring patients, as ``histod train --calibrate`` does (there on the validation split itself)."""
    from histod.trainer.evaluate import apply_calibration, expected_calibration_error, fit_calibration

    z = np.load(RESULTS / f"{name}.npz")
    a, b = fit_calibration(z["y_mon"], z["p_mon"][:views], shift=shift)
    p = np.mean([apply_calibration(v, a, b) for v in z["p_val"][:views]], axis=0)
    return expected_calibration_error(z["y_val"], p)


def _ci(v: dict[str, Any], key: str) -> str:
    lo, hi = v["ci95"][key]
    return f"{v[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def table(boot: int) -> str:
    rows = [
        "| lever | change | balanced acc [95% CI] | ROC AUC [95% CI] | sensitivity | specificity | ECE "
        "(temperature / Platt) | min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = [n for n in [*LEVERS, *sorted(p.stem for p in RESULTS.glob("*.json"))] if (RESULTS / f"{n}.json").is_file()]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        r = json.loads((RESULTS / f"{name}.json").read_text())
        v = r["validation"]
        rows.append(
            f"| {name} | {r['what']} | {_ci(v, 'balanced_accuracy')} | {_ci(v, 'roc_auc')} | "
            f"{v['sensitivity']:.3f} | {v['specificity']:.3f} | {v['ece']:.3f} ({calibrated_ece(name, 1, False):.3f} / "
            f"{calibrated_ece(name, 1, True):.3f}) | {r['train_min']:.1f} |"
        )
        if name in RESCORED:
            for views, rule in rules(name):
                s = rescore(name, views, rule, boot)
                label = f"{name} + TTA {views}" if views > 1 else name
                label += {"sens95": ", threshold for sensitivity 0.95", "half": ", threshold 0.5"}.get(rule, "")
                rows.append(
                    f"| {label} | re-scored, no training | {_ci(s, 'balanced_accuracy')} | {_ci(s, 'roc_auc')} | "
                    f"{s['sensitivity']:.3f} | {s['specificity']:.3f} | {s['ece']:.3f} "
                    f"({calibrated_ece(name, views, False):.3f} / {calibrated_ece(name, views, True):.3f}) | 0 |"
                )
    return "\n".join(rows)


def ensemble(names: list[str], boot: int) -> str:
    """Each trained lever alone, then the mean p of all of them (an ensemble), with 1 and 8 test-time views; the
    threshold is chosen on the monitoring patients as always, or is p = 0.5 when a member trained on them."""
    zs = {n: np.load(RESULTS / f"{n}.npz") for n in names}
    z = zs[names[0]]
    rows = ["| models | views | balanced acc [95% CI] | ROC AUC [95% CI] |", "|---|---|---|---|"]
    for members in [[n] for n in names] + ([names] if len(names) > 1 else []):
        for views in (1, 8):
            p_mon = np.mean([zs[n]["p_mon"][:views].mean(axis=0) for n in members], axis=0)
            p_val = np.mean([zs[n]["p_val"][:views].mean(axis=0) for n in members], axis=0)
            threshold = threshold_for(any(refit(n) for n in members), z["y_mon"], p_mon)
            s = score(z["y_val"], p_val, z["g_val"], threshold, boot)
            rows.append(f"| {' + '.join(members)} | {views} | {_ci(s, 'balanced_accuracy')} | {_ci(s, 'roc_auc')} |")
    return "\n".join(rows)


def patients(name: str, top: int) -> str:
    """Which validation patients cost the most ROC AUC: the AUC without each patient, minus the AUC with all."""
    from histod.trainer.evaluate import metrics

    z = np.load(RESULTS / f"{name}.npz")
    y, p, g = z["y_val"], z["p_val"][0], z["g_val"]
    auc = metrics(y, p, 0.5)["roc_auc"]
    rows = []
    for patient in sorted(set(g.tolist())):
        mine = g == patient
        pos, neg = p[mine & (y == 1)], p[mine & (y == 0)]
        gain = metrics(y[~mine], p[~mine], 0.5)["roc_auc"] - auc
        mean_pos = f"{pos.mean():.2f}" if pos.size else "-"
        mean_neg = f"{neg.mean():.2f}" if neg.size else "-"
        rows.append((gain, f"| {patient} | {pos.size} | {neg.size} | {mean_pos} | {mean_neg} | {gain:+.4f} |"))
    rows.sort(key=lambda r: -r[0])
    head = [
        f"ROC AUC of {name} on all {len(set(g.tolist()))} validation patients: {auc:.4f}",
        "| patient | malignant tiles | benign tiles | mean p (malignant tiles) | mean p (benign tiles) | AUC gain "
        "without it |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [r[1] for r in rows[:top]])


def context(name: str) -> str:
    """Does a patient's other tiles tell anything? Pooled ROC AUC against the mean AUC within each patient (both
    classes present), and the pooled AUC after each patient's logits are shifted by a share of their own median:
    -1 removes the patient's level (what per-slide normalisation would do to the score), +1 adds to it (what slide
    context would add). No labels are used by the shifts."""
    from sklearn.metrics import roc_auc_score

    z = np.load(RESULTS / f"{name}.npz")
    y, g = z["y_val"], z["g_val"]
    rows = [
        f"patient context for {name} (validation patients, logit of p)",
        "| views | pooled | within patients (mean) | shift -1 | -0.5 | -0.25 | +0.25 | +0.5 | +1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for views in (1, 8):
        p = np.clip(z["p_val"][:views].mean(axis=0), 1e-6, 1 - 1e-6)
        logit = np.log(p / (1 - p))
        mixed = [pid for pid in np.unique(g) if len(np.unique(y[g == pid])) == 2]
        within = np.mean([roc_auc_score(y[g == pid], logit[g == pid]) for pid in mixed])
        level = np.zeros_like(logit)
        for pid in np.unique(g):
            level[g == pid] = np.median(logit[g == pid])
        shifted = [roc_auc_score(y, logit + a * level) for a in (-1, -0.5, -0.25, 0.25, 0.5, 1)]
        rows.append(
            f"| {views} | {roc_auc_score(y, logit):.4f} | {within:.4f} ({len(mixed)} patients) | "
            + " | ".join(f"{v:.4f}" for v in shifted)
            + " |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "table", "list", "ensemble", "patients", "context"))
    parser.add_argument("levers", nargs="*")
    parser.add_argument("--data", type=Path, default=None, help="labelled folder (default ../shared idc-dev)")
    parser.add_argument("--weights", default=None, help="base weights .h5 (default the ../shared alpha 0.35 file)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over patients")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"where rows go (default {RESULTS})")
    args = parser.parse_args(argv)
    set_results(args.results)
    if args.action == "list":
        for name, (what, change) in LEVERS.items():
            print(f"{name:<14} {what}  {change}")
        return 0
    if args.action == "table":
        print(table(args.bootstrap))
        return 0
    if args.action == "ensemble":
        print(ensemble(args.levers, args.bootstrap))
        return 0
    if args.action == "patients":
        print("\n\n".join(patients(name, 8) for name in args.levers))
        return 0
    if args.action == "context":
        print("\n\n".join(context(name) for name in args.levers))
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from histod.logs import configure

    configure("info", "console", stream=sys.stderr)
    data_dir = args.data or shared_data()
    weights = args.weights or (str(shared_weights()) if shared_weights() else None)
    if data_dir is None or weights is None:
        say("skipped: needs ../shared/data/idc-dev and the ../shared alpha 0.35 weights (or --data and --weights)")
        return 0
    unknown = [n for n in args.levers if n not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown lever(s) {unknown}: see `bench/levers.py list`")
    prepared: dict[int, dict[str, Any]] = {}
    for name in args.levers:
        size = int({**BASE, **LEVERS[name][1]}["image_size"])
        if size not in prepared:
            prepared = {size: prepare(data_dir, size, BASE["seed"], BASE["val_split"])}  # keep one size in memory
        row = run_lever(name, prepared[size], data_dir, weights, args.bootstrap)
        v = row["validation"]
        say(
            f"{name}: balanced accuracy {v['balanced_accuracy']:.4f} {v['ci95']['balanced_accuracy']}, "
            f"ROC AUC {v['roc_auc']:.4f} {v['ci95']['roc_auc']}, {row['train_min']:.1f} min"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
