"""Serve a RUN_DIR's model behind one call: ``classifier.predict(batch) -> p(malignant)``.

    classifier = load_classifier(run_dir)            # LiteRT: model.tflite, no TensorFlow in the process
    p = classifier.predict(images)                   # uint8 (N, S, S, 3) -> float32 (N,)
    labels = np.where(p >= classifier.threshold, ...)

``litert`` (the default) runs ``model.tflite`` with histod.litert (``ai_edge_litert``); this module never imports
TensorFlow for it. ``keras`` loads ``model.keras`` (importing TensorFlow/Keras then, lazily), for parity checks. Both
check the served file against the sha256 recorded in ``model.json`` and raise :class:`ModelError` on any
mismatch or missing file. When the run says ``tta`` N > 1, p is the mean over N flips/rotations (histod.tta).

The inference engine is the ``engine`` setting: ``litert`` or ``keras``. A classifier is safe to call from several
threads (calls are serialised); the service calls it from its infer thread.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from histod import tta
from histod.errors import ConfigError, ModelError
from histod.litert import MAX_CHUNK
from histod.logs import get_logger
from histod.runs import KERAS_FILE, TFLITE_FILE, RunInfo, load_run

EngineKind = Literal["litert", "keras"]

_log = get_logger("histod.classifier")


class Classifier(ABC):
    """One served model. ``predict`` takes uint8 RGB (N, S, S, 3), S = ``image_size``; returns float32 (N,)."""

    name: str
    """``litert`` or ``keras``"""

    def __init__(self, run_dir: Path, run: RunInfo, model_path: Path, sha256: str) -> None:
        self.run_dir = run_dir
        self.run = run
        self.model_path = model_path
        self.sha256 = sha256
        """of the model file served (equal to model.json's record, checked at load)"""
        self.image_size = run.image_size
        self.threshold = run.threshold
        self._lock = threading.Lock()

    def predict(self, batch: NDArray[Any]) -> NDArray[np.float32]:
        """p(malignant) for each image of ``batch`` (uint8, or float in 0..255), shape (N,)."""
        x = self._check(batch)
        if x.shape[0] == 0:
            return np.zeros((0,), dtype=np.float32)
        x = tta.views(x, self.run.tta)
        with self._lock:
            out = np.concatenate([self._infer(x[i : i + MAX_CHUNK]) for i in range(0, len(x), MAX_CHUNK)])
        if out.shape != (len(x),):
            raise ModelError(f"{self.model_path} returned {out.shape[0]} values for {len(x)} images")
        if not np.all(np.isfinite(out)):
            raise ModelError(f"{self.model_path} returned non-finite probabilities")
        p = tta.average(out, self.run.tta)
        return np.asarray(np.clip(p, 0.0, 1.0), dtype=np.float32)

    def warm_up(self) -> None:
        """One prediction on a blank image, so that the first file does not wait for the runtime's set-up."""
        self.predict(np.zeros((1, self.image_size, self.image_size, 3), dtype=np.uint8))

    def _check(self, batch: NDArray[Any]) -> NDArray[np.float32]:
        shape = getattr(batch, "shape", None)
        s = self.image_size
        if shape is None or len(shape) != 4 or tuple(shape[1:]) != (s, s, 3):
            raise ValueError(f"expected a batch of shape (N, {s}, {s}, 3), got {shape}")
        return np.ascontiguousarray(batch, dtype=np.float32)

    @abstractmethod
    def _infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """Raw model output for a float32 (n, S, S, 3) chunk, flattened to (n,)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(run_id={self.run.run_id!r}, sha256={self.sha256[:12]}, size={self.image_size})"


class LiteRTClassifier(Classifier):
    """``model.tflite`` through the one LiteRT runner (histod.litert), loaded from the bytes whose sha256 was
    checked, so the file cannot be swapped between the check and the load."""

    name = "litert"

    def __init__(self, run_dir: Path, run: RunInfo, threads: int = 2) -> None:
        from histod.litert import LiteRTModel

        path = run_dir / TFLITE_FILE
        data = _read_checked(path, run.tflite_sha256)
        super().__init__(run_dir, run, path, run.tflite_sha256)
        model = LiteRTModel(data, threads=threads, max_chunk=MAX_CHUNK, name=str(path))
        if model.image_size != run.image_size:
            raise ModelError(f"{path} takes input {model.input_shape}; model.json says image_size {run.image_size}")
        if model.input_dtype != np.float32:
            raise ModelError(f"{path} takes {model.input_dtype} input; histod serves float32 models")
        self._model = model
        self.threads = model.threads

    def _infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        return self._model.predict(x)


class KerasClassifier(Classifier):
    """``model.keras`` with Keras 3 (imports TensorFlow): for parity checks against the LiteRT engine."""

    name = "keras"

    def __init__(self, run_dir: Path, run: RunInfo) -> None:
        path = run_dir / KERAS_FILE
        _read_checked(path, run.keras_sha256)
        super().__init__(run_dir, run, path, run.keras_sha256)
        from histod.trainer import require_training

        require_training("the keras engine")
        import keras

        try:
            self._model: Any = keras.models.load_model(path, compile=False)
        except Exception as exc:  # Keras raises many types for a bad archive
            raise ModelError(f"cannot load the Keras model {path}: {exc}") from exc

    def _infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        return np.asarray(self._model(x, training=False), dtype=np.float32).reshape(-1)


def _read_checked(path: Path, expected: str) -> bytes:
    """The bytes of ``path`` after checking their sha256 against model.json's record."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelError(f"{path} is missing from the run directory") from exc
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise ModelError(
            f"{path} has sha256 {actual}, but model.json records {expected}: "
            "the model file was changed or replaced after training"
        )
    return data


def load_classifier(run_dir: Path, kind: EngineKind = "litert", threads: int = 2) -> Classifier:
    """Load the model of ``run_dir`` (a RUN_DIR written by ``histod train``) for serving."""
    run = load_run(run_dir)
    classifier: Classifier
    if kind == "litert":
        classifier = LiteRTClassifier(run_dir, run, threads=threads)
    elif kind == "keras":
        classifier = KerasClassifier(run_dir, run)
    else:
        raise ConfigError(f"unknown engine {kind!r}: use 'litert' or 'keras'")
    _log.info(
        "model.loaded",
        engine=classifier.name,
        run_id=run.run_id,
        model=str(classifier.model_path),
        sha256=classifier.sha256,
        image_size=classifier.image_size,
        threshold=classifier.threshold,
        tta=run.tta,
    )
    return classifier
