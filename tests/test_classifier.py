"""The served classifier, both engines, on the real tiny RUN_DIR of tests/conftest.py (``tiny_run_dir``, read-only:
copied before any change): LiteRT (no TensorFlow) against Keras, batch sizes, TTA, sha256 and file checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from histod.daemon.classifier import Classifier, KerasClassifier, LiteRTClassifier, load_classifier
from histod.errors import ConfigError, ModelError
from histod.litert import MAX_CHUNK
from histod.runs import KERAS_FILE, MODEL_INFO, TFLITE_FILE, load_run

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def litert(tiny_run_dir: Path) -> Classifier:
    return load_classifier(tiny_run_dir, "litert", threads=1)


@pytest.fixture(scope="module")
def keras_engine(tiny_run_dir: Path) -> Classifier:
    return load_classifier(tiny_run_dir, "keras")


def images(n: int, size: int, seed: int = 0) -> NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def copy_run(tiny_run_dir: Path, dest: Path, **changes: object) -> Path:
    shutil.copytree(tiny_run_dir, dest)
    info = json.loads((dest / MODEL_INFO).read_text())
    info.update(changes)
    (dest / MODEL_INFO).write_text(json.dumps(info))
    return dest


def test_engine_attributes(litert: Classifier, tiny_run_dir: Path) -> None:
    run = load_run(tiny_run_dir)
    assert isinstance(litert, LiteRTClassifier)
    assert litert.name == "litert"
    assert litert.image_size == run.image_size
    assert litert.threshold == run.threshold
    assert litert.run == run
    assert litert.sha256 == run.tflite_sha256
    assert litert.model_path == tiny_run_dir / TFLITE_FILE


def test_litert_matches_keras(litert: Classifier, keras_engine: Classifier) -> None:
    assert isinstance(keras_engine, KerasClassifier)
    assert keras_engine.sha256 == keras_engine.run.keras_sha256
    batch = images(6, litert.image_size)
    p_lite, p_keras = litert.predict(batch), keras_engine.predict(batch)
    assert p_lite.shape == p_keras.shape == (6,)
    assert p_lite.dtype == p_keras.dtype == np.float32
    assert float(np.max(np.abs(p_lite - p_keras))) <= 1e-4
    assert np.all((p_lite >= 0) & (p_lite <= 1))


def test_batch_size_changes(litert: Classifier) -> None:
    batch = images(MAX_CHUNK + 5, litert.image_size, seed=1)
    whole = litert.predict(batch)
    assert whole.shape == (MAX_CHUNK + 5,)
    for n in (1, 3, 1, 7, 3):
        np.testing.assert_allclose(litert.predict(batch[:n]), whole[:n], atol=1e-6)
    assert litert.predict(batch[:0]).shape == (0,)


def test_float_input_in_0_255_is_accepted(litert: Classifier) -> None:
    batch = images(2, litert.image_size, seed=2)
    np.testing.assert_allclose(litert.predict(batch.astype(np.float32)), litert.predict(batch), atol=1e-6)


def test_wrong_shape_is_refused(litert: Classifier) -> None:
    s = litert.image_size
    for bad in (np.zeros((s, s, 3), np.uint8), np.zeros((1, s + 1, s, 3), np.uint8), np.zeros((1, s, s, 4), np.uint8)):
        with pytest.raises(ValueError, match="expected a batch"):
            litert.predict(bad)


@pytest.mark.parametrize("kind", ["litert", "keras"])
def test_tta_averages_over_horizontal_flip(
    tiny_run_dir: Path, tmp_path: Path, kind: str, litert: Classifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = load_classifier(copy_run(tiny_run_dir, tmp_path / "tta", tta=True), kind)  # type: ignore[arg-type]
    assert engine.run.tta
    batch = images(3, engine.image_size, seed=3)
    seen: list[NDArray[np.float32]] = []
    infer = engine._infer

    def spy(x: NDArray[np.float32]) -> NDArray[np.float32]:
        seen.append(x.copy())
        return infer(x)

    monkeypatch.setattr(engine, "_infer", spy)
    p = engine.predict(batch)
    given = np.concatenate(seen)
    assert given.shape[0] == 6, "the image and its flip, in one call"
    np.testing.assert_array_equal(given[:3], batch)
    np.testing.assert_array_equal(given[3:], batch[:, :, ::-1, :])  # flipped left-right
    expected = (litert.predict(batch) + litert.predict(np.ascontiguousarray(batch[:, :, ::-1, :]))) / 2
    np.testing.assert_allclose(p, expected, atol=1e-4)


@pytest.mark.parametrize(("kind", "file"), [("litert", TFLITE_FILE), ("keras", KERAS_FILE)])
def test_sha_mismatch_is_a_model_error(tiny_run_dir: Path, tmp_path: Path, kind: str, file: str) -> None:
    copied = copy_run(tiny_run_dir, tmp_path / "tampered")
    with (copied / file).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        load_classifier(copied, kind)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "file"), [("litert", TFLITE_FILE), ("keras", KERAS_FILE)])
def test_missing_model_file_is_a_model_error(tiny_run_dir: Path, tmp_path: Path, kind: str, file: str) -> None:
    copied = copy_run(tiny_run_dir, tmp_path / "incomplete")
    (copied / file).unlink()
    with pytest.raises(ModelError, match="missing"):
        load_classifier(copied, kind)  # type: ignore[arg-type]


def test_missing_run_dir_and_model_json(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_classifier(tmp_path / "nowhere")
    with pytest.raises(ModelError, match=MODEL_INFO):
        load_classifier(tmp_path)


def test_image_size_disagreeing_with_model_json(tiny_run_dir: Path, tmp_path: Path) -> None:
    copied = copy_run(tiny_run_dir, tmp_path / "resized", image_size=load_run(tiny_run_dir).image_size * 2)
    with pytest.raises(ModelError, match="image_size"):
        load_classifier(copied)


def test_unknown_kind(tiny_run_dir: Path) -> None:
    with pytest.raises(ConfigError):
        load_classifier(tiny_run_dir, "onnx")  # type: ignore[arg-type]


def test_litert_never_imports_tensorflow(tiny_run_dir: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "import histod.daemon.classifier as e\n"
        f"engine = e.load_classifier(Path({str(tiny_run_dir)!r}))\n"
        "s = engine.image_size\n"
        "p = engine.predict(np.zeros((2, s, s, 3), np.uint8))\n"
        "assert p.shape == (2,), p.shape\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))\n"
        "assert not bad, bad[:5]\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
