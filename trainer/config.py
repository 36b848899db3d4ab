"""Every hyper-parameter of a training run, in one place. The defaults are the recipe measured best on
patient-grouped splits of IDC tiles (docs/training.md, "What helps and what does not"): MobileNetV2 alpha 0.35
at 128 px, 3 head epochs, then the whole base fine-tuned at Adam 1e-4 for up to 30 epochs with flips and 90°
rotations, at most 100 images of one patient in each epoch, a moving average of the weights (EMA 0.999) scored
and kept, and Platt scaling folded into the model. ``--preset paper`` (histod.trainer.presets) gives the paper's
literal recipe instead.

The whole object is written to RUN_DIR/config.json, so a run can always be reproduced from its directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from histod.errors import ConfigError
from histod.runs import CONFIG_FILE


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- where ---------------------------------------------------------------------------------------
    # a folder holding benign/ and malignant/ (any letter case), a folder of such folders, or several of either:
    # their images are pooled, and one patient's images stay on one side of a split whichever folder they are in
    data_dir: Path | tuple[Path, ...]
    out: Path  # the RUN_DIR to write (created; may exist but must then be empty of model files)

    # --- schedule ------------------------------------------------------------------------------------
    head_epochs: int = Field(3, ge=0)  # phase 1: base frozen, only the new head learns
    epochs: int = Field(30, ge=0)  # phase 2: the last `fine_tune_layers` base layers learn too (EarlyStopping)
    batch_size: int = Field(8, ge=1)

    # --- model ---------------------------------------------------------------------------------------
    image_size: int = Field(128, ge=32)  # square input side; IDC tiles (50x50) are upscaled to it
    alpha: float = Field(0.35, gt=0)  # MobileNetV2 width multiplier (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
    weights: str = "imagenet"  # "imagenet", "none" (random init) or the path of an .h5 file of base weights
    fine_tune_layers: int = Field(155, ge=0)  # base layers unfrozen in phase 2 (MobileNetV2 has 154: all of them)
    dropout: float = Field(0.4, ge=0, lt=1)  # in the head, before the final Dense
    scaling: Literal["mobilenet", "unit"] = "mobilenet"  # pixels to [-1, 1] (MobileNetV2's own) or / 255 (paper)
    freeze_batchnorm: bool = True  # the pretrained base's BatchNorm stays in inference mode while fine-tuning

    # --- optimiser -----------------------------------------------------------------------------------
    head_learning_rate: float = Field(1e-3, gt=0)  # Adam, phase 1
    learning_rate: float = Field(1e-4, gt=0)  # Adam, phase 2 (at the paper's 1e-5 the base barely moves)
    ema: float = Field(0.999, ge=0, lt=1)  # >0: Adam keeps this exponential moving average of the weights, which
    # is what validation scores, EarlyStopping keeps and the run ends with (0 = off; 0.999 ~ the last 1,000 steps)
    patience: int = Field(5, ge=1)  # EarlyStopping on the validation loss; best weights restored
    lr_patience: int = Field(3, ge=1)  # ReduceLROnPlateau on the validation loss ...
    lr_factor: float = Field(0.5, gt=0, lt=1)  # ... multiplies the rate by this
    class_weights: bool = True  # weight the loss by inverse class frequency (imbalanced data)

    # --- data ----------------------------------------------------------------------------------------
    seed: int = 42  # split, weights init, augmentation and shuffling
    val_split: float = Field(0.2, gt=0, lt=1)  # held out: one fold of round(1/val_split), stratified, grouped
    group_pattern: str | None = None  # regex with a named group `group` (patient/slide id); None: built-ins
    augment: bool = True  # rotation 20°, zoom 0.2, shear, horizontal flip on the training split only
    split_by: Literal["patient", "image"] = "patient"  # "image" leaks a patient's tiles across the split (paper)
    val_patients: Path | None = None  # a file of patient ids, one a line: the validation side is exactly these
    # patients' images (in every data folder) instead of a drawn split
    patient_cap: int = Field(100, ge=0)  # at most this many images of one patient in each training epoch, drawn
    # afresh every epoch (0: all), so that a few densely sampled slides do not outweigh sparse patients

    # --- augmentation and the served model ----------------------------------------------------------
    dihedral: bool = True  # also vertical flips and 90° rotations of training images: tissue has no "up"
    tta: Literal[1, 2, 4, 8] = 1  # prediction averages this many flips/rotations of each image (1 = off)
    calibrate: bool = True  # Platt scaling (scale and shift of the logit) fitted on the validation split, in the model
    preset: str | None = None  # the --preset this config started from; recorded, never read back

    # --- the model's scale (histod.tiling: larger inputs are cut into tiles of this side) -------------
    tile_px: int | None = Field(None, ge=1)  # the training images' side in source pixels; None: their median side
    tile_mpp: float | None = Field(None, gt=0)  # their microns per pixel, when known (picks a slide's level)

    # --- decision threshold --------------------------------------------------------------------------
    target_sensitivity: float | None = Field(None, gt=0, le=1)  # None: maximise balanced accuracy
    threshold: float | None = Field(None, gt=0, lt=1)  # a fixed threshold instead (the paper's 0.5)

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value: str) -> str:
        if value in ("imagenet", "none"):
            return value
        path = Path(value)
        if path.suffix.lower() != ".h5":
            raise ValueError(f"weights must be 'imagenet', 'none' or an .h5 file, not {value!r}")
        return value

    @field_validator("data_dir", mode="before")
    @classmethod
    def _one_or_several(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("give at least one data folder")
            return value[0] if len(value) == 1 else tuple(value)
        return value

    @property
    def data_dirs(self) -> tuple[Path, ...]:
        """The data folders as given (a folder of folders is expanded by trainer.data.data_folders)."""
        return self.data_dir if isinstance(self.data_dir, tuple) else (self.data_dir,)

    @property
    def weights_path(self) -> Path | None:
        return None if self.weights in ("imagenet", "none") else Path(self.weights)

    def save(self, run_dir: Path) -> Path:
        path = run_dir / CONFIG_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, run_dir: Path) -> TrainConfig:
        path = run_dir / CONFIG_FILE
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
