"""An interrupted `histod train` goes on with `--resume` from its last finished epoch, to the same complete run.

The kill is real: `histod train` runs as a subprocess and gets SIGKILL once its log says a fine-tuning epoch is
done (the epoch's line is written after the epoch's checkpoint). The resumed run is the CLI in-process. And on a
small deterministic Keras model, a fit resumed from a checkpoint file ends bit for bit where the uninterrupted
fit ends: the optimizer (Adam's moments, its step, the moving average), the learning rate ReduceLROnPlateau
lowered and EarlyStopping's best weights all come back.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from histod import imaging
from histod.cli import cli
from histod.runs import load_run
from histod.trainer import checkpoint
from histod.trainer.config import TrainConfig
from tests.test_service_support import wait_for

TINY = ["--weights", "none", "--alpha", "0.35", "--image-size", "48", "--batch-size", "16", "--ema", "0"]
# EarlyStopping and ReduceLROnPlateau must not end or change the run by chance: every epoch runs
SCHEDULE = ["--head-epochs", "1", "--epochs", "4", "--patience", "10", "--lr-patience", "10", "--no-calibrate"]


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, ["--log-format", "json", *args])


def _events(text: str, name: str) -> list[dict[str, object]]:
    return [e for e in (json.loads(line) for line in text.splitlines() if line.startswith("{")) if e["event"] == name]


def _kill_after_a_fine_tuning_epoch(data: Path, run: Path) -> list[dict[str, object]]:
    """`histod train` in a subprocess, SIGKILLed once it has logged (and so saved) fine-tuning epoch 1; the
    epochs it logged."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HISTOD_")}
    args = [sys.executable, "-m", "histod", "--log-format", "json", "train", str(data), "--out", str(run)]
    proc = subprocess.Popen([*args, *TINY, *SCHEDULE], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.decode(errors="replace"))

    reader = threading.Thread(target=read, name="train-stderr", daemon=True)
    reader.start()
    try:
        wait_for(
            lambda: (
                any('"train.epoch"' in line and '"fine_tune"' in line for line in list(lines))
                or proc.poll() is not None
            ),
            240,
            0.01,
            "a fine-tuning epoch",
        )
        assert proc.poll() is None, "".join(lines)[-3000:]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    return _events("".join(lines), "train.epoch")


