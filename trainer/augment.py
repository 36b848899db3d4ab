"""Training-split augmentation, as functions of a float32 batch (B, S, S, 3) in 0..255 -> the same shape and range.

* ``paper``: rotation 20°, zoom 0.2, shear 0.2, horizontal flip, nearest fill (the paper's ImageDataGenerator).
* ``dihedral``: a random one of the 8 flips/90° rotations per image (tissue on a slide has no "up").
* ``color``: brightness, contrast, saturation and hue jitter (Keras' preprocessing layers), scaled by a strength.
* ``stain``: H&E stain jitter in haematoxylin-eosin-DAB optical-density space (Tellez et al. 2018, "Whole-slide
  mitosis detection in H&E breast histology using PHH3 as a reference to train distilled stain-invariant
  convolutional networks"): each stain's concentration is scaled by U(1-s, 1+s) and shifted by U(-s, s).

Nothing here is part of the saved model: augmentation runs in the tf.data pipeline of the training split only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from histod.trainer.config import TrainConfig

Batch = Any  # a tf.Tensor (B, S, S, 3) float32 in 0..255

# Ruifrok & Johnston's stain vectors (optical density of pure haematoxylin, eosin, DAB), as scikit-image uses them.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


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


def color(strength: float, seed: int) -> Callable[[Batch], Batch]:
    """Brightness ±10 %, contrast ±20 %, saturation and hue jitter, all times ``strength``."""
    import keras

    s = float(strength)
    layers = keras.Sequential(
        [
            keras.layers.RandomBrightness(0.1 * s, value_range=(0, 255), seed=seed + 10),
            keras.layers.RandomContrast(0.2 * s, value_range=(0, 255), seed=seed + 11),
            keras.layers.RandomSaturation((0.5 - 0.2 * s, 0.5 + 0.2 * s), value_range=(0, 255), seed=seed + 12),
            keras.layers.RandomHue(0.1 * s, value_range=(0, 255), seed=seed + 13),
        ],
        name="color_jitter",
    )
    return lambda x: layers(x, training=True)


def stain(x: Batch, sigma: float) -> Batch:
    """HED jitter: RGB -> optical density -> stain concentrations, scaled and shifted per image, -> RGB."""
    import tensorflow as tf

    n = tf.shape(x)[0]
    hed_from_rgb = tf.constant(HED_FROM_RGB, dtype=tf.float32)
    rgb_from_hed = tf.constant(RGB_FROM_HED, dtype=tf.float32)
    od = -tf.math.log((x + 1.0) / 256.0)  # 0 for white (255), grows with absorbed light
    hed = tf.einsum("bhwc,cd->bhwd", od, hed_from_rgb)
    scale = tf.random.uniform((n, 1, 1, 3), 1.0 - sigma, 1.0 + sigma)
    shift = tf.random.uniform((n, 1, 1, 3), -sigma, sigma)
    od = tf.einsum("bhwd,dc->bhwc", hed * scale + shift, rgb_from_hed)
    return tf.clip_by_value(256.0 * tf.exp(-od) - 1.0, 0.0, 255.0)


def mixup(alpha: float, seed: int) -> Callable[[Batch, Batch], tuple[Batch, Batch]]:
    """MixUp (Zhang et al. 2018) of a training batch and its labels: each image becomes w * itself + (1 - w) * another
    of the batch, w ~ Beta(alpha, alpha), and its label the same mixture (a soft label); known to soften the pull of
    wrong labels. Keras' own layer; the labels go through it as a (B, 1) column."""
    import keras
    import tensorflow as tf

    layer = keras.layers.MixUp(alpha=alpha, seed=seed + 20)

    def run(x: Batch, y: Batch) -> tuple[Batch, Batch]:
        out = layer({"images": x, "labels": tf.reshape(y, (-1, 1))})
        return out["images"], tf.reshape(out["labels"], (-1,))

    return run


def pipeline(cfg: TrainConfig) -> Callable[[Batch], Batch] | None:
    """The configured augmentation of a training batch, or None when there is none."""
    import tensorflow as tf

    steps: list[Callable[[Batch], Batch]] = []
    if cfg.augment:
        steps.append(paper(cfg.seed))
    if cfg.dihedral:
        steps.append(dihedral)
    if cfg.stain_jitter > 0:
        steps.append(lambda x: stain(x, cfg.stain_jitter))
    if cfg.color_jitter > 0:
        steps.append(color(cfg.color_jitter, cfg.seed))
    if not steps:
        return None

    def run(x: Batch) -> Batch:
        for step in steps:
            x = step(x)
        return tf.clip_by_value(x, 0.0, 255.0)

    return run
