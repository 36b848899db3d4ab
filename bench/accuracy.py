"""Our default recipe against the paper's literal recipe: same training patients, same held-out patients.

    .venv/bin/python bench/accuracy.py [--data DIR] [--image-size N] [--paper-epochs 8] [--recipes ours,paper]

Protocol (both recipes see ONLY the training patients; the held-out patients are scored once, at the end):

* The outer split is the one ``histod train`` makes (``trainer.data.split``: stratified, grouped by patient,
  20 %, seed 42), so the held-out patients are the validation patients of a ``histod train`` run with that seed,
  and fold 1 of ``histod train --cv 5``.
* ``ours``: what ``histod train`` does with no preset (TrainConfig's defaults; ``--image-size``,
  ``--ours-head-epochs`` and ``--ours-epochs`` override them), through the trainer's own functions
  (``build_model``, ``fit``, ``fit_calibration`` when the recipe calibrates, ``decision_threshold``). Its
  monitoring set is an inner patient-grouped split of the training patients: EarlyStopping, Platt scaling and
  the decision threshold use it, then the model is scored on the held-out patients.
* ``paper``: the paper's literal recipe in plain Keras: pixels / 255 (MobileNetV2 expects [-1, 1]), the
  ImageNet base and a GlobalAveragePooling -> Dense(1, sigmoid) head all trainable from the start, one phase at
  Adam 1e-5, batch 8, rotation/zoom/shear/horizontal-flip augmentation, no class weights, a fixed number of
  epochs, an image-level random 80/20 split of the training patients' images for monitoring (patients leak
  across it: its monitoring accuracy is optimistic), threshold 0.5.

Both recipes use the same input size (``--image-size``, default the default recipe's) and alpha (``--alpha``,
default 0.35, the ImageNet weights in ``../shared``). Both are also shown at the threshold that maximises balanced
accuracy on the held-out patients themselves (an oracle row: it says what the ranking allows, not what a
deployed model would do). 95 % confidence intervals come from a bootstrap over held-out PATIENTS (not patches).
Writes bench/results/accuracy.json (or --name).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    fmt,
    load_average,
    machine,
    say,
    self_peak_rss_mb,
    shared_data,
    shared_weights,
    synthetic_dataset,
    table,
    write_result,
)

KEYS = ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")
# the parts of TrainConfig the paper recipe reads (its data pipeline and its single view), fixed here so that
# they do not follow TrainConfig's defaults: the paper's rotation/zoom/shear/flip only, batch 8, Adam 1e-5
PAPER: dict[str, Any] = {
    "head_epochs": 0,
    "learning_rate": 1e-5,
    "batch_size": 8,
    "augment": True,
    "dihedral": False,
    "patient_cap": 0,
    "tta": 1,
}


def paper_model(cfg: Any) -> Any:
    """Input 0..255 -> x / 255 -> MobileNetV2 base (all trainable, BatchNorm in training mode while fitting, as
    plain Keras does) -> GlobalAveragePooling -> Dense(1, sigmoid)."""
    import keras

    from histod.trainer.model import build_base

    base = build_base(cfg)
    base.trainable = True
    inputs = keras.Input(shape=(cfg.image_size, cfg.image_size, 3), dtype="float32", name="rgb_0_255")
    x = keras.layers.Rescaling(1 / 255.0, name="divide_by_255")(inputs)
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="p_malignant")(x)
    return keras.Model(inputs, outputs, name="paper_mobilenetv2")


def train_ours(
    cfg: Any, x_fit: Any, y_fit: Any, x_mon: Any, y_mon: Any, groups: list[str]
) -> tuple[Any, dict[str, Any]]:
    """The trainer's recipe; Platt scaling (when the recipe calibrates) and the threshold from the monitoring set."""
    import keras

    from histod.trainer.evaluate import apply_calibration, decision_threshold, fit_calibration
    from histod.trainer.fit import fit
    from histod.trainer.model import build_model
    from histod.trainer.score import predict_views

    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg)
    result = fit(model, cfg, x_fit, y_fit, x_mon, y_mon, groups=groups)
    views = predict_views(model, x_mon, cfg.tta).astype(np.float64)
    scale, shift = fit_calibration(y_mon, views) if cfg.calibrate else (1.0, 0.0)
    p_mon = apply_calibration(views, scale, shift).mean(axis=0)
    threshold = decision_threshold(y_mon, p_mon, cfg.threshold, cfg.target_sensitivity)
    return model, {
        "threshold": threshold,
        "threshold_rule": "the recipe's rule on the inner patient-grouped monitoring split",
        "threshold_source": "from its inner split",
        "calibration": {"scale": scale, "shift": shift},
        "epochs_run": len(result.phases),
        "phases": result.phases,
        "best_epoch": result.best_epoch,
        "history": result.history,
    }


