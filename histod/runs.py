"""The contract between `histod train` (which writes a run directory) and everything that serves one.

A RUN_DIR holds ``model.keras``, ``model.tflite``, ``metrics.json``, ``config.json`` and ``model.json``
(this file's :class:`RunInfo`). Both models take raw RGB float32 in 0..255 of shape (N, S, S, 3) and
return p(malignant) of shape (N, 1): MobileNetV2's scaling to [-1, 1] is inside the model.

``model.json`` is written last: a folder without it is a run still training, or one that was interrupted
(``checkpoint.npz`` is then there, and `histod train ... --resume` goes on with it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError, field_validator

from histod import LABELS
from histod.errors import ModelError
from histod.tta import VIEWS

MODEL_INFO = "model.json"
KERAS_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"


class RunInfo(BaseModel):
    """What a server needs to know about a trained model."""

    format: int = 1
    run_id: str
    created: str
    image_size: int
    threshold: float
    labels: tuple[str, str] = LABELS
    alpha: float
    keras_sha256: str
    tflite_sha256: str
    tta: int = 1
    """p is averaged over this many flips/rotations of each image (histod.tta: 1 = off, 2, 4 or 8)"""
    calibration_scale: float = 1.0
    calibration_shift: float = 0.0
    """Platt scaling already folded into the model's last layer: p = sigmoid(scale * logit + shift) (recorded for
    the audit; 1 and 0 = none)"""
    parity: Literal["passed", "failed"] = "passed"
    """whether model.tflite agreed with model.keras on the validation images (metrics.json ``parity`` has the
    figures); `histod serve` refuses a ``failed`` model.tflite unless told otherwise"""

    @field_validator("tta", mode="before")
    @classmethod
    def _tta_views(cls, value: object) -> object:
        if isinstance(value, bool):  # format 1 files said true for "image and its horizontal flip"
            return 2 if value else 1
        return value

    @field_validator("tta")
    @classmethod
    def _check_tta(cls, value: int) -> int:
        if value not in VIEWS:
            raise ValueError(f"tta must be one of {VIEWS}")
        return value

    def write(self, run_dir: Path) -> Path:
        path = run_dir / MODEL_INFO
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_run(run_dir: Path) -> RunInfo:
    """Read and check ``run_dir/model.json``; raise ModelError naming what is wrong."""
    if not run_dir.is_dir():
        raise ModelError(f"model run directory {run_dir} does not exist (train one with `histod train`)")
    path = run_dir / MODEL_INFO
    if not path.is_file():
        raise ModelError(f"{run_dir} is not a histod run directory: {MODEL_INFO} is missing")
    try:
        return RunInfo.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise ModelError(f"{path} is invalid: {exc}") from exc


def load_metrics(run_dir: Path) -> dict[str, object]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}
