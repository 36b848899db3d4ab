"""trainer.model and trainer.export: preprocessing inside the model, base weights from files, LiteRT parity."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from histod.errors import ConfigError
from histod.trainer.config import TrainConfig
from histod.trainer.export import check_parity


def _cfg(tmp_path: Path, **kw: object) -> TrainConfig:
    values: dict[str, object] = {
        "data_dir": tmp_path,
        "out": tmp_path / "run",
        "weights": "none",
        "alpha": 0.35,
        "image_size": 32,
    }
    values.update(kw)
    return TrainConfig.model_validate(values)


def test_scaling_to_minus_one_one_is_inside_the_model(tmp_path: Path) -> None:
    import keras

    from histod.trainer.model import build_model

    model = build_model(_cfg(tmp_path))
    scaling = model.get_layer("mobilenet_v2_scaling")
    probe = keras.Model(model.input, scaling.output)
    x = np.zeros((1, 32, 32, 3), dtype=np.float32)
    x[0, 0, 0] = [0.0, 127.5, 255.0]
    out = np.asarray(probe(x))
    assert out[0, 0, 0] == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert out.min() >= -1.0
    assert out.max() <= 1.0
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 1)


def test_the_saved_model_takes_raw_pixels(tiny_run_dir: Path) -> None:
    import keras

    model = keras.models.load_model(tiny_run_dir / "model.keras", compile=False)
    types = [type(layer).__name__ for layer in model.layers]
    assert types[:3] == ["InputLayer", "Rescaling", "Functional"]
    scaling = model.get_layer("mobilenet_v2_scaling")
    assert float(scaling.scale) == pytest.approx(1 / 127.5)
    assert float(scaling.offset) == pytest.approx(-1.0)
    assert [layer.name for layer in model.layers[-4:]] == ["pool", "head_bn", "head_dropout", "p_malignant"]


@pytest.mark.parametrize("freeze_batchnorm", [True, False])
def test_unfreeze_top_unfreezes_the_last_layers(tmp_path: Path, freeze_batchnorm: bool) -> None:
    import keras

    from histod.trainer.model import base_of, build_model, freeze_base, unfreeze_top

    model = build_model(_cfg(tmp_path))
    freeze_base(model)
    assert not base_of(model).trainable
    unfreeze_top(model, 30, freeze_batchnorm=freeze_batchnorm)
    layers = base_of(model).layers
    is_bn = [isinstance(layer, keras.layers.BatchNormalization) for layer in layers]
    expected = [i >= len(layers) - 30 and not (freeze_batchnorm and is_bn[i]) for i in range(len(layers))]
    assert [layer.trainable for layer in layers] == expected
    assert 10 < sum(expected) <= 30


def test_fine_tuning_keeps_the_pretrained_batchnorm_in_inference_mode(tmp_path: Path) -> None:
    """fit() calls the model with training=True; the base's BatchNorm must still use its stored statistics."""
    import keras

    from histod.trainer.model import build_base, build_model, unfreeze_top

    weights = tmp_path / "pretrained.weights.h5"  # any .h5 takes the pretrained path: base(x, training=False)
    build_base(_cfg(tmp_path, image_size=48)).save_weights(weights)
    model = build_model(_cfg(tmp_path, image_size=48, dropout=0.0, weights=str(weights)))
    features = keras.Model(model.input, model.get_layer("pool").output)
    x = np.random.default_rng(0).uniform(0, 255, (4, 48, 48, 3)).astype(np.float32)
    unfreeze_top(model, 30, freeze_batchnorm=True)
    np.testing.assert_allclose(features(x, training=True), features(x, training=False), atol=1e-5)
    unfreeze_top(model, 30, freeze_batchnorm=False)  # the trap this guards against: batch statistics leak in
    assert np.max(np.abs(np.asarray(features(x, training=True)) - np.asarray(features(x, training=False)))) > 1e-3


