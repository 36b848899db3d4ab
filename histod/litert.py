"""The one LiteRT runner: a ``.tflite`` model in ``ai_edge_litert``'s Interpreter, a batch of images in,
p(malignant) out.

    model = LiteRTModel(path_or_bytes, threads=2)
    p = model.predict(images)        # uint8 or float 0..255, (N, S, S, 3) -> float32 (N,)

The service's classifier (histod.daemon.classifier), the trainer's export check (histod.trainer.export) and the
benchmarks use it. It never imports TensorFlow. Batches of any size are run in chunks of at most ``max_chunk``
images (the input tensor is resized when a chunk's size changes), so memory stays bounded whatever the caller
sends. Full-integer models (uint8/int8 input and output) are quantised and dequantised with the model's own
parameters; histod itself exports float32 models.

Not thread-safe: one caller at a time (the classifier serialises its calls).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from histod.errors import ModelError

MAX_CHUNK = 64
"""images per interpreter call at most: bounds the input tensor's memory whatever batch the caller sends"""


class LiteRTModel:
    """A loaded ``.tflite`` classifier. ``image_size``: its square input side; ``input_dtype``: what it takes."""

    def __init__(
        self, model: Path | bytes, threads: int = 2, max_chunk: int = MAX_CHUNK, name: str | None = None
    ) -> None:
        """``model``: a .tflite file, or its bytes (``name`` then says where they came from, for messages)."""
        from ai_edge_litert.interpreter import Interpreter

        self.source = name or ("<bytes>" if isinstance(model, bytes) else str(model))
        self.threads = max(1, threads)
        self.max_chunk = max(1, max_chunk)
        try:
            if isinstance(model, bytes):
                self._interp: Any = Interpreter(model_content=model, num_threads=self.threads)
            else:
                self._interp = Interpreter(model_path=str(model), num_threads=self.threads)
            detail = self._interp.get_input_details()[0]
            out = self._interp.get_output_details()[0]
        except (ValueError, RuntimeError, IndexError, KeyError) as exc:
            raise ModelError(f"cannot load the LiteRT model {self.source}: {exc}") from exc
        self.input_shape = [int(v) for v in detail["shape"]]
        if len(self.input_shape) != 4 or self.input_shape[3] != 3 or self.input_shape[1] != self.input_shape[2]:
            raise ModelError(f"{self.source} takes input {self.input_shape}, not square RGB images (N, S, S, 3)")
        self.image_size = self.input_shape[1]
        self.input_dtype = np.dtype(detail["dtype"])
        self._input = int(detail["index"])
        self._output = int(out["index"])
        self.output_dtype = np.dtype(out["dtype"])
        self.input_scale, self.input_zero = (float(v) for v in detail["quantization"])
        self.output_scale, self.output_zero = (float(v) for v in out["quantization"])
        self._batch = -1

    def predict(self, images: NDArray[Any]) -> NDArray[np.float32]:
        """p(malignant) of each image (uint8, or float in 0..255, shape (N, S, S, 3)), float32 shape (N,)."""
        n = len(images)
        out = np.empty((n,), dtype=np.float32)
        for start in range(0, n, self.max_chunk):
            chunk = images[start : start + self.max_chunk]
            p = self._invoke(chunk)
            if p.shape != (len(chunk),):
                raise ModelError(f"{self.source} returned {p.size} values for {len(chunk)} images")
            out[start : start + len(chunk)] = p
        return out

    def _invoke(self, chunk: NDArray[Any]) -> NDArray[np.float32]:
        x = self._to_input(chunk)
        if x.shape[0] != self._batch:
            try:
                self._interp.resize_tensor_input(self._input, list(x.shape), strict=False)
                self._interp.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                self._batch = -1
                raise ModelError(f"{self.source}: cannot resize the input to {list(x.shape)}: {exc}") from exc
            self._batch = x.shape[0]
        self._interp.set_tensor(self._input, x)
        self._interp.invoke()
        raw = np.asarray(self._interp.get_tensor(self._output)).reshape(-1)
        if self.output_dtype == np.float32:
            return np.asarray(raw, dtype=np.float32)
        return ((raw.astype(np.float32) - self.output_zero) * self.output_scale).astype(np.float32)

    def _to_input(self, chunk: NDArray[Any]) -> NDArray[Any]:
        if self.input_dtype == np.float32:
            return np.ascontiguousarray(chunk, dtype=np.float32)
        if self.input_scale == 1.0 and self.input_zero == 0.0 and self.input_dtype == chunk.dtype:
            return np.ascontiguousarray(chunk)  # raw pixels are already the quantised values
        info = np.iinfo(self.input_dtype)
        q = np.round(np.asarray(chunk, dtype=np.float32) / self.input_scale + self.input_zero)
        return np.clip(q, info.min, info.max).astype(self.input_dtype)
