"""Fitting, in the standard Keras transfer-learning order:

1. head only: the base is frozen and the new head learns at ``head_learning_rate``;
2. fine-tuning: the last ``fine_tune_layers`` layers of the base are unfrozen and everything trainable learns at
   the low ``learning_rate`` (the base's BatchNorm stays in inference mode, see trainer.model).

Both phases use Adam, binary cross-entropy, class weights, EarlyStopping (best weights restored) and
ReduceLROnPlateau on ``monitor``: the validation loss, or the validation ROC AUC (``val_auc``), which ignores the
shifts of the output's bias that make the loss swing while the whole base learns (measured in bench/README.md,
"levers": the AUC swings too, and following it did not help).
Augmentation runs in the tf.data pipeline of the training split only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from histod.errors import ConfigError
from histod.logs import get_logger
from histod.trainer import augment, data
from histod.trainer.config import TrainConfig
from histod.trainer.model import calibrate_batchnorm, freeze_base, head_features, recalibrate_head_bn, unfreeze_top

log = get_logger("histod.trainer")

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
AUC_KEYS = ("auc", "val_auc")  # recorded too when cfg.monitor is "val_auc"
EMA_BN_IMAGES = 1024  # training images whose features set the head BatchNorm's statistics for averaged weights


@dataclass
class FitResult:
    history: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in HISTORY_KEYS})
    phases: list[str] = field(default_factory=list)  # per epoch: "head" or "fine_tune"
    best_epoch: int = 0  # 1-based index into history: the epoch whose weights the model holds
    stopped_early: list[bool] = field(default_factory=list)


def class_weights(labels: NDArray[np.int64], share: NDArray[np.float64] | None = None) -> dict[int, float]:
    """Inverse-frequency weights, n / (2 * n_c): a balanced data set gets 1.0 for both classes. With ``share``
    (each image's weight in an epoch, trainer.data.patient_share) the counts are the epoch's weighted ones."""
    counts = np.bincount(labels, weights=share, minlength=2)
    n = float(counts.sum())
    return {c: (n / (2.0 * counts[c]) if counts[c] else 1.0) for c in range(2)}


def datasets(
    cfg: TrainConfig,
    x_train: NDArray[np.uint8],
    y_train: NDArray[np.int64],
    x_val: NDArray[np.uint8],
    y_val: NDArray[np.int64],
    weights: dict[int, float] | None = None,
    groups: Sequence[str] | None = None,
) -> tuple[Any, Any]:
    """tf.data pipelines yielding float32 0..255 batches; the training one shuffled and augmented.

    With MixUp and class ``weights`` the training batches carry a sample weight per image, w0 + (w1 - w0) * y for
    its mixed label y: the mixture of its two images' class weights. (Keras' ``class_weight`` would round a soft
    label to one class; ``fit`` passes none then.)

    Per patient (``groups``: each training image's patient): ``cfg.patient_cap`` draws each epoch afresh, at most
    that many images per patient; ``cfg.patient_weighting`` gives each batch a sample weight per image, its
    patient weight times its class weight (``fit`` passes no ``class_weight`` then)."""
    import tensorflow as tf

    if cfg.patient_cap:
        train = _capped(cfg, x_train, y_train, data.patient_codes(_groups(groups, len(x_train))))
    else:
        slices: tuple[Any, ...] = (x_train, y_train.astype(np.float32))
        if cfg.patient_weighting != "none":
            share = data.patient_share(_groups(groups, len(x_train)), weighting=cfg.patient_weighting)
            by_class = weights or {0: 1.0, 1: 1.0}
            slices += ((share * np.where(y_train == 1, by_class[1], by_class[0])).astype(np.float32),)
        train = tf.data.Dataset.from_tensor_slices(slices)
        train = train.shuffle(len(x_train), seed=cfg.seed, reshuffle_each_iteration=True).batch(cfg.batch_size)
    train = train.map(lambda x, y, *w: (tf.cast(x, tf.float32), y, *w), num_parallel_calls=tf.data.AUTOTUNE)
    aug = augment.pipeline(cfg)
    if aug is not None:
        train = train.map(lambda x, y, *w: (aug(x), y, *w), num_parallel_calls=tf.data.AUTOTUNE)
    if cfg.mixup > 0:
        mix = augment.mixup(cfg.mixup, cfg.seed)
        train = train.map(mix, num_parallel_calls=tf.data.AUTOTUNE)
        if weights is not None:
            w0, w1 = float(weights[0]), float(weights[1])
            train = train.map(lambda x, y: (x, y, w0 + (w1 - w0) * y), num_parallel_calls=tf.data.AUTOTUNE)
    val = tf.data.Dataset.from_tensor_slices((x_val, y_val.astype(np.float32))).batch(cfg.batch_size)
    val = val.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    return train.prefetch(tf.data.AUTOTUNE), val.prefetch(tf.data.AUTOTUNE)


def _groups(groups: Sequence[str] | None, n: int) -> Sequence[str]:
    if groups is None or len(groups) != n:
        raise ConfigError("per-patient capping or weighting needs each training image's patient")
    return groups


def _capped(cfg: TrainConfig, x: NDArray[np.uint8], y: NDArray[np.int64], codes: NDArray[np.int64]) -> Any:
    """Batches of one epoch of at most ``cfg.patient_cap`` images per patient, drawn afresh each time Keras
    starts an epoch (one random stream from ``cfg.seed``)."""
    import tensorflow as tf

    cap, size, rng = cfg.patient_cap, cfg.batch_size, np.random.default_rng(cfg.seed)
    labels = y.astype(np.float32)

    def epoch() -> Iterator[tuple[NDArray[np.uint8], NDArray[np.float32]]]:
        order = data.capped_draw(codes, cap, rng)
        for start in range(0, len(order), size):
            pick = order[start : start + size]
            yield x[pick], labels[pick]

    spec = (tf.TensorSpec((None, *x.shape[1:]), tf.uint8), tf.TensorSpec((None,), tf.float32))
    batches = math.ceil(data.capped_size(codes, cap) / size)
    return tf.data.Dataset.from_generator(epoch, output_signature=spec).apply(
        tf.data.experimental.assert_cardinality(batches)
    )


def _epoch_logger(phase: str, total: int) -> Any:
    import keras

    class EpochLog(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            log.info(
                "epoch",
                phase=phase,
                epoch=f"{epoch + 1}/{total}",
                **{k: float(f"{float(v):.5g}") for k, v in logs.items() if k in HISTORY_KEYS + AUC_KEYS},
            )

    return EpochLog()


def learning_rate(cfg: TrainConfig, phase: str, rate: float, epochs: int, steps_per_epoch: int) -> Any:
    """A constant rate (ReduceLROnPlateau lowers it), or for fine-tuning with ``lr_schedule="cosine"`` a cosine
    decay from ``rate`` to 0 over the phase's full length (an early stop cuts it short)."""
    import keras

    if phase == "fine_tune" and cfg.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(rate, decay_steps=max(1, epochs * steps_per_epoch))
    return rate


def _head_bn_for_ema(images: NDArray[np.float32]) -> Any:
    """After SwapEMAWeights has put the averaged weights in for validation: the head BatchNorm's statistics for
    them (gathered under the raw weights they are far off: validation loss 12 instead of 0.5 was measured)."""
    import keras

    class HeadBatchNorm(keras.callbacks.Callback):  # type: ignore[misc]
        features: Any = None

        def on_test_begin(self, logs: dict[str, float] | None = None) -> None:
            self.features = head_features(self.model) if self.features is None else self.features
            recalibrate_head_bn(self.model, images, self.features)

    return HeadBatchNorm()


def _phase(
    model: Any,
    cfg: TrainConfig,
    name: str,
    epochs: int,
    rate: float,
    train: Any,
    val: Any,
    weights: Any,
    bn_images: NDArray[np.float32] | None,
) -> tuple[dict[str, list[float]], bool]:
    import keras

    schedule = learning_rate(cfg, name, rate, epochs, int(train.cardinality()))
    metrics = [keras.metrics.BinaryAccuracy(name="accuracy")]
    if cfg.monitor == "val_auc":
        metrics.append(keras.metrics.AUC(name="auc"))
    ema = {"use_ema": True, "ema_momentum": cfg.ema} if cfg.ema > 0 else {}
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=schedule, **ema),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=metrics,
    )
    mode = _mode(cfg)
    stop = keras.callbacks.EarlyStopping(
        monitor=cfg.monitor, mode=mode, patience=cfg.patience, restore_best_weights=True
    )
    callbacks = [stop, _epoch_logger(name, epochs)]
    if bn_images is not None:  # ema: the averaged weights go into the model at each epoch's end, before
        # EarlyStopping looks at them
        callbacks[:0] = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True), _head_bn_for_ema(bn_images)]
    if isinstance(schedule, float):  # a schedule owns the rate: ReduceLROnPlateau cannot set it
        plateau = keras.callbacks.ReduceLROnPlateau(
            monitor=cfg.monitor, mode=mode, factor=cfg.lr_factor, patience=cfg.lr_patience
        )
        callbacks.insert(1, plateau)
    hist = model.fit(
        train, validation_data=val, epochs=epochs, class_weight=weights, callbacks=callbacks, verbose=0, shuffle=False
    )
    return {k: [float(v) for v in vs] for k, vs in hist.history.items()}, bool(stop.stopped_epoch > 0)


