"""Training-split augmentation, as functions of a float32 batch (B, S, S, 3) in 0..255 -> the same shape and range.

* ``paper``: rotation 20°, zoom 0.2, shear 0.2, horizontal flip, nearest fill (the paper's ImageDataGenerator).
* ``dihedral``: a random one of the 8 flips/90° rotations per image (tissue on a slide has no "up").

Colour and H&E stain jitter, MixUp and label smoothing were measured on held-out patients and bought nothing
(bench/README.md, "levers"); they are not offered.

Nothing here is part of the saved model: augmentation runs in the tf.data pipeline of the training split only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from histod.trainer.config import TrainConfig

Batch = Any  # a tf.Tensor (B, S, S, 3) float32 in 0..255


def paper(seed: int) -> Callable[[Batch], Batch]:
    import keras

    layers = keras.Sequential(
        [
            keras.layers.RandomRotation(20 / 360, fill_mode="nearest", seed=seed),
            keras.layers.RandomZoom(0.2, fill_mode="nearest", seed=seed + 1),
            keras.layers.RandomShear(x_factor=0.2, y_factor=0.2, fill_mode="nearest", seed=seed + 2),
            keras.layers.RandomFlip("horizontal", seed=seed + 3),
        ],
        name="augment",
    )
    return lambda x: layers(x, training=True)


def dihedral(x: Batch) -> Batch:
    """Per image: transpose with probability 1/2, then flip each axis with probability 1/2 (all 8 symmetries)."""
    import tensorflow as tf

    n = tf.shape(x)[0]

    def coin() -> Any:
        return tf.random.uniform((n, 1, 1, 1)) < 0.5

    x = tf.where(coin(), tf.transpose(x, [0, 2, 1, 3]), x)  # square images: the shape is unchanged
    x = tf.where(coin(), tf.reverse(x, axis=[1]), x)
    return tf.where(coin(), tf.reverse(x, axis=[2]), x)


def pipeline(cfg: TrainConfig) -> Callable[[Batch], Batch] | None:
    """The configured augmentation of a training batch, or None when there is none."""
    import tensorflow as tf

    steps: list[Callable[[Batch], Batch]] = []
    if cfg.augment:
        steps.append(paper(cfg.seed))
    if cfg.dihedral:
        steps.append(dihedral)
    if not steps:
        return None

    def run(x: Batch) -> Batch:
        for step in steps:
            x = step(x)
        return tf.clip_by_value(x, 0.0, 255.0)

    return run