def test_a_killed_run_resumes_from_its_last_epoch_to_a_complete_run(synthetic_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    before = _kill_after_a_fine_tuning_epoch(synthetic_dataset, run)
    assert [e["phase"] for e in before][:2] == ["head", "fine_tune"]
    assert (run / "checkpoint.npz").is_file() and not (run / "model.json").exists()

    again = _invoke("train", str(synthetic_dataset), "--out", str(run), *TINY, *SCHEDULE)
    assert again.exit_code == 2 and "interrupted run: add --resume" in again.stderr  # never started over by mistake

    resumed = _invoke("train", str(synthetic_dataset), "--out", str(run), *TINY, *SCHEDULE, "--resume")
    assert resumed.exit_code == 0, resumed.output
    (went_on,) = _events(resumed.stderr, "train.resumed")
    assert went_on["phase"] == "fine_tune"
    done = int(str(went_on["epochs_done"]))
    assert done >= len(before) - 1  # at least every epoch it logged before the kill (the head's is not counted)
    after = _events(resumed.stderr, "train.epoch")
    assert [e["phase_epoch"] for e in after] == [f"{k}/4" for k in range(done + 1, 5)]  # only the epochs still to run
    assert [e["epoch"] for e in after] == [f"{1 + k}/5" for k in range(done + 1, 5)]  # one numbering: head's 1 first

    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "complete" and m["resumed"] == [{"phase": "fine_tune", "epochs_done": done}]
    assert m["history"]["phase"] == ["head"] + ["fine_tune"] * 4 and m["epochs_run"] == 5
    val_loss = m["history"]["val_loss"]
    assert all(np.isfinite(val_loss))
    assert m["best_epoch"] == val_loss.index(min(val_loss)) + 1  # over the epochs before the kill too
    # and the model holds that epoch's weights, wherever it lies: its loss on the validation images is the one
    # recorded for the best epoch (no calibration folded in, no moving average)
    import keras

    model = keras.models.load_model(run / "model.keras", compile=False)
    with (run / "split.csv").open() as fh:
        val = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    x = np.stack([imaging.load(synthetic_dataset / r["path"], 48) for r in val]).astype(np.float32)
    y = np.array([r["label"] == "malignant" for r in val], dtype=np.float64)
    q = np.clip(np.asarray(model(x, training=False), dtype=np.float64).reshape(-1), 1e-7, 1 - 1e-7)
    loss = float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    assert loss == pytest.approx(val_loss[m["best_epoch"] - 1], abs=2e-4)

    for name in ("model.tflite", "model.json", "split.csv", "training_curves.png", "classification_report.txt"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoint.npz").exists()
    assert load_run(run).parity == "passed"
    evaluated = _invoke("evaluate", "--json", "--model", str(run), str(synthetic_dataset))
    assert evaluated.exit_code == 0, evaluated.output


def test_resume_refuses_what_it_cannot_go_on_with(synthetic_dataset: Path, tiny_run_dir: Path, tmp_path: Path) -> None:
    nothing = _invoke("train", str(synthetic_dataset), "--out", str(tmp_path / "none"), *TINY, "--resume")
    assert nothing.exit_code == 2 and "no run to resume" in nothing.stderr

    finished = _invoke("train", str(synthetic_dataset), "--out", str(tiny_run_dir), "--resume")
    assert finished.exit_code == 2 and "holds a finished run" in finished.stderr

    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(data_dir=synthetic_dataset, out=run, weights="none", image_size=48, ema=0.0).save(run)
    other = _invoke("train", str(synthetic_dataset), "--out", str(run), "--resume", "--image-size", "64")
    assert other.exit_code == 2 and "--image-size 64 (the run has 48)" in other.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = _invoke("train", str(elsewhere), "--out", str(run), "--resume")
    assert moved.exit_code == 2 and "DATA_DIR" in moved.stderr


def _fit(model: Any, epochs: int, saved: list[checkpoint.PhaseState], resume: checkpoint.PhaseState | None) -> None:
    import keras

    rng = np.random.default_rng(0)
    x = rng.random((64, 4)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(np.float32)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=10, restore_best_weights=True)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=1, factor=0.5)

    def end_of_epoch(done: int, stopped: bool, logs: list[dict[str, float]], rate: float, *state: Any) -> None:
        saved.append(checkpoint.PhaseState("fine_tune", done, stopped, list(logs), rate, *state))

    first, last = checkpoint.callbacks(end_of_epoch, stop, plateau, resume)
    initial = 0
    if resume is not None:
        checkpoint.restore_weights(model, resume.model)
        checkpoint.restore_optimizer(model, resume.optimizer)
        model.optimizer.learning_rate = resume.learning_rate
        initial = resume.epochs_done
    callbacks = [first, keras.callbacks.SwapEMAWeights(swap_on_epoch=True), stop, plateau, last]
    # validation labels the other way round: the better it fits, the worse validation gets, so the best epoch is
    # the first, ReduceLROnPlateau halves the rate after every epoch, and both must survive the interruption
    model.fit(
        x,
        y,
        validation_data=(x, 1 - y),
        epochs=epochs,
        initial_epoch=initial,
        batch_size=8,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )


def _small_model() -> Any:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1, activation="sigmoid")]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2, use_ema=True, ema_momentum=0.9), loss="binary_crossentropy")
    return model


def test_a_fit_resumed_from_its_checkpoint_ends_where_the_uninterrupted_one_ends(tmp_path: Path) -> None:
    whole: list[checkpoint.PhaseState] = []
    uninterrupted = _small_model()
    _fit(uninterrupted, 6, whole, None)
    rates = [s.learning_rate for s in whole]
    assert rates[-1] < rates[0]  # ReduceLROnPlateau did lower it
    assert whole[-1].early_stopping["best_epoch"] == 0  # and the best epoch lies before the interruption

    path = tmp_path / checkpoint.CHECKPOINT_FILE
    checkpoint.save(path, checkpoint.State(current=whole[2]))  # as the run left it, killed after epoch 3
    state = checkpoint.load(path)
    assert state is not None and state.current is not None and state.current.epochs_done == 3
    rest: list[checkpoint.PhaseState] = []
    resumed = _small_model()
    _fit(resumed, 6, rest, state.current)
    assert [s.epochs_done for s in rest] == [4, 5, 6]
    assert [s.learning_rate for s in rest] == rates[3:]
    assert [e["val_loss"] for e in rest[-1].logs] == [e["val_loss"] for e in whole[-1].logs]
    for a, b in zip(uninterrupted.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
