"""Save the trained model twice, as model.keras and as a float32 LiteRT model.tflite for serving, prove that the
two agree on the validation images, and write model.json (histod.runs.RunInfo) with both sha256 sums."""

from __future__ import annotations

import contextlib
import io
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from histod import tta
from histod.errors import ExportParityError, ModelError
from histod.logs import get_logger
from histod.runs import KERAS_FILE, TFLITE_FILE, RunInfo, sha256_file
from histod.trainer.litert import LiteRTModel
from histod.trainer.model import OUTPUT_LAYER

log = get_logger("histod.trainer")

PARITY_TOLERANCE = 1e-4


def to_tflite(model: Any) -> bytes:
    """Float32 LiteRT flatbuffer, weights frozen in, batch dimension dynamic (the server resizes it)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = []  # float32: no quantisation
    chatter = io.StringIO()  # the converter prints its temporary SavedModel's signature to stdout
    try:
        with contextlib.redirect_stdout(chatter):
            data: bytes = converter.convert()
    except Exception as exc:
        raise ModelError(f"LiteRT conversion failed: {exc}") from exc
    log.debug("tflite_converted", bytes=len(data), converter_output=chatter.getvalue()[-2000:])
    return data


def keras_predict(model: Any, images: NDArray[Any], batch_size: int = 32) -> NDArray[np.float32]:
    """p(malignant) (N,) from the Keras model, inference mode."""
    if len(images) == 0:
        return np.zeros((0,), dtype=np.float32)
    out = model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)
    return np.asarray(out, dtype=np.float32).reshape(-1)


def predict_views(model: Any, images: NDArray[Any], n: int, batch_size: int = 32) -> NDArray[np.float32]:
    """p(malignant) of each of the first ``n`` test-time views (histod.tta), shape (n, N)."""
    return np.stack([keras_predict(model, tta.view(images, i), batch_size) for i in range(n)])


def fold_calibration(model: Any, scale: float, shift: float) -> None:
    """Platt scaling inside the model: sigmoid(w.x + c) becomes sigmoid(scale * (w.x + c) + shift) by scaling the
    last Dense layer's kernel and bias, so model.keras, model.tflite and every server output calibrated p."""
    layer = model.get_layer(OUTPUT_LAYER)
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * scale, bias * scale + shift])


def parity_allowance(calibration_scale: float = 1.0, tolerance: float = PARITY_TOLERANCE) -> float:
    """The largest |Keras - LiteRT| accepted: ``tolerance``, times the folded Platt scale when that is above 1."""
    return tolerance * max(1.0, calibration_scale)


def parity(
    keras_p: NDArray[np.float32],
    litert_p: NDArray[np.float32],
    tolerance: float = PARITY_TOLERANCE,
    calibration_scale: float = 1.0,
) -> float:
    """Max |Keras - LiteRT|; raise ExportParityError above ``tolerance`` times the folded Platt scale (when > 1).

    A scale s folded into the last layer multiplies the logit, so the same float32 rounding in the base moves
    p up to s times as far; the check is meant for conversion faults (wrong ops, preprocessing, weights), which
    move p by 1e-2 and more, not for rounding."""
    if keras_p.shape != litert_p.shape:
        raise ExportParityError(f"LiteRT returned shape {litert_p.shape}, Keras {keras_p.shape}")
    allowed = parity_allowance(calibration_scale, tolerance)
    diff = float(np.max(np.abs(keras_p.astype(np.float64) - litert_p))) if keras_p.size else 0.0
    if not np.isfinite(diff) or diff > allowed:
        scaled = f" (calibration scale {calibration_scale:.3g})" if calibration_scale > 1.0 else ""
        raise ExportParityError(
            f"the LiteRT export disagrees with the Keras model: max |diff| {diff:.3g} > {allowed:g}{scaled} "
            f"on {keras_p.size} validation images"
        )
    return diff


def export(
    model: Any, run_dir: Path, check_images: NDArray[np.uint8], calibration_scale: float = 1.0
) -> tuple[float, int]:
    """Write model.keras and model.tflite; return (max |diff| on ``check_images``, images checked)."""
    keras_path = run_dir / KERAS_FILE
    model.save(keras_path)
    tflite_path = run_dir / TFLITE_FILE
    tflite_path.write_bytes(to_tflite(model))
    keras_p = keras_predict(model, check_images)
    litert_p = LiteRTModel(tflite_path).predict(check_images)
    diff = parity(keras_p, litert_p, calibration_scale=calibration_scale)
    log.info("export", keras=str(keras_path), tflite=str(tflite_path), parity_max_abs_diff=diff, n=len(keras_p))
    return diff, len(keras_p)


def write_run_info(
    run_dir: Path,
    *,
    image_size: int,
    threshold: float,
    alpha: float,
    tta_views: int = 1,
    calibration: tuple[float, float] = (1.0, 0.0),
) -> RunInfo:
    """model.json: what a server needs, with the sha256 of both model files."""
    now = datetime.now(UTC)
    info = RunInfo(
        run_id=f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}",
        created=now.isoformat(timespec="seconds"),
        image_size=image_size,
        threshold=threshold,
        alpha=alpha,
        tta=tta_views,
        calibration_scale=calibration[0],
        calibration_shift=calibration[1],
        keras_sha256=sha256_file(run_dir / KERAS_FILE),
        tflite_sha256=sha256_file(run_dir / TFLITE_FILE),
    )
    info.write(run_dir)
    return info
