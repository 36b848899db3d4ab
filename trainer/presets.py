"""Named starting points for `histod train --preset NAME`; any flag given on the command line wins over them.

Without a preset, TrainConfig's defaults apply: the recipe measured best on patient-grouped splits of IDC tiles
(docs/training.md, "What helps and what does not"): 128 px, alpha 0.35, 3 head epochs, then the whole base
fine-tuned at Adam 1e-4 for up to 30 epochs with vertical flips and 90° rotations, at most 100 images of one
patient in each epoch, a moving average of the weights (EMA 0.999) scored, early-stopped on and kept, and Platt
scaling folded into the model; one view per image.

* ``paper``: the method's literal recipe, to reproduce its figure: MobileNetV2 alpha 0.35 at 224 px, pixels / 255
  (not the [-1, 1] MobileNetV2 was trained on), no head warm-up, one phase of up to 20 epochs at Adam 1e-5 with
  batch 8, the last 30 base layers and their BatchNorm training, the paper's augmentation (rotation 20°, zoom 0.2,
  shear 0.2, horizontal flip) and no other, no class weights, no moving average, no calibration, every training
  image in every epoch (no per-patient cap), an image-level 80/20 split (tiles of one patient on both sides, so
  its validation figures are optimistic), threshold 0.5.
  ``scaling`` and ``freeze_batchnorm`` exist for this recipe only and have no flag of their own.
"""

from __future__ import annotations

from typing import Any

from histod.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "image_size": 224,
        "alpha": 0.35,
        "head_epochs": 0,
        "epochs": 20,
        "batch_size": 8,
        "learning_rate": 1e-5,
        "fine_tune_layers": 30,
        "scaling": "unit",
        "freeze_batchnorm": False,
        "augment": True,
        "dihedral": False,
        "ema": 0.0,
        "class_weights": False,
        "calibrate": False,
        "tta": 1,
        "split_by": "image",
        "threshold": 0.5,
        "patient_cap": 0,
    },
}

PRESET_ONLY = ("scaling", "freeze_batchnorm")
"""TrainConfig fields that only a preset sets (the paper's): no `histod train` flag of their own"""


def preset(name: str | None) -> dict[str, Any]:
    """The TrainConfig values of a preset (with ``preset`` itself recorded), or {} for None."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: use one of {', '.join(sorted(PRESETS))}")
    return {**PRESETS[name], "preset": name}