def test_base_weights_from_an_h5_file(tmp_path: Path) -> None:
    from histod.trainer.model import base_of, build_base, build_model

    source = build_base(_cfg(tmp_path, seed=1))
    path = tmp_path / "base.weights.h5"
    source.save_weights(path)
    model = build_model(_cfg(tmp_path, weights=str(path)))
    for a, b in zip(source.get_weights(), base_of(model).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore:Skipping nested container")  # Keras warns before it fails on the mismatch
def test_weights_that_do_not_fit_are_a_config_error(tmp_path: Path) -> None:
    from histod.trainer.model import build_base, build_model

    path = tmp_path / "base.weights.h5"
    build_base(_cfg(tmp_path)).save_weights(path)
    with pytest.raises(ConfigError, match=r"does not fit MobileNetV2 alpha 0\.5"):
        build_model(_cfg(tmp_path, weights=str(path), alpha=0.5))
    with pytest.raises(ConfigError, match="no such file"):
        build_model(_cfg(tmp_path, weights=str(tmp_path / "missing.h5")))


def test_defaults_are_the_measured_recipe(tmp_path: Path) -> None:
    cfg = TrainConfig(data_dir=tmp_path, out=tmp_path / "run")
    assert (cfg.image_size, cfg.alpha, cfg.batch_size, cfg.weights) == (128, 0.35, 8, "imagenet")
    assert (cfg.head_epochs, cfg.epochs, cfg.learning_rate, cfg.fine_tune_layers) == (3, 30, 1e-4, 155)
    assert (cfg.ema, cfg.calibrate, cfg.dihedral, cfg.tta) == (0.999, True, True, 1)
    assert (cfg.dropout, cfg.val_split, cfg.patience, cfg.lr_patience, cfg.lr_factor) == (0.4, 0.2, 5, 3, 0.5)
    assert (cfg.scaling, cfg.freeze_batchnorm, cfg.split_by, cfg.threshold) == ("mobilenet", True, "patient", None)
    assert cfg.class_weights
    assert cfg.augment


def test_augmentation_touches_the_training_split_only(tmp_path: Path) -> None:
    from histod.synthetic import tile
    from histod.trainer.fit import datasets

    rng = np.random.default_rng(0)
    x = np.stack([tile(i % 2 == 1, 32, rng) for i in range(8)])
    y = np.array([i % 2 for i in range(8)], dtype=np.int64)
    cfg = _cfg(tmp_path, batch_size=8, seed=3)
    train, val = datasets(cfg, x, y, x, y, groups=[str(i) for i in range(8)])
    (xv, yv), (xt, yt) = next(iter(val)), next(iter(train))
    np.testing.assert_array_equal(np.asarray(xv), x.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(yv), y)
    xt = np.asarray(xt)
    assert xt.shape == x.shape
    assert xt.dtype == np.float32
    assert 0.0 <= xt.min() <= xt.max() <= 255.0
    order = np.argsort(np.asarray(yt), kind="stable")  # shuffled: compare as sets of images per class
    assert sorted(np.asarray(yt)[order].tolist()) == sorted(y.tolist())
    assert not any(np.array_equal(xt[i], x[j].astype(np.float32)) for i in range(8) for j in range(8))


def test_imagenet_weights_offline_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import keras

    from histod.trainer.model import build_model

    def offline(**kwargs: object) -> None:
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: Name or service not known")

    monkeypatch.setattr(keras.applications, "MobileNetV2", offline)
    with pytest.raises(ConfigError, match=r"cannot fetch ImageNet weights.*--weights PATH"):
        build_model(_cfg(tmp_path, weights="imagenet"))


def test_weights_must_be_imagenet_none_or_h5(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="imagenet"):
        _cfg(tmp_path, weights="resnet")


# --- export ------------------------------------------------------------------------------------------------------


def test_parity_compares_p_and_the_labels_a_user_sees() -> None:
    k = np.array([0.1, 0.5, 0.9, 0.3], dtype=np.float32)
    same = check_parity(k, k + 2e-4, threshold=0.4)  # float32 rounding: well inside the tolerance
    assert same.passed and same.labels_disagreeing == 0 and same.images == 4
    assert same.max_abs_diff == pytest.approx(2e-4, rel=1e-3) and same.p99_abs_diff <= same.max_abs_diff
    # a label flips for an image within the tolerance of the threshold: rounding decides there, still a pass
    near = check_parity(np.array([0.3995]), np.array([0.4010]), threshold=0.4)
    assert near.passed and near.labels_disagreeing == 1 and near.labels_disagreeing_beyond_tolerance == 0
    # a conversion fault moves p by far more, and labels far from the threshold
    broken = check_parity(k, k + np.array([0, 0, 0, 0.2], dtype=np.float32), threshold=0.4)
    assert not broken.passed and broken.labels_disagreeing == 1 and broken.labels_disagreeing_beyond_tolerance == 1
    assert "0.2 > 0.002 on 4 validation images; 1 labels differ at threshold 0.4" in broken.problem()
    assert not check_parity(k, np.array([0.1, np.nan, 0.9, 0.3]), threshold=0.4).passed
    assert not check_parity(k, k[:2], threshold=0.4).passed
    # a folded Platt scale s magnifies rounding s-fold, and the allowance with it; never below the tolerance
    wide = check_parity(k, k + 5e-3, threshold=0.4, calibration_scale=4.0)
    assert wide.passed and wide.tolerance == pytest.approx(8e-3)
    assert not check_parity(k, k + 5e-3, threshold=0.4, calibration_scale=0.5).passed
    assert not check_parity(k, k + 1e-7, threshold=0.4, tolerance=0.0).passed


def test_litert_matches_keras_at_any_batch_size(tiny_run_dir: Path, synthetic_dataset: Path) -> None:
    import keras

    from histod import imaging
    from histod.litert import LiteRTModel

    files = (
        sorted((synthetic_dataset / "benign").glob("*.png"))[:4]
        + sorted((synthetic_dataset / "malignant").glob("*.png"))[:4]
    )
    images = np.stack([imaging.load(f, 48) for f in files])
    model = keras.models.load_model(tiny_run_dir / "model.keras", compile=False)
    expected = np.asarray(model(images.astype(np.float32), training=False)).reshape(-1)
    for chunk in (1, 3, 8):
        lite = LiteRTModel(tiny_run_dir / "model.tflite", threads=1, max_chunk=chunk)
        assert lite.image_size == 48
        got = lite.predict(images)
        assert np.max(np.abs(got - expected)) <= 1e-4
    assert np.ptp(expected) > 1e-3  # the model really responds to its input: the comparison means something


def test_tflite_has_a_dynamic_batch_dimension(tiny_run_dir: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=os.fspath(tiny_run_dir / "model.tflite"))
    detail = interp.get_input_details()[0]
    assert list(detail["shape_signature"]) == [-1, 48, 48, 3]
    assert np.dtype(detail["dtype"]) == np.float32
