"""histod.trainer: train, evaluate and export the Benign/Malignant MobileNetV2 classifier.

Read in this order:

    config.py     TrainConfig: every hyper-parameter (saved as RUN_DIR/config.json)
    data.py       discover -> group_of -> split (stratified, patient-grouped) -> load_images
    model.py      build_model: raw RGB 0..255 -> MobileNetV2 scaling -> MobileNetV2 base -> head
    fit.py        two phases: head only, then fine-tune the base; augmentation in tf.data
    checkpoint.py the fitting state after every epoch (RUN_DIR/checkpoint.npz), for --resume
    evaluate.py   metrics, the decision threshold, calibration, patient bootstrap (pure functions)
    score.py      predict views -> Platt -> threshold -> metrics -> bootstrap (train and --cv)
    export.py     model.keras + model.tflite, Keras/LiteRT parity check, model.json
    artefacts.py  metrics.json, reports, plots, split.csv
    api.py        train(cfg) -> RUN_DIR, evaluate_folder(...), predict_paths(...)
    cv.py         --cv K: k-fold patient-grouped cross-validation

Importing this package is cheap: TensorFlow is imported inside the functions that need it. A serving install
(`pip install histod`) has no TensorFlow; training needs `pip install 'histod[train]'` (:func:`require_training`).
"""

from __future__ import annotations

import importlib.util

TRAIN_EXTRA = "pip install 'histod[train]'"
TRAINING_MODULES = ("tensorflow", "keras", "sklearn", "scipy")
"""what the train extra adds (import names): a serving install has none of them"""


def require_training(what: str) -> None:
    """Raise ConfigError unless what the train extra installs is there: ``what`` (a command) needs it."""
    missing = [name for name in TRAINING_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        from histod.errors import ConfigError

        names = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
        raise ConfigError(f"{what} needs {names}, which this installation lacks: {TRAIN_EXTRA}")
