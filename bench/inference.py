"""The same trained model through four runtimes: images/s at batch 1, 8 and 32, plus int8 agreement and sizes.

    .venv/bin/python bench/inference.py --run RUN_DIR [--images DIR]

Runtimes, each timed as ONE CALL PER BATCH on the same decoded images (decoding is not timed):

* ``keras.predict``: ``model.predict(batch)`` (what a naive server would call; its per-call set-up counts);
* ``keras tf.function``: ``model(x, training=False)`` inside a ``tf.function`` with a dynamic batch dimension;
* ``litert float32``: the run's ``model.tflite`` through histod.litert, the runner ``histod serve`` uses;
* ``litert int8``: a full-integer model quantised here from ``model.keras`` with ``tf.lite.TFLiteConverter``
  and a representative set drawn from the run's TRAINING split (``split.csv``); uint8 input (scale 1, zero
  point 0 for raw 0..255 pixels, checked), output dequantised with its scale and zero point.

Agreement of int8 with float32 is measured on real images: the run's validation split (patients the model
never saw), or ``--images DIR``. Writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    fmt,
    load_average,
    machine,
    say,
    self_peak_rss_mb,
    shared_data,
    synthetic_dataset,
    table,
    write_result,
)

Images = NDArray[np.uint8]
Predict = Callable[[NDArray[Any]], NDArray[np.float32]]


# --- images ----------------------------------------------------------------------------------------------------
def _split_rows(run_dir: Path) -> tuple[Path | None, list[dict[str, str]]]:
    """(data_dir of the run, rows of split.csv), or (None, []) when the run does not say."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        data_dir = Path(config["data_dir"])
        with (run_dir / "split.csv").open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, KeyError, ValueError):
        return None, []
    return (data_dir if data_dir.is_dir() else None), rows


def _load(paths: list[Path], size: int) -> Images:
    from histod import imaging

    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = imaging.load(path, size)
    return out


def _pick(items: list[Any], n: int, seed: int) -> list[Any]:
    if n <= 0 or n >= len(items):
        return items
    rng = np.random.default_rng(seed)
    return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False))]


def gather_images(
    run_dir: Path, images_dir: Path | None, size: int, n_eval: int, n_calib: int, seed: int
) -> tuple[Images, NDArray[np.int64] | None, Images, dict[str, Any]]:
    """(eval images, their labels or None, representative training images, where they came from)."""
    from histod.trainer import data

    data_dir, rows = _split_rows(run_dir)
    source: dict[str, Any] = {}
    train_paths = [data_dir / r["path"] for r in rows if r["split"] == "train"] if data_dir else []
    labels: NDArray[np.int64] | None = None
    if images_dir is not None:
        try:
            samples = data.discover(images_dir)
            eval_paths = [s.path for s in samples]
            labelled = [s.label for s in samples]
        except Exception:  # not a labelled folder: any images under it
            eval_paths = sorted(p for p in images_dir.rglob("*") if p.is_file() and data.is_image(p))
            labelled = []
        source["eval"] = f"--images {images_dir}"
    elif data_dir is not None and rows:
        val = [r for r in rows if r["split"] == "val"]
        eval_paths = [data_dir / r["path"] for r in val]
        labelled = [data.CLASS_DIRS.index(r["label"]) for r in val]
        source["eval"] = f"validation split of the run ({data_dir}, split.csv)"
    else:
        root = shared_data() or synthetic_dataset(Path(tempfile.gettempdir()) / "histod-bench-synthetic")
        samples = data.discover(root)
        eval_paths = [s.path for s in samples]
        labelled = [s.label for s in samples]
        source["eval"] = f"all of {root} (the run's split.csv or data folder is missing)"
    picked = _pick(list(range(len(eval_paths))), n_eval, seed)
    eval_paths = [eval_paths[i] for i in picked]
    if labelled:
        labels = np.array([labelled[i] for i in picked], dtype=np.int64)
    if not eval_paths:
        raise SystemExit("no images to benchmark on")
    say(f"decoding {len(eval_paths)} evaluation images at {size} px ({source['eval']})")
    x_eval = _load(eval_paths, size)
    if train_paths:
        calib_paths = _pick(train_paths, n_calib, seed + 1)
        source["representative"] = f"{len(calib_paths)} images of the run's training split"
    else:
        calib_paths = eval_paths[:n_calib]
        source["representative"] = f"NOT the training split (unavailable): the first {len(calib_paths)} eval images"
        say(f"WARNING: {source['representative']}")
    x_calib = _load(calib_paths, size)
    source["n_eval"] = len(eval_paths)
    source["n_representative"] = len(calib_paths)
    return x_eval, labels, x_calib, source


