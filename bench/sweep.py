"""Many training recipes x seeds at once on an accelerator, to find which levers are worth a CPU run.

    .venv/bin/python bench/sweep.py pack .sweep/idc.npz        # here: PNG bytes + the lever protocol's split
    KERAS_BACKEND=jax python bench/sweep.py run .sweep/idc.npz --weights W.h5 --out DIR --jobs 8 --deadline 480
    .venv/bin/python bench/sweep.py table DIR/sweep.npz         # here: scored like bench/levers.py, with CIs

Why a second script: the lent GPU machine has JAX and PyTorch but no TensorFlow, and histod's trainer feeds
Keras through tf.data. ``run`` is the same recipe as ``trainer.model`` + ``trainer.fit`` + ``trainer.augment``
written with backend-neutral Keras only (layers, ``keras.ops``, ``model.fit`` on arrays), so it runs on any Keras
backend. It is a search tool, not a source of reported figures: a recipe it favours is then trained on the CPU
with ``bench/levers.py`` (histod's own code), and only those rows are quoted as results.

Protocol (the same as bench/levers.py): outer split = ``trainer.data.split`` (patient-grouped, 20 %, seed 42);
inner split of the training patients for monitoring (EarlyStopping, ReduceLROnPlateau, threshold). The
validation patients only score. ``pack`` computes the split with histod's code, so both scripts use the same
patients. Every job saves p(malignant) of all 8 test-time views (histod.tta order) of the monitoring and
validation images, so seed ensembles and TTA are re-scored without training.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

if __package__ in (None, ""):  # run as a file: make `bench` and `histod` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from histod.tta import view  # numpy only: no TensorFlow needed on the accelerator machine

# trainer/augment.py's stain vectors (that module needs pydantic and TensorFlow, absent on the GPU machine)
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

# The histology preset (trainer/presets.py) as the sweep's starting point; every recipe changes a few keys.
HISTOLOGY: dict[str, Any] = {
    "image_size": 96,
    "batch_size": 8,
    "head_epochs": 3,
    "epochs": 30,
    "head_lr": 1e-3,
    "lr": 1e-4,
    "fine_tune_layers": 155,
    "freeze_bn": True,
    "paper_aug": True,  # rotation 20°, zoom 0.2, shear 0.2, horizontal flip (the mission's augmentation)
    "dihedral": True,
    "stain": 0.0,
    "color": 0.0,
    "smoothing": 0.0,
    "weight_decay": 0.0,  # AdamW when > 0
    "monitor": "val_loss",  # or "val_auc" (EarlyStopping and ReduceLROnPlateau)
    "patience": 5,
    "lr_patience": 3,
    "dropout": 0.4,
    "ema": 0.0,  # > 0: Adam's moving average of the weights, swapped in for validation, with the head BN update
}

RECIPES: dict[str, dict[str, Any]] = {
    "histology": {},
    "b32": {"batch_size": 32},
    "b32_lr3e-4": {"batch_size": 32, "lr": 3e-4},
    "size128": {"image_size": 128},
    "size160": {"image_size": 160},
    "b32_size128": {"batch_size": 32, "image_size": 128},
    "auc_p8": {"monitor": "val_auc", "patience": 8, "lr_patience": 4},
    "stain_color": {"stain": 0.05, "color": 0.5},
    "bn_adapt_b32": {"batch_size": 32, "freeze_bn": False},
    "no_paper_aug": {"paper_aug": False},
    "adamw": {"weight_decay": 1e-4},
    "lr3e-5": {"lr": 3e-5},
    "epochs50_p8": {"epochs": 50, "patience": 8, "lr_patience": 4},
    "ema": {"ema": 0.999},
    "ema_size128": {"ema": 0.999, "image_size": 128},
    "ema_size160": {"ema": 0.999, "image_size": 160},
    "ema_size224": {"ema": 0.999, "image_size": 224},  # the mission's default input size
    "ema_stain_color": {"ema": 0.999, "stain": 0.05, "color": 0.5},
    "smoke_ema": {"image_size": 32, "head_epochs": 1, "epochs": 2, "batch_size": 64, "ema": 0.9},
    "smoke": {"image_size": 32, "head_epochs": 1, "epochs": 1, "batch_size": 64, "stain": 0.05, "color": 0.5},
}


# --- pack (here, with histod's code) ----------------------------------------------------------------------------
def pack(data_dir: Path, out: Path, seed: int = 42, val_split: float = 0.2) -> None:
    from histod.trainer import data

    samples = data.discover(data_dir)
    outer = data.split(samples, val_split, seed)
    inner = data.split(outer.train, val_split, seed)
    side = {s.path: 0 for s in inner.train} | {s.path: 1 for s in inner.val} | {s.path: 2 for s in outer.val}
    blobs = [s.path.read_bytes() for s in samples]
    groups = sorted({s.group for s in samples})
    code = {g: i for i, g in enumerate(groups)}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        blob=np.frombuffer(b"".join(blobs), dtype=np.uint8),
        offsets=np.cumsum([0] + [len(b) for b in blobs]),
        label=np.array([s.label for s in samples], dtype=np.int64),
        side=np.array([side[s.path] for s in samples], dtype=np.int64),  # 0 fit, 1 monitor, 2 validation
        group=np.array([code[s.group] for s in samples], dtype=np.int64),
    )
    print(f"packed {len(samples)} images ({out.stat().st_size / 1e6:.1f} MB) into {out}")


def decode(bundle: Path, size: int) -> dict[str, NDArray[Any]]:
    """histod.imaging.load's pixels for a PNG: RGB, bilinear resize to size x size."""
    from PIL import Image

    z = np.load(bundle)
    blob, off = z["blob"].tobytes(), z["offsets"]
    x = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(blob[off[i] : off[i + 1]])).convert("RGB").resize((size, size), 2))
            for i in range(len(off) - 1)
        ]
    )  # 2 = Image.Resampling.BILINEAR
    return {"x": x, "y": z["label"], "side": z["side"], "group": z["group"]}


