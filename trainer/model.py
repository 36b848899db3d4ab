"""The network: raw RGB 0..255 -> MobileNetV2's own scaling to [-1, 1] -> MobileNetV2 base -> small head.

The scaling is a layer of the saved model, so training, `histod evaluate`, `histod predict` and the service all
feed the same raw pixels and cannot disagree. Augmentation is NOT part of the model (see trainer.fit).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from histod.errors import ConfigError, ModelError
from histod.trainer.config import TrainConfig

BASE_NAME = "mobilenetv2_base"
OUTPUT_LAYER = "p_malignant"
POOL_LAYER = "pool"  # the pooled base features: the head's input
HEAD_BN_LAYER = "head_bn"
HEAD_LAYERS = (POOL_LAYER, HEAD_BN_LAYER, "head_dropout", OUTPUT_LAYER)


def build_base(cfg: TrainConfig) -> Any:
    """MobileNetV2 without its classifier, with ImageNet weights, no weights, or an .h5 file of base weights."""
    import keras

    shape = (cfg.image_size, cfg.image_size, 3)
    path = cfg.weights_path
    if path is not None and not path.is_file():
        raise ConfigError(f"--weights {path}: no such file")
    try:
        base = keras.applications.MobileNetV2(
            input_shape=shape,
            alpha=cfg.alpha,
            include_top=False,
            weights="imagenet" if cfg.weights == "imagenet" else None,
            name=BASE_NAME,
        )
    except ValueError as exc:  # unsupported alpha or input size for ImageNet weights, and the like
        raise ConfigError(f"cannot build MobileNetV2 (alpha {cfg.alpha}, weights {cfg.weights}): {exc}") from exc
    except Exception as exc:  # keras.utils.get_file raises a bare Exception when it cannot download (offline)
        raise ConfigError(
            f"cannot fetch ImageNet weights for MobileNetV2 alpha {cfg.alpha} ({exc}); "
            "pass --weights PATH to a local .h5 file of base weights, or --weights none"
        ) from exc
    if path is not None:
        try:
            base.load_weights(str(path))
        except Exception as exc:  # h5py/keras raise many types for a wrong file
            raise ConfigError(
                f"--weights {path} does not fit MobileNetV2 alpha {cfg.alpha} without top: {exc}"
            ) from exc
    return base


def build_model(cfg: TrainConfig) -> Any:
    """The full keras.Model: (N, S, S, 3) float32 in 0..255 -> (N, 1) p(malignant)."""
    import keras

    base = build_base(cfg)
    inputs = keras.Input(shape=(cfg.image_size, cfg.image_size, 3), dtype="float32", name="rgb_0_255")
    if cfg.scaling == "unit":  # the paper's pixels / 255: not the [-1, 1] range MobileNetV2 was trained on
        x = keras.layers.Rescaling(1 / 255.0, name="divide_by_255")(inputs)
    else:
        x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="mobilenet_v2_scaling")(inputs)
    if cfg.weights == "none":
        # a randomly initialised base has no statistics worth keeping: its BatchNorm layers must learn them, and
        # quickly (MobileNetV2's momentum 0.999 would need thousands of steps before inference mode is usable)
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
        x = base(x)
    else:
        # training=False: the pretrained base's BatchNorm layers stay in inference mode, so small batches cannot
        # wreck the ImageNet statistics (the Keras transfer-learning guide). Keras 3 lets fit's training=True
        # override this, so unfreeze_top also keeps those layers frozen.
        x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name=POOL_LAYER)(x)
    x = keras.layers.BatchNormalization(name=HEAD_BN_LAYER)(x)
    x = keras.layers.Dropout(cfg.dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name=OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name="histod_mobilenetv2")


def calibrate_batchnorm(model: Any, images: Any) -> None:
    """Data-dependent start for a randomly initialised base: set every BatchNorm's moving statistics to those of
    ``images`` (one forward pass with momentum 0), so that the base in inference mode gives usable features
    instead of activations that shrink to nothing through 150 layers. Only for ``weights none``."""
    import keras

    layers = [layer for layer in base_of(model).layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        base_of(model).trainable = True
        model(keras.ops.convert_to_tensor(images, dtype="float32"), training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum


def head_features(model: Any) -> Any:
    """The model up to the pooled base features (the head BatchNorm's input), sharing its layers and weights."""
    import keras

    return keras.Model(model.input, model.get_layer(POOL_LAYER).output)


def recalibrate_head_bn(model: Any, images: Any, features: Any = None, batch_size: int = 64) -> None:
    """Set the head BatchNorm's moving mean and variance to those of the pooled base features of ``images`` under
    the model's current weights (inference mode, nothing else touched). Weights that were not trained in this
    state, such as a moving average of them, need this: the moving statistics were gathered under the raw
    weights, and through a base that has moved they are off (SWA's "update BN", Izmailov et al. 2018). Pass
    ``features`` (head_features(model)) when calling this often: each new keras.Model traces predict again."""
    features = head_features(model) if features is None else features
    f = np.asarray(features.predict(images, batch_size=batch_size, verbose=0), dtype=np.float64)
    bn = model.get_layer(HEAD_BN_LAYER)
    bn.moving_mean.assign(f.mean(axis=0).astype(np.float32))
    bn.moving_variance.assign(f.var(axis=0).astype(np.float32))


def base_of(model: Any) -> Any:
    return model.get_layer(BASE_NAME)


def freeze_base(model: Any) -> None:
    """Phase 1: only the head learns."""
    base_of(model).trainable = False


def unfreeze_top(model: Any, n_layers: int, *, freeze_batchnorm: bool = True) -> None:
    """Phase 2: the last ``n_layers`` layers of the base learn too.

    With ``freeze_batchnorm`` (pretrained weights) the base's BatchNormalization layers stay frozen, and a frozen
    BatchNormalization layer runs in inference mode. This is needed on top of ``base(x, training=False)``:
    Keras 3's Functional model passes the outer ``training=True`` of ``fit`` down to every layer, overriding the
    ``training=False`` given when the graph was built.
    """
    import keras

    base = base_of(model)
    base.trainable = True
    cut = max(0, len(base.layers) - n_layers)
    for i, layer in enumerate(base.layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = i >= cut and not (freeze_batchnorm and is_bn)


def load_keras(path: Any) -> Any:
    import keras

    try:
        return keras.models.load_model(path)
    except Exception as exc:
        raise ModelError(f"cannot load the Keras model {path}: {exc}") from exc
