"""Resuming an interrupted `histod train`: RUN_DIR/checkpoint.npz, written after every epoch.

It holds what the run needs to go on from the last finished epoch as if it had never stopped:

* the model's weights and every optimizer variable (Adam's moments and step count, the learning rate, the moving
  average of the weights) as they stand between two epochs: taken at the start of the epoch's end, before the
  moving average is swapped into the model for EarlyStopping to judge;
* EarlyStopping's and ReduceLROnPlateau's counters and best values, the learning rate they left, and
  EarlyStopping's best weights so far;
* the phases already finished (history, whether they stopped early) and the best weights over them.

Keras' own BackupAndRestore keeps the weights (with the optimizer) and the epoch number only: EarlyStopping and
ReduceLROnPlateau start again from nothing after a restart, so the best weights of the epochs before the kill
are lost; and it deletes its backup at the end of every fit(), while this trainer calls fit() once per phase. So
the whole state is kept here, in one file replaced atomically (written beside, flushed to disk, renamed): a kill
or a power cut while it is written leaves the previous epoch's.

The data pipeline's random state is not kept: a resumed run shuffles and augments differently from the run it
continues (TensorFlow's multi-threaded CPU training is not bit-reproducible anyway).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from histod.errors import ModelError

CHECKPOINT_FILE = "checkpoint.npz"
FORMAT = 1

Weights = list[NDArray[Any]]


@dataclass
class PhaseState:
    """Where an unfinished phase stands after ``epochs_done`` of its epochs."""

    name: str
    epochs_done: int
    stopped: bool  # EarlyStopping ended the phase at its last epoch
    logs: list[dict[str, float]]  # per epoch done: loss, accuracy, val_loss, val_accuracy, learning_rate
    learning_rate: float
    early_stopping: dict[str, Any]  # wait, best, best_epoch, stopped_epoch
    plateau: dict[str, Any]  # wait, best, cooldown_counter
    model: Weights
    optimizer: Weights
    best_weights: Weights | None  # EarlyStopping's


@dataclass
class State:
    """The whole run's fitting state: the finished phases, and the phase in progress (if any)."""

    finished: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)  # trainer.fit.FitResult's fields
    best_score: float | None = None
    best_weights: Weights | None = None  # the best epoch's weights over the finished phases
    model: Weights | None = None  # the weights at the end of the last finished phase
    current: PhaseState | None = None


def _put(arrays: dict[str, NDArray[Any]], prefix: str, weights: Weights | None) -> None:
    for i, w in enumerate(weights or []):
        arrays[f"{prefix}.{i}"] = np.asarray(w)


def _get(data: Any, prefix: str, n: int | None) -> Weights | None:
    return None if n is None else [data[f"{prefix}.{i}"] for i in range(n)]


