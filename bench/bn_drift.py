"""Why the monitoring loss of the histology stack swings between epochs: the head BatchNorm's moving statistics.

    .venv/bin/python bench/bn_drift.py          # ~5 min on 2 cores; writes bench/results/bn_drift.json

A small copy of the histology stack (64 px, 2,400 fitting images of the lever protocol's inner split, batch 32,
dihedral augmentation, whole base at Adam 1e-4 after 2 head epochs). At the end of every epoch it scores the
monitoring patients twice: with the head BatchNorm's moving mean and variance (what Keras' val_loss sees), and
with them re-estimated from 1,024 augmented fitting images under the current weights ("precise BN"). It also
records how far the moving mean lags the features' true mean and how fast that mean moves.

A wrong mean in the head BatchNorm only shifts the logit by a constant (the Dense layer after it is linear), so
it moves loss and accuracy at a fixed threshold but not ROC AUC.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, machine, say, shared_data, shared_weights


def bce(p: Any, y: Any) -> float:
    q = np.clip(np.asarray(p, dtype=np.float64).ravel(), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    data_dir, weights = shared_data(), shared_weights()
    if data_dir is None or weights is None:
        say("skipped: needs ../shared/data/idc-dev and the ../shared alpha 0.35 weights")
        return 0
    import keras
    from sklearn.metrics import roc_auc_score

    from bench.levers import prepare
    from histod.trainer.augment import pipeline
    from histod.trainer.config import TrainConfig
    from histod.trainer.fit import class_weights, datasets
    from histod.trainer.model import HEAD_BN_LAYER, build_model, freeze_base, head_features, unfreeze_top

    d = prepare(data_dir, 64, 42, 0.2)
    pick = np.random.default_rng(0).permutation(len(d["y_fit"]))[:2400]
    xf, yf, xm, ym = d["x_fit"][pick], d["y_fit"][pick], d["x_mon"], d["y_mon"]
    cfg = TrainConfig(
        data_dir=data_dir, out=Path("/nonexistent"), image_size=64, alpha=0.35, batch_size=32, dihedral=True,
        learning_rate=1e-4, fine_tune_layers=155, weights=str(weights),
    )  # fmt: skip
    keras.utils.set_random_seed(1)
    model = build_model(cfg)
    train, val = datasets(cfg, xf, yf, xm, ym)
    features = head_features(model)
    bn = model.get_layer(HEAD_BN_LAYER)
    maybe_augment = pipeline(cfg)
    if maybe_augment is None:  # dihedral is on, so this cannot happen
        raise SystemExit("no augmentation configured")
    augment = maybe_augment
    rows: list[dict[str, Any]] = []

    class Probe(keras.callbacks.Callback):  # type: ignore[misc]
        phase = "head"

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            p_moving = model.predict(xm.astype("float32"), batch_size=256, verbose=0).ravel()
            gamma, beta, mu, var = (w.copy() for w in bn.get_weights())
            f = features.predict(np.asarray(augment(xf[:1024].astype("float32"))), batch_size=256, verbose=0)
            bn.set_weights([gamma, beta, f.mean(0), f.var(0)])
            p_precise = model.predict(xm.astype("float32"), batch_size=256, verbose=0).ravel()
            bn.set_weights([gamma, beta, mu, var])
            row = {
                "phase": self.phase,
                "epoch": epoch + 1,
                "moving": {"loss": bce(p_moving, ym), "acc": float(np.mean((p_moving >= 0.5) == ym))},
                "precise": {"loss": bce(p_precise, ym), "acc": float(np.mean((p_precise >= 0.5) == ym))},
                "auc_moving": float(roc_auc_score(ym, p_moving)),
                "auc_precise": float(roc_auc_score(ym, p_precise)),
                "moving_mean_lag": float(np.abs(mu - f.mean(0)).mean()),
                "feature_mean_size": float(np.abs(f.mean(0)).mean()),
            }
            rows.append(row)
            say(json.dumps(row))

    probe = Probe()
    freeze_base(model)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    model.fit(train, validation_data=val, epochs=2, class_weight=class_weights(yf), verbose=0, callbacks=[probe])
    unfreeze_top(model, 155)
    probe.phase = "fine_tune"
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
    model.fit(train, validation_data=val, epochs=8, class_weight=class_weights(yf), verbose=0, callbacks=[probe])
    out = RESULTS / "bn_drift.json"
    out.write_text(json.dumps({"rows": rows, "machine": machine()}, indent=1) + "\n")
    fine = [r for r in rows if r["phase"] == "fine_tune"]
    for key in ("moving", "precise"):
        losses = [r[key]["loss"] for r in fine]
        print(f"{key:>8}: fine-tuning monitoring loss {min(losses):.3f}..{max(losses):.3f}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