def _mode(cfg: TrainConfig) -> str:
    return "max" if cfg.monitor == "val_auc" else "min"


def fit(
    model: Any,
    cfg: TrainConfig,
    x_train: NDArray[np.uint8],
    y_train: NDArray[np.int64],
    x_val: NDArray[np.uint8],
    y_val: NDArray[np.int64],
    groups: Sequence[str] | None = None,
) -> FitResult:
    """Run both phases. The model ends up holding the weights of the best epoch over both phases (lowest
    val_loss, or highest val_auc with ``monitor="val_auc"``): EarlyStopping restores the best epoch of each phase,
    and the head phase's best is kept when fine-tuning never beats it. ``groups`` (each training image's
    patient) is needed by ``cfg.patient_cap`` and ``cfg.patient_weighting``."""
    import keras

    keras.utils.set_random_seed(cfg.seed)
    if cfg.weights == "none":
        calibrate_batchnorm(model, x_train[: max(cfg.batch_size, 64)])
    if cfg.mixup > 0 and cfg.patient_weighting != "none":
        raise ConfigError("MixUp and per-patient weighting cannot be combined")
    share = None  # each training image's weight in an epoch, when patients are capped or weighted
    if cfg.patient_cap or cfg.patient_weighting != "none":
        share = data.patient_share(_groups(groups, len(x_train)), cfg.patient_cap or None, cfg.patient_weighting)
    weights = class_weights(y_train, share) if cfg.class_weights else None
    train, val = datasets(cfg, x_train, y_train, x_val, y_val, weights, groups)
    if cfg.mixup > 0 or cfg.patient_weighting != "none":
        weights = None  # the training batches carry them, per mixed label or per patient
    bn_images = None  # with ema (only): the fixed training images whose features set the head BatchNorm for it
    if cfg.ema > 0:
        pick = np.random.default_rng(cfg.seed).permutation(len(x_train))[:EMA_BN_IMAGES]
        bn_images = x_train[pick].astype(np.float32)
    keys = HISTORY_KEYS + (AUC_KEYS if cfg.monitor == "val_auc" else ())
    result = FitResult(history={k: [] for k in keys})
    sign = -1.0 if _mode(cfg) == "max" else 1.0  # minimise sign * monitor
    best_score, best_weights = math.inf, None
    phases = [("head", cfg.head_epochs, cfg.head_learning_rate), ("fine_tune", cfg.epochs, cfg.learning_rate)]
    for name, epochs, rate in phases:
        if epochs <= 0:
            continue
        if name == "head":
            freeze_base(model)
        else:
            unfreeze_top(model, cfg.fine_tune_layers, freeze_batchnorm=cfg.freeze_batchnorm and cfg.weights != "none")
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        log.info("phase", phase=name, epochs=epochs, learning_rate=rate, trainable_params=trainable)
        hist, stopped = _phase(model, cfg, name, epochs, rate, train, val, weights, bn_images)
        start = len(result.history["loss"])
        n = len(hist.get("loss", []))
        for k in keys:
            result.history[k].extend(hist.get(k, [math.nan] * n))
        result.phases.extend([name] * n)
        result.stopped_early.append(stopped)
        scores = [sign * v if math.isfinite(v) else math.inf for v in result.history[cfg.monitor][start:]]
        if scores and (min(scores) < best_score or best_weights is None):
            best_score, best_weights = min(scores), model.get_weights()  # the phase's best, restored by EarlyStopping
            result.best_epoch = start + int(np.argmin(scores)) + 1
    if best_weights is not None:
        model.set_weights(best_weights)
    log.info("best_epoch", epoch=result.best_epoch, **{cfg.monitor: sign * best_score})
    return result