def save(path: Path, state: State) -> None:
    """Write ``state`` to ``path`` atomically: a reader (or a restart) sees the previous file or this one."""
    arrays: dict[str, NDArray[Any]] = {}
    _put(arrays, "best", state.best_weights)
    _put(arrays, "model", state.model)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "finished": state.finished,
        "result": state.result,
        "best_score": state.best_score,
        "n": {"best": _len(state.best_weights), "model": _len(state.model)},
        "current": None,
    }
    cur = state.current
    if cur is not None:
        _put(arrays, "current.model", cur.model)
        _put(arrays, "current.optimizer", cur.optimizer)
        _put(arrays, "current.best", cur.best_weights)
        meta["current"] = {
            "name": cur.name,
            "epochs_done": cur.epochs_done,
            "stopped": cur.stopped,
            "logs": cur.logs,
            "learning_rate": cur.learning_rate,
            "early_stopping": cur.early_stopping,
            "plateau": cur.plateau,
            "n": {"model": len(cur.model), "optimizer": len(cur.optimizer), "best": _len(cur.best_weights)},
        }
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        savez: Any = np.savez  # numpy's stub takes **arrays for its allow_pickle flag too
        savez(fh, meta=np.array(json.dumps(meta)), **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _len(weights: Weights | None) -> int | None:
    return None if weights is None else len(weights)


def load(path: Path) -> State | None:
    """The state saved at ``path``, or None when there is none."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != FORMAT:
                raise ModelError(f"{path} has format {meta.get('format')}; this histod writes {FORMAT}")
            state = State(
                finished=list(meta["finished"]),
                result=dict(meta["result"]),
                best_score=meta["best_score"],
                best_weights=_get(data, "best", meta["n"]["best"]),
                model=_get(data, "model", meta["n"]["model"]),
            )
            cur = meta["current"]
            if cur is not None:
                n = cur["n"]
                state.current = PhaseState(
                    name=cur["name"],
                    epochs_done=int(cur["epochs_done"]),
                    stopped=bool(cur["stopped"]),
                    logs=list(cur["logs"]),
                    learning_rate=float(cur["learning_rate"]),
                    early_stopping=dict(cur["early_stopping"]),
                    plateau=dict(cur["plateau"]),
                    model=_get(data, "current.model", n["model"]) or [],
                    optimizer=_get(data, "current.optimizer", n["optimizer"]) or [],
                    best_weights=_get(data, "current.best", n["best"]),
                )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read the checkpoint {path}: {exc}") from exc
    return state


def restore_optimizer(model: Any, values: Weights) -> None:
    """Build the compiled model's optimizer for its trainable weights and give every variable its saved value."""
    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    variables = optimizer.variables
    shapes = [tuple(v.shape) for v in variables]
    if shapes != [tuple(np.shape(v)) for v in values]:
        raise ModelError("the checkpoint's optimizer state does not fit this model (was the run's config changed?)")
    for var, value in zip(variables, values, strict=True):
        var.assign(value)


def restore_weights(model: Any, values: Weights) -> None:
    shapes = [tuple(w.shape) for w in model.weights]
    if shapes != [tuple(np.shape(v)) for v in values]:
        raise ModelError("the checkpoint's weights do not fit this model (was the run's config changed?)")
    model.set_weights(values)


def callbacks(save_phase: Any, early_stopping: Any, plateau: Any, resume: PhaseState | None) -> tuple[Any, Any]:
    """Two Keras callbacks around a phase's others: ``first`` takes the model's and the optimizer's state at the
    very start of each epoch's end (the moving average not yet swapped in); ``last`` restores the callbacks'
    state at the start of a resumed fit() (after their own reset), and at each epoch's end records the logs and
    passes the epoch's whole PhaseState to ``save_phase``. Put ``first`` before and ``last`` after all others."""
    import keras

    class First(keras.callbacks.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model_values: Weights = []
            self.optimizer_values: Weights = []

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.model_values = self.model.get_weights()
            self.optimizer_values = [np.asarray(v.numpy()) for v in self.model.optimizer.variables]

    first = First()

    class Last(keras.callbacks.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.logs: list[dict[str, float]] = list(resume.logs) if resume else []

        def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
            if resume is None:
                return
            for callback, saved in ((early_stopping, resume.early_stopping), (plateau, resume.plateau)):
                for key, value in saved.items():
                    if value is not None:  # None: nothing seen yet, as the callback's own reset left it
                        setattr(callback, key, value)
            early_stopping.best_weights = resume.best_weights

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.logs.append({k: float(v) for k, v in (logs or {}).items() if isinstance(v, int | float | np.number)})
            save_phase(
                epoch + 1,
                bool(self.model.stop_training),
                self.logs,
                float(self.model.optimizer.learning_rate),
                {k: _plain(getattr(early_stopping, k)) for k in ("wait", "best", "best_epoch", "stopped_epoch")},
                {k: _plain(getattr(plateau, k)) for k in ("wait", "best", "cooldown_counter")},
                first.model_values,
                first.optimizer_values,
                early_stopping.best_weights,
            )

    return first, Last()


def _plain(value: Any) -> Any:
    """A JSON-safe number (callbacks keep numpy scalars and inf)."""
    if value is None:
        return None
    value = float(value) if not isinstance(value, int | bool) else value
    return None if isinstance(value, float) and not np.isfinite(value) else value
