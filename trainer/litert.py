"""A small LiteRT runner for the trainer's own needs (the export parity check and `histod predict`).

The service has its own engine (histod.daemon.engine); the trainer never imports the daemon, so this stays a
private helper: model.tflite in, p(malignant) out, any batch size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from histod import tta
from histod.errors import ModelError


class LiteRTModel:
    """Runs model.tflite: float32 (or uint8) RGB 0..255 of shape (N, S, S, 3) -> float32 p(malignant) (N,)."""

    def __init__(self, path: Path, threads: int = 2) -> None:
        from ai_edge_litert.interpreter import Interpreter

        try:
            self._interp: Any = Interpreter(model_path=str(path), num_threads=threads)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load the LiteRT model {path}: {exc}") from exc
        detail = self._interp.get_input_details()[0]
        self._input = int(detail["index"])
        self._output = int(self._interp.get_output_details()[0]["index"])
        self.image_size = int(detail["shape"][1])
        self._batch = -1
        self.threshold = 0.5  # set by the caller from model.json
        self.tta = 1  # views averaged per image (histod.tta); set by the caller from model.json

    def predict(self, images: NDArray[Any], batch_size: int = 32) -> NDArray[np.float32]:
        if self.tta > 1:
            return tta.average(self._predict(tta.views(images, self.tta), batch_size), self.tta)
        return self._predict(images, batch_size)

    def _predict(self, images: NDArray[Any], batch_size: int) -> NDArray[np.float32]:
        out = np.empty((len(images),), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            chunk = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
            if chunk.shape[0] != self._batch:
                self._interp.resize_tensor_input(self._input, list(chunk.shape), strict=True)
                self._interp.allocate_tensors()
                self._batch = chunk.shape[0]
            self._interp.set_tensor(self._input, chunk)
            self._interp.invoke()
            out[start : start + len(chunk)] = self._interp.get_tensor(self._output).reshape(-1)
        return out
