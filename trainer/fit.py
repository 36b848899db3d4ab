"""Fitting, in the standard Keras transfer-learning order:

1. head only: the base is frozen and the new head learns at ``head_learning_rate``;
2. fine-tuning: the last ``fine_tune_layers`` layers of the base (by default all of them) are unfrozen and
   everything trainable learns at ``learning_rate`` (a pretrained base's BatchNorm stays in inference mode, see
   trainer.model).

Both phases use Adam, binary cross-entropy, class weights, EarlyStopping (best weights restored) and
ReduceLROnPlateau on the validation loss. With ``ema`` Adam keeps a moving average of the weights, and that
average is what validation scores, EarlyStopping keeps and the run ends with. Augmentation runs in the tf.data
pipeline of the training split only. With a checkpoint path, the whole state is saved after every epoch
(trainer.checkpoint) and a later call with the same path goes on from there.

Following the validation ROC AUC instead of the loss, and a cosine decay instead of ReduceLROnPlateau, were
measured on held-out patients and bought nothing (docs/training.md, "What helps and what does not").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from histod.errors import ConfigError
from histod.logs import get_logger
from histod.trainer import augment, checkpoint
from histod.trainer.config import TrainConfig
from histod.trainer.data import capped_draw, capped_size, patient_codes, patient_share
from histod.trainer.model import calibrate_batchnorm, freeze_base, head_features, recalibrate_head_bn, unfreeze_top

log = get_logger("histod.trainer")

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
MONITOR = "val_loss"  # what EarlyStopping, ReduceLROnPlateau and the best epoch follow
EMA_BN_IMAGES = 1024  # training images whose features set the head BatchNorm's statistics for averaged weights


@dataclass
class FitResult:
    history: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in HISTORY_KEYS})
    phases: list[str] = field(default_factory=list)  # per epoch: "head" or "fine_tune"
    best_epoch: int = 0  # 1-based index into history: the epoch whose weights the model holds
    stopped_early: list[bool] = field(default_factory=list)
    resumed: list[dict[str, Any]] = field(default_factory=list)  # where a resumed run went on: phase, epoch


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
    groups: Sequence[str] | None = None,
) -> tuple[Any, Any]:
    """tf.data pipelines yielding float32 0..255 batches; the training one shuffled and augmented. With
    ``cfg.patient_cap``, each epoch draws afresh at most that many images of each patient (``groups``: each
    training image's patient)."""
    import tensorflow as tf

    if cfg.patient_cap:
        train = _capped(cfg, x_train, y_train, patient_codes(_groups(groups, len(x_train))))
    else:
        train = tf.data.Dataset.from_tensor_slices((x_train, y_train.astype(np.float32)))
        train = train.shuffle(len(x_train), seed=cfg.seed, reshuffle_each_iteration=True).batch(cfg.batch_size)
    train = train.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    aug = augment.pipeline(cfg)
    if aug is not None:
        train = train.map(lambda x, y: (aug(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    val = tf.data.Dataset.from_tensor_slices((x_val, y_val.astype(np.float32))).batch(cfg.batch_size)
    val = val.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    return train.prefetch(tf.data.AUTOTUNE), val.prefetch(tf.data.AUTOTUNE)


def _groups(groups: Sequence[str] | None, n: int) -> Sequence[str]:
    if groups is None or len(groups) != n:
        raise ConfigError("a per-patient cap needs each training image's patient")
    return groups


def _capped(cfg: TrainConfig, x: NDArray[np.uint8], y: NDArray[np.int64], codes: NDArray[np.int64]) -> Any:
    """Batches of one epoch of at most ``cfg.patient_cap`` images of each patient, drawn afresh each time Keras
    starts an epoch (one random stream from ``cfg.seed``)."""
    import tensorflow as tf

    cap, size, rng = cfg.patient_cap, cfg.batch_size, np.random.default_rng(cfg.seed)
    labels = y.astype(np.float32)

    def epoch() -> Iterator[tuple[NDArray[np.uint8], NDArray[np.float32]]]:
        order = capped_draw(codes, cap, rng)
        for start in range(0, len(order), size):
            pick = order[start : start + size]
            yield x[pick], labels[pick]

    spec = (tf.TensorSpec((None, *x.shape[1:]), tf.uint8), tf.TensorSpec((None,), tf.float32))
    batches = math.ceil(capped_size(codes, cap) / size)
    return tf.data.Dataset.from_generator(epoch, output_signature=spec).apply(
        tf.data.experimental.assert_cardinality(batches)
    )


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


@dataclass
class _Phase:
    name: str
    epochs: int
    rate: float


@dataclass
class _Data:
    train: Any
    val: Any
    class_weights: dict[int, float] | None
    bn_images: NDArray[np.float32] | None  # with ema: the training images that set the head BatchNorm for it


Save = Callable[[checkpoint.PhaseState | None], None]


@dataclass
class _Clock:
    """One epoch numbering across both phases, and each epoch's seconds and the time left for the log line."""

    before: int  # epochs of the phases already run
    total: int  # epochs of the whole fit at most (EarlyStopping can end a phase sooner)
    last: float = field(default_factory=time.monotonic)
    seconds: list[float] = field(default_factory=list)
    on_epoch: Callable[[int, int], None] | None = None
    """told (epochs done over both phases, epochs at most) after each epoch's log line"""
    overall: int = 0

    def tick(self, phase_done: int) -> dict[str, Any]:
        now = time.monotonic()
        self.seconds.append(now - self.last)
        self.last = now
        overall = self.overall = self.before + phase_done
        mean = sum(self.seconds) / len(self.seconds)
        return {
            "epoch": f"{overall}/{self.total}",
            "epoch_s": round(self.seconds[-1], 2),
            "eta_s": round(mean * max(0, self.total - overall), 1),
        }


def _run_phase(
    model: Any,
    cfg: TrainConfig,
    phase: _Phase,
    data: _Data,
    resume: checkpoint.PhaseState | None,
    save: Save | None,
    clock: _Clock,
) -> tuple[list[dict[str, float]], bool]:
    """One phase's fit(): its epochs' logs and whether EarlyStopping ended it. ``resume`` continues a phase that
    a checkpoint says was interrupted; ``save(PhaseState)`` (or None) is called after every epoch, before the
    epoch's log line (``train.epoch``: the epoch over both phases, the phase's own, its seconds and the time
    left at most): once that line is out, the epoch is on disk."""
    import keras

    if resume is not None and (resume.stopped or resume.epochs_done >= phase.epochs):  # it had ended
        checkpoint.restore_weights(model, resume.best_weights or resume.model)
        return resume.logs, resume.stopped
    ema = {"use_ema": True, "ema_momentum": cfg.ema} if cfg.ema > 0 else {}
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=phase.rate, **ema),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy")],
    )
    stop = keras.callbacks.EarlyStopping(monitor=MONITOR, mode="min", patience=cfg.patience, restore_best_weights=True)
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor=MONITOR, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience
    )

    def end_of_epoch(done: int, stopped: bool, logs: list[dict[str, float]], rate: float, *state: Any) -> None:
        if save is not None:
            save(checkpoint.PhaseState(phase.name, done, stopped, logs, rate, *state))
        shown = {k: float(f"{v:.5g}") for k, v in logs[-1].items() if k in HISTORY_KEYS}
        log.info(
            "train.epoch",
            phase=phase.name,
            **clock.tick(done),
            phase_epoch=f"{done}/{phase.epochs}",
            saved=save is not None,
            **shown,
        )
        if clock.on_epoch is not None:
            clock.on_epoch(clock.overall, clock.total)

    first, last = checkpoint.callbacks(end_of_epoch, stop, plateau, resume)
    callbacks = [first]
    if data.bn_images is not None:  # ema: the averaged weights go into the model for each validation and at each
        # epoch's end, before EarlyStopping looks at them
        callbacks += [keras.callbacks.SwapEMAWeights(swap_on_epoch=True), _head_bn_for_ema(data.bn_images)]
    callbacks += [stop, plateau, last]
    initial_epoch = 0
    if resume is not None:
        checkpoint.restore_weights(model, resume.model)
        checkpoint.restore_optimizer(model, resume.optimizer)
        model.optimizer.learning_rate = resume.learning_rate
        initial_epoch = resume.epochs_done
    model.fit(
        data.train,
        validation_data=data.val,
        initial_epoch=initial_epoch,
        epochs=phase.epochs,
        class_weight=data.class_weights,
        callbacks=callbacks,
        verbose=0,
        shuffle=False,
    )
    return last.logs, bool(stop.stopped_epoch > 0)


def fit(
    model: Any,
    cfg: TrainConfig,
    x_train: NDArray[np.uint8],
    y_train: NDArray[np.int64],
    x_val: NDArray[np.uint8],
    y_val: NDArray[np.int64],
    checkpoint_path: Path | None = None,
    *,
    groups: Sequence[str] | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> FitResult:
    """Run both phases. The model ends up holding the weights of the best epoch over both phases (lowest
    val_loss): EarlyStopping restores the best epoch of each phase, and the head phase's best is kept when
    fine-tuning never beats it. With ``checkpoint_path`` the state is saved there after every epoch, and a
    checkpoint already there is resumed from. ``groups`` (each training image's patient) is what
    ``cfg.patient_cap`` counts by."""
    import keras

    keras.utils.set_random_seed(cfg.seed)
    state = (checkpoint.load(checkpoint_path) if checkpoint_path else None) or checkpoint.State()
    result = FitResult(**state.result) if state.result else FitResult()
    if cfg.weights == "none" and not state.finished and state.current is None:
        calibrate_batchnorm(model, x_train[: max(cfg.batch_size, 64)])
    bn_images = None
    if cfg.ema > 0:
        pick = np.random.default_rng(cfg.seed).permutation(len(x_train))[:EMA_BN_IMAGES]
        bn_images = x_train[pick].astype(np.float32)
    share = None  # each training image's chance to be in an epoch, when patients are capped
    if cfg.patient_cap:
        share = patient_share(_groups(groups, len(x_train)), cfg.patient_cap)
    weights = class_weights(y_train, share) if cfg.class_weights else None
    train, val = datasets(cfg, x_train, y_train, x_val, y_val, groups)
    data = _Data(train, val, weights, bn_images)

    def save(current: checkpoint.PhaseState | None) -> None:
        state.current = current
        state.result = asdict(result)
        if checkpoint_path is not None:
            checkpoint.save(checkpoint_path, state)

    phases = [
        _Phase("head", cfg.head_epochs, cfg.head_learning_rate),
        _Phase("fine_tune", cfg.epochs, cfg.learning_rate),
    ]
    todo = [p for p in phases if p.epochs > 0 and p.name not in state.finished]
    if state.finished or state.current is not None:  # a checkpoint: go on where it left off
        where = {
            "phase": todo[0].name if todo else None,
            "epochs_done": state.current.epochs_done if state.current else 0,
        }
        log.info("train.resumed", finished=state.finished, **where)
        result.resumed.append(where)
    clock = _Clock(0, 0, on_epoch=on_epoch)
    for phase in todo:
        resume = state.current if state.current is not None and state.current.name == phase.name else None
        if resume is None and state.model is not None:
            checkpoint.restore_weights(model, state.model)  # where the phases before it ended
        if phase.name == "head":
            freeze_base(model)
        else:
            unfreeze_top(model, cfg.fine_tune_layers, freeze_batchnorm=cfg.freeze_batchnorm and cfg.weights != "none")
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        log.info(
            "train.phase", phase=phase.name, epochs=phase.epochs, learning_rate=phase.rate, trainable_params=trainable
        )
        before = len(result.phases)
        clock.before, clock.total = before, before + sum(p.epochs for p in todo[todo.index(phase) :])
        logs, stopped = _run_phase(model, cfg, phase, data, resume, save if checkpoint_path else None, clock)
        _add_phase(result, phase.name, logs, stopped)
        start = len(result.phases) - len(logs)
        scores = [v if math.isfinite(v) else math.inf for v in result.history[MONITOR][start:]]
        best = math.inf if state.best_score is None else state.best_score
        if scores and (min(scores) < best or state.best_weights is None):
            state.best_score, state.best_weights = min(scores), model.get_weights()  # the phase's best
            result.best_epoch = start + int(np.argmin(scores)) + 1
        state.finished.append(phase.name)
        state.model = model.get_weights()
        save(None)
    if state.best_weights is not None:
        model.set_weights(state.best_weights)
    log.info("train.best_epoch", epoch=result.best_epoch, **{MONITOR: state.best_score})
    return result


def _add_phase(result: FitResult, name: str, logs: list[dict[str, float]], stopped: bool) -> None:
    for key in HISTORY_KEYS:
        result.history[key].extend(epoch.get(key, math.nan) for epoch in logs)
    result.phases.extend([name] * len(logs))
    result.stopped_early.append(stopped)
