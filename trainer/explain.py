"""Grad-CAM (Selvaraju et al., 2017) for the histod network: where in the image the last convolutional
features pushed the call.

The model is ``input -> Rescaling -> MobileNetV2 base (a nested Functional model) -> pool -> BN -> dropout ->
Dense(sigmoid)``. The base's output is its last convolutional activation (``out_relu``, 1/32 of the input
size), so the grad model is split there, as in the Keras Grad-CAM example: the layers before the base and the
base give the feature map, the head layers after it give p; the tape watches the feature map. Imports
TensorFlow: use from `histod explain` and the trainer only, never from the service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from histod.errors import ModelError
from histod.trainer.model import BASE_NAME

ALPHA = 0.45
"""weight of the heat map over the image"""


def gradcam(model: Any, image: NDArray[np.uint8], *, target: str = "malignant") -> tuple[NDArray[np.float32], float]:
    """The Grad-CAM map of ``image`` (S, S, 3 uint8, the model's input size) in [0, 1] at the feature map's
    resolution, and p(malignant). ``target`` "malignant" explains p, "benign" explains 1 - p."""
    import tensorflow as tf

    names = [layer.name for layer in model.layers]
    if BASE_NAME not in names:
        raise ModelError(f"the model has no layer {BASE_NAME!r}: not a histod MobileNetV2 model")
    cut = names.index(BASE_NAME)
    before = [layer for layer in model.layers[1:cut] if not isinstance(layer, tf.keras.layers.InputLayer)]
    base = model.layers[cut]
    head = model.layers[cut + 1 :]
    x = tf.convert_to_tensor(image[None].astype(np.float32))
    for layer in before:
        x = layer(x, training=False)
    with tf.GradientTape() as tape:
        features = base(x, training=False)
        tape.watch(features)
        y = features
        for layer in head:
            y = layer(y, training=False)
        p = y[:, 0]
        score = p if target == "malignant" else 1.0 - p
    grads = tape.gradient(score, features)
    if grads is None:  # pragma: no cover - every layer of this model is differentiable
        raise ModelError("no gradient reaches the last convolutional layer")
    weights = tf.reduce_mean(grads, axis=(1, 2))  # (1, C): how much each channel moves the score
    cam = tf.nn.relu(tf.reduce_sum(features * weights[:, None, None, :], axis=-1))[0].numpy()
    peak = float(cam.max())
    heat = (cam / peak) if peak > 0 else np.zeros_like(cam)
    return heat.astype(np.float32), float(p.numpy()[0])


def jet(values: NDArray[np.float32]) -> NDArray[np.uint8]:
    """The classic jet colour map (blue 0 -> red 1), RGB uint8."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    channels = np.concatenate([1.5 - np.abs(4 * v - 3), 1.5 - np.abs(4 * v - 2), 1.5 - np.abs(4 * v - 1)], axis=-1)
    out: NDArray[np.uint8] = (np.clip(channels, 0.0, 1.0) * 255).astype(np.uint8)
    return out


def overlay(image: NDArray[np.uint8], heat: NDArray[np.float32], *, min_size: int = 256) -> Image.Image:
    """Two panels side by side: the image, and the heat map resized to it and blended over it. Both are scaled
    up (keeping the aspect) so the shorter side is at least ``min_size`` pixels: (2 * width, height)."""
    height, width = image.shape[:2]
    scale = max(1.0, min_size / min(height, width))
    size = (round(width * scale), round(height * scale))
    base = Image.fromarray(image, "RGB").resize(size, Image.Resampling.BICUBIC)
    heat_img = Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8), "L").resize(size, Image.Resampling.BICUBIC)
    coloured = Image.fromarray(jet(np.asarray(heat_img, dtype=np.float32) / 255.0), "RGB")
    sheet = Image.new("RGB", (2 * size[0], size[1]))
    sheet.paste(base, (0, 0))
    sheet.paste(Image.blend(base, coloured, ALPHA), (size[0], 0))
    return sheet


def explain_file(
    run_dir: Path,
    image_path: Path,
    out: Path,
    *,
    target: str = "malignant",
    expected_sha256: str | None = None,
    min_size: int = 256,
) -> tuple[Path, float, tuple[int, int], list[str]]:
    """Grad-CAM of ``image_path`` under ``run_dir/model.keras``, written as PNG to ``out`` (the image | the map
    over it). The image is explained as one tile: the whole image through the service's own decode
    (histod.imaging) at the model's input size, which is how the service classifies every file.
    With ``expected_sha256`` (the served model's, from the models table) the run directory must still be that
    run: its model.json names that sha256 and model.keras hashes to the keras_sha256 recorded beside it.
    Returns the PNG path, p(malignant), the PNG's (width, height) and warnings: the scale warnings of
    histod.slides.plan, and ``larger_than_tile`` for an image much larger than the model's training tiles (the
    map then explains a call on the image squashed to the input, not its tissue at the model's scale)."""
    from histod import readers, slides, tiling
    from histod.imaging import read_file
    from histod.runs import KERAS_FILE, load_run, sha256_file
    from histod.trainer.model import load_keras

    info = load_run(run_dir)
    keras_path = run_dir / KERAS_FILE
    if expected_sha256 is not None:
        if expected_sha256 not in (info.tflite_sha256, info.keras_sha256):
            raise ModelError(f"{run_dir} no longer holds the model {expected_sha256[:12]}... that made this call")
        if not keras_path.is_file() or sha256_file(keras_path) != info.keras_sha256:
            raise ModelError(f"{keras_path} is missing or differs from the keras_sha256 in {run_dir}/model.json")
    reader = readers.ImageReader(read_file(image_path), str(image_path))
    tiles, warnings = slides.plan(reader, tiling.Scale.of(info))
    if tiles is not None:
        warnings.append(
            f"larger_than_tile: the image ({reader.longest_side()} px on its longer side) spans about "
            f"{len(tiles.grid)} of the model's {info.tile_px} px training tiles; the recorded call and this map are "
            f"of the whole image resized to {info.image_size}x{info.image_size} (`histod predict --heatmap DIR` "
            "classifies it tile by tile)"
        )
    model = load_keras(keras_path)
    heat, p = gradcam(model, reader.whole(info.image_size), target=target)
    picture = overlay(reader.image, heat, min_size=min_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, format="PNG")
    return out, p, picture.size, warnings