# --- run (on any Keras backend) -----------------------------------------------------------------------------------
def affine_matrix(angle: Any, zoom: Any, shear_r: Any, shear_c: Any, flip: Any) -> Any:
    """(n, 2, 2): for each image, the map from an output pixel's (row, col) offset from the centre to the input's:
    rotation . shear . zoom . horizontal flip (flip = -1 mirrors the columns)."""
    from keras import ops

    cos, sin = ops.cos(angle), ops.sin(angle)
    # rotation @ shear, with shear = [[1, shear_r], [shear_c, 1]]
    a = cos - sin * shear_c
    b = cos * shear_r - sin
    c = sin + cos * shear_c
    d = sin * shear_r + cos
    return ops.stack([ops.stack([a * zoom, b * zoom * flip], -1), ops.stack([c * zoom, d * zoom * flip], -1)], 1)


def warp(x: Any, m: Any) -> Any:
    """Bilinear resampling of images x (n, h, w, ch) through per-image 2x2 maps m about the centre; coordinates
    past the edge are clamped to it (Keras' fill_mode="nearest")."""
    from keras import ops

    n, h, w, ch = ops.shape(x)
    rr, cc = np.meshgrid(np.arange(h, dtype="float32"), np.arange(w, dtype="float32"), indexing="ij")
    cr, ccen = (h - 1) / 2.0, (w - 1) / 2.0
    grid = ops.convert_to_tensor(np.stack([rr.ravel() - cr, cc.ravel() - ccen]))  # (2, h*w)
    src = ops.einsum("nij,jp->nip", m, grid)  # (n, 2, h*w)
    r = ops.clip(src[:, 0] + cr, 0.0, h - 1.0)
    c = ops.clip(src[:, 1] + ccen, 0.0, w - 1.0)
    r0, c0 = ops.floor(r), ops.floor(c)
    fr, fc = (r - r0)[..., None], (c - c0)[..., None]
    r0i, c0i = ops.cast(r0, "int32"), ops.cast(c0, "int32")
    r1i, c1i = ops.minimum(r0i + 1, h - 1), ops.minimum(c0i + 1, w - 1)
    flat = ops.reshape(x, (n, h * w, ch))

    def at(ri: Any, ci: Any) -> Any:
        return ops.take_along_axis(flat, (ri * w + ci)[..., None], axis=1)

    top = at(r0i, c0i) * (1.0 - fc) + at(r0i, c1i) * fc
    bottom = at(r1i, c0i) * (1.0 - fc) + at(r1i, c1i) * fc
    return ops.reshape(top * (1.0 - fr) + bottom * fr, (n, h, w, ch))


