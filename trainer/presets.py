"""Named starting points for `histod train --preset NAME`; any flag given on the command line wins over them.

* ``paper``: the method's literal recipe, to reproduce its figure: alpha 0.35, 224 px, pixels / 255 (not the
  [-1, 1] MobileNetV2 was trained on), no head warm-up, one phase at Adam 1e-5 with the last 30 base layers and
  their BatchNorm training, no class weights, an image-level 80/20 split (tiles of one patient on both sides, so
  its validation figures are optimistic), threshold 0.5.
* ``histology``: what the lever measurements in bench/README.md kept, on patient-grouped splits of IDC tiles:
  128 px, vertical flips and 90° rotations, the whole base fine-tuned at Adam 1e-4 for up to 30 epochs, and a
  moving average of the weights (EMA 0.999) is what is scored, early-stopped on and kept, and Platt scaling
  (``--calibrate``) folded into the model, since the averaged model's p came out biased. One view per image:
  at 128 px the 8 flips/rotations (``--tta 8``) added +0.001 / +0.003 over 5 folds at 0.4x the service's
  full-load throughput. (Until the eighth session: 96 px with 8 views, which 128 px with one view matched or
  beat on 4 of 5 folds.)

With no preset, TrainConfig's own defaults apply (224 px, alpha 1.0, two phases, class weights, patient split).
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
        "learning_rate": 1e-5,
        "fine_tune_layers": 30,
        "scaling": "unit",
        "freeze_batchnorm": False,
        "class_weights": False,
        "split_by": "image",
        "threshold": 0.5,
    },
    "histology": {  # bench/README.md "levers": each change measured alone, then stacked
        "image_size": 128,  # IDC tiles are 50x50, upscaled; one view here matched or beat 96 px with 8 (4 of 5 folds)
        "alpha": 0.35,
        "head_epochs": 3,
        "epochs": 30,  # EarlyStopping (patience 5) usually ends it sooner
        "dihedral": True,  # vertical flips and 90° rotations: tissue has no "up"
        "learning_rate": 1e-4,  # fine-tuning at 1e-5 barely moves the base (training loss stays ~0.5)
        "fine_tune_layers": 155,  # the whole base (MobileNetV2 has 154 layers at any alpha)
        "ema": 0.999,  # score and keep a moving average of the weights: the monitoring loss stops swinging
        "calibrate": True,  # the averaged model's p is biased (ECE 0.11 on held-out patients); Platt: 0.03
        "tta": 1,  # 8 views bought +0.001 / +0.003 at 128 px (5 folds) for 0.4x the full-load throughput
    },
}


def preset(name: str | None) -> dict[str, Any]:
    """The TrainConfig values of a preset (with ``preset`` itself recorded), or {} for None."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: use one of {', '.join(sorted(PRESETS))}")
    return {**PRESETS[name], "preset": name}