# --- runtimes --------------------------------------------------------------------------------------------------
def quantise_int8(keras_model: Any, calib: Images) -> bytes:
    """Full-integer LiteRT model: int8 weights and activations, uint8 input and output."""
    import contextlib
    import io

    import tensorflow as tf

    def representative() -> Iterator[list[NDArray[np.float32]]]:
        for i in range(len(calib)):
            yield [calib[i : i + 1].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    with contextlib.redirect_stdout(io.StringIO()):
        data: bytes = converter.convert()
    return data


def time_calls(predict: Predict, images: Images, batch: int, min_seconds: float, min_calls: int) -> dict[str, Any]:
    """Call ``predict`` on successive batches (cycling through ``images``) for at least ``min_seconds``."""
    n = len(images)
    if n < batch:
        images = np.concatenate([images] * (batch // n + 1))
        n = len(images)
    batches = [images[i : i + batch] for i in range(0, n - batch + 1, batch)]
    for b in batches[:3]:  # warm-up: tracing, tensor allocation, caches
        predict(b)
    calls: list[float] = []
    started = time.perf_counter()
    k = 0
    while True:
        t = time.perf_counter()
        predict(batches[k % len(batches)])
        calls.append(time.perf_counter() - t)
        k += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and k >= min_calls:
            break
    ms = sorted(c * 1000 for c in calls)
    return {
        "batch": batch,
        "calls": k,
        "seconds": round(elapsed, 3),
        "images_per_s": round(k * batch / elapsed, 1),
        "ms_per_call_median": round(ms[len(ms) // 2], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="RUN_DIR written by `histod train`")
    parser.add_argument("--images", type=Path, default=None, help="images for timing and agreement (default: val)")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes (default 1,8,32)")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per cell (default 3)")
    parser.add_argument("--min-calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="LiteRT threads (default 2)")
    parser.add_argument("--n-eval", type=int, default=0, help="evaluation images, 0 = all (default)")
    parser.add_argument("--n-calib", type=int, default=300, help="representative images (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None, help="where model_int8.tflite goes (default: a tmp dir)")
    parser.add_argument("--name", default="inference", help="results file name (default inference)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from histod.litert import LiteRTModel
    from histod.runs import KERAS_FILE, TFLITE_FILE, load_run
    from histod.trainer.evaluate import metrics

    run_dir: Path = args.run
    info = load_run(run_dir)
    batches = [int(b) for b in args.batches.split(",")]
    conditions = machine()
    x_eval, labels, x_calib, source = gather_images(
        run_dir, args.images, info.image_size, args.n_eval, args.n_calib, args.seed
    )

    import keras
    import tensorflow as tf

    say("loading model.keras")
    model = keras.models.load_model(run_dir / KERAS_FILE, compile=False)
    out_dir: Path = args.out_dir or Path(tempfile.mkdtemp(prefix="histod-bench-int8-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    int8_path = out_dir / "model_int8.tflite"
    say(f"quantising to full-integer int8 with {len(x_calib)} representative images")
    t = time.perf_counter()
    int8_bytes = quantise_int8(model, x_calib)
    quantise_s = time.perf_counter() - t
    int8_path.write_bytes(int8_bytes)

    fn = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec([None, info.image_size, info.image_size, 3], tf.float32)],
    )

    def keras_predict(x: NDArray[Any]) -> NDArray[np.float32]:
        return np.asarray(model.predict(x.astype(np.float32), batch_size=len(x), verbose=0)).reshape(-1)

    def keras_function(x: NDArray[Any]) -> NDArray[np.float32]:
        return np.asarray(fn(tf.convert_to_tensor(x, dtype=tf.float32))).reshape(-1)

    float_rt = LiteRTModel(run_dir / TFLITE_FILE, args.threads)
    int8_rt = LiteRTModel(int8_bytes, args.threads, name="model_int8.tflite")
    quant = {
        "input_dtype": str(int8_rt.input_dtype),
        "input_scale": int8_rt.input_scale,
        "input_zero_point": int8_rt.input_zero,
        "output_dtype": str(int8_rt.output_dtype),
        "output_scale": int8_rt.output_scale,
        "output_zero_point": int8_rt.output_zero,
    }
    say(f"int8 model: {quant}")
    runtimes: list[tuple[str, Predict]] = [
        ("keras.predict", keras_predict),
        ("keras tf.function", keras_function),
        ("litert float32", float_rt.predict),
        ("litert int8", int8_rt.predict),
    ]
    timings: dict[str, list[dict[str, Any]]] = {}
    for name, predict in runtimes:
        timings[name] = []
        for b in batches:
            say(f"timing {name} at batch {b}")
            timings[name].append(time_calls(predict, x_eval, b, args.seconds, args.min_calls))

    say(f"agreement on {len(x_eval)} images")
    p_keras = np.asarray(model.predict(x_eval.astype(np.float32), batch_size=32, verbose=0)).reshape(-1)
    p_float = float_rt.predict(x_eval)
    p_int8 = int8_rt.predict(x_eval)
    threshold = info.threshold
    delta = np.abs(p_int8.astype(np.float64) - p_float)
    agreement = {
        "images": len(x_eval),
        "threshold": threshold,
        "identical_labels": float(np.mean((p_int8 >= threshold) == (p_float >= threshold))),
        "label_flips": int(np.sum((p_int8 >= threshold) != (p_float >= threshold))),
        "max_abs_delta_p": float(delta.max()),
        "mean_abs_delta_p": float(delta.mean()),
        "keras_vs_litert_float32_max_abs_diff": float(np.max(np.abs(p_keras.astype(np.float64) - p_float))),
    }
    scores: dict[str, Any] = {}
    if labels is not None and len(np.unique(labels)) == 2:
        for name, p in (("litert float32", p_float), ("litert int8", p_int8)):
            m = metrics(labels, p, threshold)
            scores[name] = {k: m[k] for k in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")}
    sizes = {
        "model.keras": (run_dir / KERAS_FILE).stat().st_size,
        "model.tflite (float32)": (run_dir / TFLITE_FILE).stat().st_size,
        "model_int8.tflite": int8_path.stat().st_size,
    }

    # --- tables ---
    rows = []
    for name, cells in timings.items():
        rows.append([name, *[c["images_per_s"] for c in cells], *[c["ms_per_call_median"] for c in cells]])
    headers = ["runtime", *[f"img/s b{b}" for b in batches], *[f"ms/call b{b}" for b in batches]]
    float_by_b = {c["batch"]: c["images_per_s"] for c in timings["litert float32"]}
    speedup = {c["batch"]: round(c["images_per_s"] / float_by_b[c["batch"]], 2) for c in timings["litert int8"]}
    print(
        f"\ninference: run {info.run_id}, {info.image_size} px, alpha {info.alpha}, LiteRT threads {args.threads}, "
        f"{conditions['nproc']} cores ({conditions['cpu_model']}), load avg {conditions['load_average_at_start']}"
    )
    print(table(headers, rows, digits=1))
    print("\nint8 vs float32 (LiteRT): speed-up " + ", ".join(f"b{b} {s:.2f}x" for b, s in speedup.items()))
    print(
        table(
            ["images", "identical labels", "flips", "max |dp|", "mean |dp|", "threshold"],
            [
                [
                    agreement["images"],
                    f"{agreement['identical_labels']:.4f}",
                    agreement["label_flips"],
                    f"{agreement['max_abs_delta_p']:.4f}",
                    f"{agreement['mean_abs_delta_p']:.4f}",
                    f"{threshold:.4f}",
                ]
            ],
        )
    )
    if scores:
        print(
            table(
                ["model", "balanced acc", "ROC AUC", "sensitivity", "specificity"],
                [
                    [n, *[fmt(s[k], 4) for k in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")]]
                    for n, s in scores.items()
                ],
            )
        )
    print(table(["file", "bytes", "MiB"], [[k, v, v / 2**20] for k, v in sizes.items()], digits=2))
    best_speedup = max(speedup.values())
    target = {
        "int8_speedup_target": 1.5,
        "int8_identical_labels_target": 0.99,
        "speedup_by_batch": speedup,
        "met": bool(min(speedup.values()) >= 1.5 and agreement["identical_labels"] >= 0.99),
    }
    print(
        f"\ntarget int8 >= 1.5x float32 with >= 99% identical labels: speed-up {min(speedup.values()):.2f}-"
        f"{best_speedup:.2f}x, identical {agreement['identical_labels']:.2%} -> {'MET' if target['met'] else 'MISSED'}"
    )
    write_result(
        args.name,
        {
            "benchmark": "inference",
            "conditions": {**conditions, "load_average_at_end": load_average()},
            "run": {"dir": str(run_dir), "run_id": info.run_id, "image_size": info.image_size, "alpha": info.alpha},
            "method": "one call per batch on pre-decoded images; warm-up 3 calls; timed >= --seconds per cell",
            "litert_threads": args.threads,
            "images": source,
            "timings": timings,
            "int8": {"quantisation": quant, "quantise_seconds": round(quantise_s, 1), "path": str(int8_path)},
            "agreement": agreement,
            "scores": scores,
            "sizes_bytes": sizes,
            "target": target,
            "peak_rss_mb": round(self_peak_rss_mb(), 1),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