def build(rc: dict[str, Any], weights: str, seed: int) -> tuple[Any, Any, Any]:
    """(inference model, training model = augmentation + inference model, base)."""
    import keras
    from keras import ops

    class Augment(keras.layers.Layer):  # type: ignore[misc]
        """A seeded training-only augmentation: ``augment`` at training, the identity at inference."""

        def __init__(self, seed: int) -> None:
            super().__init__()
            self.gen = keras.random.SeedGenerator(seed)

        def call(self, x: Any, training: bool = False) -> Any:
            return self.augment(x) if training else x

        def augment(self, x: Any) -> Any:
            raise NotImplementedError

    class Dihedral(Augment):
        def augment(self, x: Any) -> Any:
            n = ops.shape(x)[0]
            for i in range(3):  # transpose, then flip each axis, each with probability 1/2: all 8 symmetries
                coin = keras.random.uniform((n, 1, 1, 1), seed=self.gen) < 0.5
                x = ops.where(coin, ops.transpose(x, (0, 2, 1, 3)) if i == 0 else ops.flip(x, i), x)
            return x

    class Stain(Augment):
        def __init__(self, sigma: float, seed: int) -> None:
            super().__init__(seed)
            self.sigma = sigma
            self.h, self.r = HED_FROM_RGB.astype("float32"), RGB_FROM_HED.astype("float32")

        def augment(self, x: Any) -> Any:
            n, s = ops.shape(x)[0], self.sigma
            hed = ops.einsum("bhwc,cd->bhwd", -ops.log((x + 1.0) / 256.0), self.h)
            scale = keras.random.uniform((n, 1, 1, 3), 1.0 - s, 1.0 + s, seed=self.gen)
            shift = keras.random.uniform((n, 1, 1, 3), -s, s, seed=self.gen)
            od = ops.einsum("bhwd,dc->bhwc", hed * scale + shift, self.r)
            return ops.clip(256.0 * ops.exp(-od) - 1.0, 0.0, 255.0)

    class PaperAffine(Augment):
        """The paper's rotation 20°, zoom 0.2, shear 0.2 and horizontal flip (nearest fill) as ONE affine warp per
        image: a bilinear gather written in keras.ops. Keras' RandomRotation/RandomZoom/RandomShear go through
        jax.scipy.ndimage.map_coordinates on the JAX backend, which stalled on the GPU (bench/README)."""

        def augment(self, x: Any) -> Any:
            n = ops.shape(x)[0]

            def u(lo: float, hi: float) -> Any:
                return keras.random.uniform((n,), lo, hi, seed=self.gen)

            angle = u(-20 / 180 * np.pi, 20 / 180 * np.pi)
            zoom = 1.0 + u(-0.2, 0.2)  # one factor for both axes, as RandomZoom(0.2) keeps the aspect
            shear_r, shear_c = u(-0.2, 0.2), u(-0.2, 0.2)
            flip = ops.where(u(0.0, 1.0) < 0.5, -1.0, 1.0)
            return warp(x, affine_matrix(angle, zoom, shear_r, shear_c, flip))

    size = rc["image_size"]
    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=0.35, include_top=False, weights=None)
    base.load_weights(weights)
    inputs = keras.Input((size, size, 3), name="rgb_0_255")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    x = keras.layers.Dropout(rc["dropout"])(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))

    aug: list[Any] = []
    if rc["paper_aug"]:
        aug.append(PaperAffine(seed))
    if rc["dihedral"]:
        aug.append(Dihedral(seed + 4))
    if rc["stain"] > 0:
        aug.append(Stain(rc["stain"], seed + 5))
    if rc["color"] > 0:
        s = rc["color"]
        aug += [
            keras.layers.RandomBrightness(0.1 * s, value_range=(0, 255), seed=seed + 10),
            keras.layers.RandomContrast(0.2 * s, value_range=(0, 255), seed=seed + 11),
            keras.layers.RandomSaturation((0.5 - 0.2 * s, 0.5 + 0.2 * s), value_range=(0, 255), seed=seed + 12),
            keras.layers.RandomHue(0.1 * s, value_range=(0, 255), seed=seed + 13),
        ]
    t_in = keras.Input((size, size, 3))
    t = t_in
    for layer in aug:
        t = layer(t)
    t = keras.layers.Lambda(lambda v: ops.clip(v, 0.0, 255.0))(t)
    return model, keras.Model(t_in, model(t)), base


