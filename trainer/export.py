"""Save the trained model twice, as model.keras and as a float32 LiteRT model.tflite for serving, measure how far
the two agree on the validation images, and write model.json (histod.runs.RunInfo) with both sha256 sums.

The parity check is there for conversion faults (a wrong op, lost preprocessing, stale weights), which move p by
1e-2 and more. Two float32 runtimes never agree exactly: XNNPACK and TensorFlow order their sums differently and
LiteRT folds each BatchNormalization into its convolution. Through this network p differs by up to 1e-5 after a
few epochs and up to about 1e-4 after thirty, the difference growing with training (bench/parity.py,
bench/results/parity.json and parity-long.json). The check compares what a user sees:

* p within ``PARITY_TOLERANCE`` on every image (times the folded Platt scale when that is above 1: the scale
  multiplies the logit, and with it the rounding);
* the label at the stored threshold the same on every image, except one whose p lies within that tolerance of
  the threshold (there, float rounding decides either way).

A run that fails it is still written whole; it is marked (metrics.json and model.json ``parity``), and
`histod serve` refuses to serve its model.tflite unless told otherwise.
"""

from __future__ import annotations

import contextlib
import io
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from histod import tta
from histod.errors import ModelError
from histod.litert import LiteRTModel
from histod.logs import get_logger
from histod.runs import KERAS_FILE, TFLITE_FILE, RunInfo, sha256_file

log = get_logger("histod.trainer")

PARITY_TOLERANCE = 2e-3
"""the largest |p Keras - p LiteRT| accepted (before the Platt scale): over ten times the largest difference seen
after a full training, five times below the smallest conversion fault (docs/training.md, "The export check")"""


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
    log.debug("export.converter_output", bytes=len(data), converter_output=chatter.getvalue()[-2000:])
    return data


def save_keras(model: Any, run_dir: Path) -> Path:
    path = run_dir / KERAS_FILE
    model.save(path)
    return path


def save_tflite(model: Any, run_dir: Path) -> Path:
    path = run_dir / TFLITE_FILE
    path.write_bytes(to_tflite(model))
    return path


@dataclass(frozen=True)
class Parity:
    """How far model.tflite agrees with model.keras on the images checked (recorded in metrics.json)."""

    images: int
    max_abs_diff: float  # inf when LiteRT returned the wrong shape or a non-finite p
    p99_abs_diff: float
    tolerance: float  # the allowance applied: PARITY_TOLERANCE times the Platt scale when that is above 1
    threshold: float
    labels_disagreeing: int  # images labelled differently at the threshold
    labels_disagreeing_beyond_tolerance: int  # ... of which p lies farther than the tolerance from the threshold
    passed: bool

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def status(self) -> Literal["passed", "failed"]:
        return "passed" if self.passed else "failed"

    def problem(self) -> str:
        """What disagrees, in one phrase (for a failed check)."""
        labels = f"; {self.labels_disagreeing} labels differ at threshold {self.threshold:.4g}"
        return f"max |diff| {self.max_abs_diff:.3g} > {self.tolerance:.3g} on {self.images} validation images" + (
            labels if self.labels_disagreeing else ""
        )


def parity_allowance(calibration_scale: float = 1.0, tolerance: float | None = None) -> float:
    """The largest |Keras - LiteRT| accepted: the tolerance (PARITY_TOLERANCE unless given), times the folded
    Platt scale when that is above 1."""
    base = PARITY_TOLERANCE if tolerance is None else tolerance
    return base * max(1.0, calibration_scale)


def check_parity(
    keras_p: NDArray[Any],
    litert_p: NDArray[Any],
    threshold: float,
    calibration_scale: float = 1.0,
    tolerance: float | None = None,
) -> Parity:
    """Compare the two models' p (see the module's docstring for the rule); never raises."""
    allowed = parity_allowance(calibration_scale, tolerance)
    k = np.asarray(keras_p, dtype=np.float64).reshape(-1)
    lite = np.asarray(litert_p, dtype=np.float64)
    if lite.shape != k.shape or not np.all(np.isfinite(lite)):
        return Parity(k.size, float("inf"), float("inf"), allowed, threshold, k.size, k.size, False)
    diff = np.abs(k - lite)
    disagree = (k >= threshold) != (lite >= threshold)
    beyond = disagree & (np.abs(k - threshold) > allowed)
    worst = float(diff.max()) if diff.size else 0.0
    return Parity(
        images=int(k.size),
        max_abs_diff=worst,
        p99_abs_diff=float(np.percentile(diff, 99)) if diff.size else 0.0,
        tolerance=allowed,
        threshold=float(threshold),
        labels_disagreeing=int(disagree.sum()),
        labels_disagreeing_beyond_tolerance=int(beyond.sum()),
        passed=bool(worst <= allowed and not beyond.any()),
    )


def litert_p(path: Path, images: NDArray[Any], views: int = 1) -> NDArray[np.float32]:
    """model.tflite's p for ``images``, averaged over the first ``views`` test-time views as the service does."""
    return tta.average(LiteRTModel(path).predict(tta.views(images, views)), views)


def write_run_info(
    run_dir: Path,
    *,
    image_size: int,
    threshold: float,
    alpha: float,
    tta_views: int = 1,
    calibration: tuple[float, float] = (1.0, 0.0),
    parity: Literal["passed", "failed"] = "passed",
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
        parity=parity,
    )
    info.write(run_dir)
    return info
