"""Keras against LiteRT on trained models: how far two float32 runtimes disagree through MobileNetV2.

    .venv/bin/python bench/parity.py [--seeds 1,2,3] [--head-epochs 1] [--epochs 2] [--tiny-seeds 1,2,3,4,5]

Each model is trained by `histod train`'s own pipeline (``trainer.api.train``: fit, Platt scaling folded into
the last layer, export, the run's own parity record), then model.keras (Keras, TensorFlow's CPU kernels) and
model.tflite (histod.litert: XNNPACK, 2 threads, as the service runs it) score every image of the data set,
training and validation alike: more images than the validation split alone, so a better look at the tail.

* ``idc``: ../shared idc-dev (8,127 tiles), 128 px, alpha 0.35 ImageNet weights, the default recipe with
  ``--head-epochs`` + ``--epochs`` epochs, one model per ``--seeds`` seed (its own validation patients);
* ``tiny``: the test suite's model (tests/conftest.py): generated tiles, 48 px, random weights, 1 + 1 epochs,
  no moving average, one per ``--tiny-seeds`` seed;
* ``--runs DIR ...``: run folders trained before (by `histod train`), compared on their own data_dir.

Per model: images, max / p99 / median |p Keras - p LiteRT|, max |logit difference| (p within 1e-6 of 0 or 1
left out), labels that differ at the run's threshold and how close to it those images lie, the Platt scale, and
the parity record `histod train` wrote into metrics.json. Writes bench/results/parity.json.
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

from bench.common import load_average, machine, say, shared_data, shared_weights, table, write_result


def _logit(p: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(np.log(p / (1 - p)), dtype=np.float64)


def compare(run: Path, data_dir: Path) -> dict[str, Any]:
    """model.keras against model.tflite on every image of ``data_dir``, at the run's threshold."""
    import keras

    from histod.litert import LiteRTModel
    from histod.runs import KERAS_FILE, TFLITE_FILE, load_metrics, load_run
    from histod.trainer import data

    info = load_run(run)
    images, _, _, _ = data.load_images(data.discover(data_dir), info.image_size)
    model = keras.models.load_model(run / KERAS_FILE, compile=False)
    started = time.monotonic()
    k = np.asarray(model.predict(images.astype(np.float32), batch_size=64, verbose=0), dtype=np.float64).ravel()
    keras_s = time.monotonic() - started
    started = time.monotonic()
    lite = LiteRTModel(run / TFLITE_FILE, threads=2).predict(images).astype(np.float64)
    litert_s = time.monotonic() - started
    diff = np.abs(k - lite)
    inside = (np.minimum(k, lite) > 1e-6) & (np.maximum(k, lite) < 1 - 1e-6)
    t = info.threshold
    flipped = (k >= t) != (lite >= t)
    metrics: dict[str, Any] = load_metrics(run)
    return {
        "images": int(k.size),
        "max_abs_diff": float(diff.max()),
        "p99_abs_diff": float(np.percentile(diff, 99)),
        "median_abs_diff": float(np.median(diff)),
        "max_abs_logit_diff": float(np.abs(_logit(k[inside]) - _logit(lite[inside])).max()),
        "threshold": t,
        "labels_disagreeing": int(flipped.sum()),
        "flipped_images_distance_to_threshold": [float(abs(v - t)) for v in k[flipped]],
        "images_within_1e-3_of_threshold": int(np.sum(np.abs(k - t) <= 1e-3)),
        "calibration_scale": info.calibration_scale,
        "keras_s": round(keras_s, 1),
        "litert_s": round(litert_s, 1),
        "run_parity": metrics.get("parity"),
        "run_validation": {key: metrics.get(key) for key in ("balanced_accuracy", "roc_auc", "ece", "epochs_run")},
    }


def train_one(cfg: Any) -> Path:
    from histod.errors import ExportParityError
    from histod.trainer.api import train

    try:
        return train(cfg)
    except ExportParityError as exc:  # the run is complete and marked: measure it all the same
        say(f"the run's own check failed: {exc}")
        return Path(cfg.out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="labelled folder (default ../shared idc-dev)")
    parser.add_argument("--weights", default=None, help="base weights .h5 (default the ../shared alpha 0.35 file)")
    parser.add_argument("--seeds", default="1,2,3", help="one idc model per seed ('' for none)")
    parser.add_argument("--head-epochs", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs of the idc models")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--tiny-seeds", default="1,2,3,4,5", help="one test-size model per seed ('' for none)")
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="existing run folders to compare too")
    parser.add_argument("--name", default="parity", help="results file name (default parity)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from histod.logs import configure
    from histod.synthetic import make_dataset
    from histod.trainer.config import TrainConfig

    configure("info", "console", stream=sys.stderr)
    conditions = machine()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="histod-bench-parity-") as tmp:
        root = Path(tmp)
        data_dir = args.data or shared_data()
        weights = args.weights or str(shared_weights() or "none")
        for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
            if data_dir is None:
                break
            cfg = TrainConfig(
                data_dir=data_dir,
                out=root / f"idc-{seed}",
                weights=weights,
                image_size=args.image_size,
                head_epochs=args.head_epochs,
                epochs=args.epochs,
                seed=seed,
            )
            say(f"training idc seed {seed}: {args.image_size} px, {args.head_epochs} + {args.epochs} epochs")
            started = time.monotonic()
            run = train_one(cfg)
            rows.append(
                {"model": f"idc seed {seed}", "train_s": round(time.monotonic() - started), **compare(run, data_dir)}
            )
            say(json.dumps({k: v for k, v in rows[-1].items() if not isinstance(v, list | dict)}))
        tiny = make_dataset(root / "tiny-data")
        for seed in [int(s) for s in args.tiny_seeds.split(",") if s.strip()]:
            cfg = TrainConfig(
                data_dir=tiny,
                out=root / f"tiny-{seed}",
                weights="none",
                image_size=48,
                head_epochs=1,
                epochs=1,
                batch_size=16,
                ema=0.0,
                seed=seed,
            )
            say(f"training tiny seed {seed}")
            started = time.monotonic()
            run = train_one(cfg)
            rows.append(
                {"model": f"tiny seed {seed}", "train_s": round(time.monotonic() - started), **compare(run, tiny)}
            )
    for run in args.runs:
        config = json.loads((run / "config.json").read_text())  # as written (a run of any histod version)
        say(f"comparing the existing run {run}")
        rows.append({"model": f"run {run}", "config": config, **compare(run, Path(config["data_dir"]))})
    headers = ["model", "images", "max |diff|", "p99 |diff|", "median", "max |dlogit|", "labels differ", "scale"]
    print(
        table(
            headers,
            [
                [
                    r["model"],
                    r["images"],
                    f"{r['max_abs_diff']:.2e}",
                    f"{r['p99_abs_diff']:.2e}",
                    f"{r['median_abs_diff']:.2e}",
                    f"{r['max_abs_logit_diff']:.2e}",
                    r["labels_disagreeing"],
                    f"{r['calibration_scale']:.3f}",
                ]
                for r in rows
            ],
        )
    )
    write_result(
        args.name,
        {
            "method": __doc__,
            "conditions": {**conditions, "load_average_at_end": load_average()},
            "args": vars(args),
            "models": rows,
            "worst": {
                "max_abs_diff": max((r["max_abs_diff"] for r in rows), default=None),
                "p99_abs_diff": max((r["p99_abs_diff"] for r in rows), default=None),
                "labels_disagreeing": sum(r["labels_disagreeing"] for r in rows),
            },
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