def train_paper(cfg: Any, x_fit: Any, y_fit: Any, x_mon: Any, y_mon: Any, epochs: int) -> tuple[Any, dict[str, Any]]:
    import keras

    from histod.trainer.fit import datasets

    keras.utils.set_random_seed(cfg.seed)
    model = paper_model(cfg)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-5),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy")],
    )
    train, mon = datasets(cfg, x_fit, y_fit, x_mon, y_mon)

    class Log(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            shown = {k: round(float(v), 4) for k, v in (logs or {}).items()}
            say(f"paper epoch {epoch + 1}/{epochs}: {shown}")

    hist = model.fit(train, validation_data=mon, epochs=epochs, callbacks=[Log()], verbose=0)
    history = {k: [float(v) for v in vs] for k, vs in hist.history.items()}
    return model, {
        "threshold": 0.5,
        "threshold_rule": "0.5 (the paper's argmax)",
        "threshold_source": "fixed",
        "calibration": {"scale": 1.0, "shift": 0.0},
        "epochs_run": epochs,
        "history": history,
        "monitor_accuracy_image_level": history.get("val_accuracy", [None])[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="labelled folder (default ../shared idc-dev)")
    parser.add_argument("--weights", default=None, help="base weights .h5 (default the ../shared alpha 0.35 file)")
    parser.add_argument("--alpha", type=float, default=0.35)
    parser.add_argument("--image-size", type=int, default=None, help="both recipes (default: the default recipe's)")
    parser.add_argument("--ours-head-epochs", type=int, default=None, help="ours: head epochs (default the recipe's)")
    parser.add_argument("--ours-epochs", type=int, default=None, help="ours: fine-tuning epochs (default the recipe's)")
    parser.add_argument("--paper-epochs", type=int, default=8)
    parser.add_argument("--recipes", default="ours,paper", help="ours, paper or both (default)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--val-split", type=float, default=0.2)
    parser.add_argument("--limit", type=int, default=0, help="use only this many images (smoke tests), 0 = all")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over patients")
    parser.add_argument("--name", default="accuracy", help="results file name (default accuracy)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from histod.logs import configure

    configure("info", "console", stream=sys.stderr)  # the trainer's epoch lines go to stderr, tables to stdout

    from histod.trainer import data
    from histod.trainer.config import TrainConfig
    from histod.trainer.evaluate import (
        apply_calibration,
        bootstrap_ci,
        choose_threshold,
        expected_calibration_error,
        metrics,
    )
    from histod.trainer.score import predict_views

    conditions = machine()
    image_size: int = args.image_size or TrainConfig.model_fields["image_size"].default
    ours_schedule = {
        key: value
        for key, value in (("head_epochs", args.ours_head_epochs), ("epochs", args.ours_epochs))
        if value is not None
    }
    data_dir: Path = (
        args.data or shared_data() or synthetic_dataset(Path(tempfile.gettempdir()) / "histod-bench-synthetic")
    )
    weights = args.weights or str(shared_weights() or "none")
    samples = data.discover(data_dir)
    if args.limit:
        rng = np.random.default_rng(args.seed)
        samples = [samples[i] for i in sorted(rng.choice(len(samples), size=args.limit, replace=False))]
    say(f"decoding {len(samples)} images from {data_dir} at {image_size} px")
    images, labels, kept, skipped = data.load_images(samples, image_size)
    outer = data.split(kept, args.val_split, args.seed)
    index = {s.path: i for i, s in enumerate(kept)}
    tr = np.array([index[s.path] for s in outer.train])
    va = np.array([index[s.path] for s in outer.val])
    x_val, y_val = images[va], labels[va]
    val_groups = np.array([s.group for s in outer.val])
    # ours: an inner patient-grouped split of the training patients
    inner = data.split(outer.train, args.val_split, args.seed)
    fit_idx = np.array([index[s.path] for s in inner.train])
    mon_idx = np.array([index[s.path] for s in inner.val])
    # paper: an image-level random split of the same training images
    rng = np.random.default_rng(args.seed)
    shuffled = rng.permutation(tr)
    cut = round(len(shuffled) * (1 - args.val_split))
    paper_fit, paper_mon = np.sort(shuffled[:cut]), np.sort(shuffled[cut:])
    split_info: dict[str, Any] = {
        "train_patients": len({s.group for s in outer.train}),
        "val_patients": len(set(val_groups.tolist())),
        "train_images": data.counts(outer.train),
        "val_images": data.counts(outer.val),
        "ours_fit_images": len(fit_idx),
        "ours_monitor_images": len(mon_idx),
        "paper_fit_images": len(paper_fit),
        "paper_monitor_images": len(paper_mon),
        "skipped": len(skipped),
    }
    say(f"split: {split_info}")

    results: dict[str, dict[str, Any]] = {}
    for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        with tempfile.TemporaryDirectory(prefix=f"histod-bench-{recipe}-") as tmp:
            common = {
                "data_dir": data_dir,
                "out": Path(tmp),
                "image_size": image_size,
                "alpha": args.alpha,
                "weights": weights,
                "seed": args.seed,
                "val_split": args.val_split,
            }
            started = time.monotonic()
            if recipe == "ours":
                cfg = TrainConfig(**common, **ours_schedule)
                say(f"training ours: {cfg.model_dump(mode='json', exclude={'data_dir', 'out'})}")
                groups = [kept[j].group for j in fit_idx]
                model, info = train_ours(
                    cfg, images[fit_idx], labels[fit_idx], images[mon_idx], labels[mon_idx], groups
                )
            elif recipe == "paper":
                cfg = TrainConfig(**common, **PAPER, epochs=args.paper_epochs)
                say(f"training paper: {args.paper_epochs} epochs, everything trainable, Adam 1e-5, pixels / 255")
                model, info = train_paper(
                    cfg, images[paper_fit], labels[paper_fit], images[paper_mon], labels[paper_mon], args.paper_epochs
                )
            else:
                raise SystemExit(f"unknown recipe {recipe!r}: use ours, paper")
            train_s = time.monotonic() - started
            views = predict_views(model, x_val, cfg.tta).astype(np.float64)
            p_val = apply_calibration(views, info["calibration"]["scale"], info["calibration"]["shift"]).mean(axis=0)
            wall_s = time.monotonic() - started
            threshold = float(info["threshold"])
            scored = metrics(y_val, p_val, threshold)
            oracle_t = choose_threshold(y_val, p_val)
            oracle = metrics(y_val, p_val, oracle_t)
            ci = bootstrap_ci(y_val, p_val, val_groups, threshold, args.bootstrap, args.seed)
            ece = expected_calibration_error(y_val, p_val)
            results[recipe] = {
                **info,
                "config": cfg.model_dump(mode="json"),
                "validation": {k: scored[k] for k in (*KEYS, "threshold", "confusion_matrix", "f1")},
                "ci95": ci,
                "ece": ece,
                "oracle": {k: oracle[k] for k in (*KEYS, "threshold")},
                "train_s": round(train_s, 1),
                "wall_s": round(wall_s, 1),
            }
            say(f"{recipe}: {results[recipe]['validation']} in {wall_s / 60:.1f} min")
            del model
            import keras

            keras.backend.clear_session()

    print(
        f"\naccuracy: {data_dir}, {split_info['val_patients']} held-out patients "
        f"({sum(split_info['val_images'].values())} images) never seen by either recipe; {image_size} px, "
        f"alpha {args.alpha}, weights {Path(weights).name}; {conditions['nproc']} cores "
        f"({conditions['cpu_model']}), load avg {conditions['load_average_at_start']}"
    )
    rows = []
    for recipe, r in results.items():
        v, ci = r["validation"], r["ci95"]
        rows.append(
            [
                f"{recipe} (threshold {v['threshold']:.3f}, {r['threshold_source']})",
                f"{v['balanced_accuracy']:.4f} [{ci['balanced_accuracy'][0]:.3f}, {ci['balanced_accuracy'][1]:.3f}]",
                f"{v['roc_auc']:.4f} [{ci['roc_auc'][0]:.3f}, {ci['roc_auc'][1]:.3f}]",
                f"{v['sensitivity']:.4f}",
                f"{v['specificity']:.4f}",
                r["epochs_run"],
                f"{r['wall_s'] / 60:.1f}",
            ]
        )
    for recipe, r in results.items():
        o = r["oracle"]
        rows.append(
            [
                f"{recipe} (oracle threshold {o['threshold']:.3f}, on val)",
                f"{o['balanced_accuracy']:.4f}",
                f"{o['roc_auc']:.4f}",
                f"{o['sensitivity']:.4f}",
                f"{o['specificity']:.4f}",
                "",
                "",
            ]
        )
    print(
        table(
            ["recipe", "balanced acc [95% CI]", "ROC AUC [95% CI]", "sensitivity", "specificity", "epochs", "min"],
            rows,
        )
    )
    if "paper" in results:
        print(
            f"paper's own (image-level) monitoring accuracy: {fmt(results['paper']['monitor_accuracy_image_level'], 4)}"
        )
    write_result(
        args.name,
        {
            "benchmark": "accuracy",
            "conditions": {**conditions, "load_average_at_end": load_average()},
            "data_dir": str(data_dir),
            "weights": weights,
            "image_size": image_size,
            "alpha": args.alpha,
            "seed": args.seed,
            "split": split_info,
            "protocol": (__doc__ or "").split("Protocol", 1)[-1].strip(),
            "recipes": results,
            "peak_rss_mb": round(self_peak_rss_mb(), 1),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