def _callbacks(rc: dict[str, Any], model: Any, x_bn: NDArray[Any], phase: str, until: float) -> list[Any]:
    """With ema: SwapEMAWeights, then trainer.model.recalibrate_head_bn's update of the head BatchNorm (on the
    same 1,024 training images) for the averaged weights; always a progress line per epoch, and a stop at the first
    step past ``until`` (time.monotonic()): that short epoch is validated, and EarlyStopping restores the best."""
    import keras

    started = [time.monotonic()]

    class Budget(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: dict[str, float] | None = None) -> None:
            if not self.model.stop_training and time.monotonic() > until:  # ends the epoch here: it is validated
                self.model.stop_training = True
                print(f"  {phase}: the job's time budget is spent at step {batch + 1}", flush=True)

    class Progress(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            now = time.monotonic()
            print(
                f"  {phase} epoch {epoch + 1}: val_loss {logs.get('val_loss', float('nan')):.4f} "
                f"{now - started[0]:.1f}s",
                flush=True,
            )
            started[0] = now

    class HeadBatchNorm(keras.callbacks.Callback):  # type: ignore[misc]
        features = keras.Model(model.input, model.get_layer("pool").output)

        def on_test_begin(self, logs: dict[str, float] | None = None) -> None:
            f = np.asarray(self.features.predict(x_bn, batch_size=256, verbose=0), dtype=np.float64)
            bn = model.get_layer("head_bn")
            bn.moving_mean.assign(f.mean(axis=0).astype("float32"))
            bn.moving_variance.assign(f.var(axis=0).astype("float32"))

    if rc["ema"] > 0:
        return [keras.callbacks.SwapEMAWeights(swap_on_epoch=True), HeadBatchNorm(), Progress(), Budget()]
    return [Progress(), Budget()]


def fit(
    rc: dict[str, Any], d: dict[str, NDArray[Any]], weights: str, seed: int, spe: int = 1, until: float = np.inf
) -> tuple[Any, dict[str, Any]]:
    import keras

    keras.utils.set_random_seed(seed)
    model, train_model, base = build(rc, weights, seed)
    fit_, mon = d["side"] == 0, d["side"] == 1
    x_fit, y_fit = d["x"][fit_].astype("float32"), d["y"][fit_].astype("float32")
    x_mon, y_mon = d["x"][mon].astype("float32"), d["y"][mon].astype("float32")
    counts = np.bincount(d["y"][fit_], minlength=2)
    class_weight = {c: len(y_fit) / (2.0 * counts[c]) for c in range(2)}
    x_bn = x_fit[np.random.default_rng(seed).permutation(len(x_fit))[:1024]]
    mode = "max" if rc["monitor"] == "val_auc" else "min"
    best, best_w, epochs_run, best_epoch = None, None, 0, 0
    for phase, epochs, rate in (("head", rc["head_epochs"], rc["head_lr"]), ("fine", rc["epochs"], rc["lr"])):
        if epochs <= 0 or time.monotonic() > until:
            continue
        base.trainable = phase == "fine"
        if phase == "fine":
            cut = len(base.layers) - rc["fine_tune_layers"]
            for i, layer in enumerate(base.layers):
                is_bn = isinstance(layer, keras.layers.BatchNormalization)
                layer.trainable = i >= cut and not (rc["freeze_bn"] and is_bn)
        ema = {"use_ema": True, "ema_momentum": rc["ema"]} if rc["ema"] > 0 else {}
        opt = (
            keras.optimizers.AdamW(learning_rate=rate, weight_decay=rc["weight_decay"], **ema)
            if rc["weight_decay"] > 0
            else keras.optimizers.Adam(learning_rate=rate, **ema)
        )
        train_model.compile(
            optimizer=opt,
            loss=keras.losses.BinaryCrossentropy(label_smoothing=rc["smoothing"]),
            metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
            steps_per_execution=spe,
        )
        stop = keras.callbacks.EarlyStopping(
            monitor=rc["monitor"], mode=mode, patience=rc["patience"], restore_best_weights=True
        )
        plateau = keras.callbacks.ReduceLROnPlateau(
            monitor=rc["monitor"], mode=mode, factor=0.5, patience=rc["lr_patience"]
        )
        h = train_model.fit(
            x_fit,
            y_fit,
            batch_size=rc["batch_size"],
            epochs=epochs,
            validation_data=(x_mon, y_mon),
            class_weight=class_weight,
            callbacks=[*_callbacks(rc, model, x_bn, phase, until), stop, plateau],
            verbose=0,
            shuffle=True,
        ).history
        scores = np.nan_to_num(np.array(h[rc["monitor"]], dtype=np.float64), nan=np.inf if mode == "min" else -np.inf)
        i = int(np.argmin(scores) if mode == "min" else np.argmax(scores))
        if best is None or (scores[i] < best if mode == "min" else scores[i] > best):
            best, best_w, best_epoch = float(scores[i]), model.get_weights(), epochs_run + i + 1
        epochs_run += len(scores)
    model.set_weights(best_w)
    cut = time.monotonic() > until  # stopped (or skipped a phase) for time, not by EarlyStopping
    return model, {"epochs_run": epochs_run, "best_epoch": best_epoch, "best_monitor": best, "cut_for_time": cut}


def job(
    bundle: Path, cache: Path, weights: str, name: str, seed: int, out: Path, spe: int = 1, budget_s: float = np.inf
) -> None:
    rc = {**HISTOLOGY, **RECIPES[name]}
    z = np.load(cache / f"x{rc['image_size']}.npz")
    d = {k: z[k] for k in z.files}
    started = time.monotonic()
    model, info = fit(rc, d, weights, seed, spe, started + budget_s)
    train_s = time.monotonic() - started
    p = {}
    for side, key in ((1, "mon"), (2, "val")):
        x = d["x"][d["side"] == side].astype("float32")
        p[key] = np.stack([model.predict(view(x, i), batch_size=256, verbose=0).ravel() for i in range(8)])
    np.savez(out / f"{name}__{seed}.npz", p_mon=p["mon"], p_val=p["val"])
    (out / f"{name}__{seed}.json").write_text(
        json.dumps({"recipe": name, "seed": seed, "config": rc, "train_s": round(train_s, 1), **info})
    )


def quick(y_mon: NDArray[Any], p_mon: NDArray[Any], y_val: NDArray[Any], p_val: NDArray[Any]) -> tuple[float, float]:
    try:
        from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    except ImportError:  # a bare accelerator machine: `table` scores the saved predictions here
        return float("nan"), float("nan")

    ts = np.unique(p_mon)
    bac = [balanced_accuracy_score(y_mon, p_mon >= t) for t in ts[:: max(1, len(ts) // 400)]]
    t = ts[:: max(1, len(ts) // 400)][int(np.argmax(bac))]
    return float(balanced_accuracy_score(y_val, p_val >= t)), float(roc_auc_score(y_val, p_val))


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    names = args.recipes or list(RECIPES)
    sizes = sorted({int({**HISTOLOGY, **RECIPES[n]}["image_size"]) for n in names})
    for size in sizes:
        d = decode(Path(args.bundle), size)
        np.savez(work / f"x{size}.npz", x=d["x"], y=d["y"], side=d["side"], group=d["group"])
    print(f"decoded sizes {sizes} in {time.monotonic() - started:.0f}s", flush=True)
    queue = [(n, s) for s in args.seeds for n in names]  # first seed of every recipe, then the next seed
    running: list[tuple[subprocess.Popen[bytes], str, int, float]] = []
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / args.jobs:.3f}"}
    while queue or running:
        elapsed = time.monotonic() - started
        for proc, name, seed, t0 in list(running):
            if proc.poll() is not None or elapsed > args.deadline:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                    print(f"killed at the deadline: {name} seed {seed}", flush=True)
                running.remove((proc, name, seed, t0))
                print(f"done {name} seed {seed} rc={proc.returncode} {time.monotonic() - t0:.0f}s", flush=True)
        while queue and len(running) < args.jobs and elapsed < args.deadline - args.min_job_s:
            name, seed = queue.pop(0)
            cmd = [sys.executable, __file__, "job", args.bundle, str(work), args.weights, name, str(seed), str(work)]
            # training stops at the first step past the deadline less --score-s (left to score the views)
            budget = args.deadline - (time.monotonic() - started) - args.score_s
            cmd += [str(args.steps_per_execution), f"{budget:.0f}"]
            running.append((subprocess.Popen(cmd, env=env), name, seed, time.monotonic()))
        if elapsed > args.deadline and not running:
            break
        if not running and queue and elapsed >= args.deadline - args.min_job_s:
            break
        time.sleep(1)
    collect(Path(args.bundle), work, out)
    return 0


def collect(bundle: Path, jobs: Path, out: Path) -> None:
    """One sweep.npz + sweep.json in ``out`` from the finished jobs' files in ``jobs`` (also run here, on job files
    fetched one by one when the accelerator returned too few files for the whole sweep)."""
    packed = np.load(bundle)
    side, y, group = packed["side"], packed["label"], packed["group"]
    mon, val = side == 1, side == 2
    rows, arrays = [], {"y_mon": y[mon], "y_val": y[val], "g_val": group[val]}
    for meta in sorted(jobs.glob("*__*.json")):
        r = json.loads(meta.read_text())
        if not meta.with_suffix(".npz").is_file():
            print(f"{meta.stem}: no predictions beside it, left out", flush=True)
            continue
        z = np.load(meta.with_suffix(".npz"))
        key = f"{r['recipe']}__{r['seed']}"
        arrays[f"{key}__mon"], arrays[f"{key}__val"] = z["p_mon"], z["p_val"]
        r["quick_bac"], r["quick_auc"] = quick(y[mon], z["p_mon"][0], y[val], z["p_val"][0])
        rows.append(r)
        print(
            f"{key:<24} bac {r['quick_bac']:.3f} auc {r['quick_auc']:.3f} epochs {r['epochs_run']} "
            f"best {r['best_epoch']} {r['train_s']:.0f}s{' CUT FOR TIME' if r.get('cut_for_time') else ''}",
            flush=True,
        )
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "sweep.npz", **arrays)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))


# --- table (here) ------------------------------------------------------------------------------------------------
def table(path: Path, boot: int) -> str:
    from bench.levers import score
    from histod.trainer.evaluate import choose_threshold

    z = np.load(path)
    rows = json.loads(path.with_suffix(".json").read_text())
    y_mon, y_val, g_val = z["y_mon"], z["y_val"], z["g_val"]
    by_recipe: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_recipe.setdefault(r["recipe"], []).append(r)
    out = [
        "| recipe | seed | views | balanced acc [95% CI] | ROC AUC [95% CI] | sens | spec | epochs (best) | GPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def line(label: str, seed: str, views: int, p_mon: NDArray[Any], p_val: NDArray[Any], extra: str) -> None:
        s = score(y_val, p_val, g_val, choose_threshold(y_mon, p_mon), boot)
        ci = s["ci95"]
        bac, auc = (f"{s[k]:.3f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" for k in ("balanced_accuracy", "roc_auc"))
        out.append(
            f"| {label} | {seed} | {views} | {bac} | {auc} | {s['sensitivity']:.3f} | {s['specificity']:.3f} "
            f"| {extra} |"
        )

    for recipe, rs in by_recipe.items():
        for r in rs:
            k = f"{recipe}__{r['seed']}"
            for views in (1, 8):
                line(
                    recipe,
                    str(r["seed"]),
                    views,
                    z[f"{k}__mon"][:views].mean(0),
                    z[f"{k}__val"][:views].mean(0),
                    f"{r['epochs_run']}{' cut' if r.get('cut_for_time') else ''} ({r['best_epoch']})"
                    f" | {r['train_s']:.0f}",
                )
        if len(rs) > 1:  # the seeds' mean p: an ensemble
            for views in (1, 8):
                pm = np.mean([z[f"{recipe}__{r['seed']}__mon"][:views].mean(0) for r in rs], axis=0)
                pv = np.mean([z[f"{recipe}__{r['seed']}__val"][:views].mean(0) for r in rs], axis=0)
                line(f"{recipe} ensemble", "+".join(str(r["seed"]) for r in rs), views, pm, pv, "|")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "job":
        _, bundle, cache, weights, name, seed, out, spe, budget = argv
        job(Path(bundle), Path(cache), weights, name, int(seed), Path(out), int(spe), float(budget))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("pack")
    p.add_argument("out", type=Path)
    p.add_argument("--data", type=Path, default=None)
    r = sub.add_parser("run")
    r.add_argument("bundle")
    r.add_argument("--weights", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--work", default="/tmp/histod-sweep")
    r.add_argument("--jobs", type=int, default=8)
    r.add_argument("--deadline", type=float, default=480, help="seconds: no job starts late, none runs past it")
    r.add_argument("--min-job-s", type=float, default=120, help="no job starts with less than this left")
    r.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    r.add_argument("--recipes", nargs="*")
    r.add_argument("--steps-per-execution", type=int, default=1, help="Keras steps per compiled call")
    r.add_argument("--score-s", type=float, default=60, help="seconds kept from the deadline to score the views")
    c = sub.add_parser("collect", help="sweep.npz/json from a folder of finished jobs' files")
    c.add_argument("bundle", type=Path)
    c.add_argument("jobs", type=Path)
    c.add_argument("out", type=Path)
    t = sub.add_parser("table")
    t.add_argument("npz", type=Path)
    t.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.action == "pack":
        from bench.common import shared_data

        data_dir = args.data or shared_data()
        if data_dir is None:
            return 0
        pack(data_dir, args.out)
        return 0
    if args.action == "collect":
        collect(args.bundle, args.jobs, args.out)
        return 0
    if args.action == "table":
        print(table(args.npz, args.bootstrap))
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
