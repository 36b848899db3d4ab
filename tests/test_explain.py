"""`histod explain`: Grad-CAM of the image behind a recorded result, from the real tiny run's Keras model."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from histod.cli import cli
from histod.db import queries
from histod.db.models import Move, Result
from histod.db.session import open_database, transaction
from histod.imaging import decode
from histod.runs import load_run, sha256_file
from histod.synthetic import write_images

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _served(tmp_path: Path, run_dir: Path, *, size: int = 64) -> tuple[str, Path, int]:
    """A database with one classified result whose image was moved to processed/."""
    url = f"sqlite:///{tmp_path / 'histod.db'}"
    (image,) = write_images(tmp_path / "watch", 1, size=size, seed=3)
    stored = tmp_path / "processed" / image.name
    stored.parent.mkdir()
    factory = open_database(url)
    info = load_run(run_dir)
    with transaction(factory) as s:
        model = queries.register_model(
            s,
            sha256=info.tflite_sha256,
            run_id=info.run_id,
            run_path=str(run_dir),
            engine="litert",
            image_size=info.image_size,
            threshold=info.threshold,
            metrics={},
        )
        (row,) = queries.record_results(
            s,
            [
                Result(
                    original_path=str(image),
                    name=image.name,
                    sha256=sha256_file(image),
                    size_bytes=image.stat().st_size,
                    received_at=T0,
                    classified_at=T0,
                    latency_ms=1.0,
                    status="classified",
                    label="Malignant",
                    p_malignant=0.9,
                    threshold=info.threshold,
                    model_id=model.id,
                    model_sha256=model.sha256,
                    host="test",
                    stored_path=str(stored),
                )
            ],
        )
    shutil.move(image, stored)
    with transaction(factory) as s:
        queries.record_moves(s, [Move(result_id=row.id, ok=True, path=str(stored))])
    return url, stored, row.id


def test_explain_writes_the_image_and_its_heat_map_side_by_side(tmp_path: Path, tiny_run_dir: Path) -> None:
    url, stored, result_id = _served(tmp_path, tiny_run_dir, size=64)
    out = tmp_path / "out" / "cam.png"
    got = CliRunner().invoke(cli, ["explain", str(result_id), "--png", str(out), "--db", url])
    assert got.exit_code == 0, got.output
    assert f"of result {result_id} ({stored}) as one tile at the model's 48 px input" in got.output
    assert "512x256 px" in got.output and "warning:" not in got.output
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (512, 256) and png.mode == "RGB"
        pixels = np.asarray(png, dtype=np.int16)
    left, right = pixels[:, :256], pixels[:, 256:]
    original = np.asarray(Image.open(stored).convert("RGB").resize((256, 256), Image.Resampling.BICUBIC))
    assert np.abs(left - original).mean() < 1.0  # the left panel is the image itself
    assert np.abs(right - left).mean() > 5.0  # the right one has the map blended over it


def test_explain_says_when_the_image_is_much_larger_than_the_models_tiles(tmp_path: Path, tiny_run_dir: Path) -> None:
    url, stored, result_id = _served(tmp_path, tiny_run_dir, size=256)  # 4 x 4 of the run's 64 px training tiles
    got = CliRunner().invoke(cli, ["explain", str(result_id), "--png", str(tmp_path / "cam.png"), "--db", url])
    assert got.exit_code == 0, got.output
    assert f"warning: {stored}: larger_than_tile: the image (256 px on its longer side) spans about 16 " in got.stderr
    assert "of the whole image resized to 48x48" in got.stderr and "histod predict --heatmap" in got.stderr
    assert "as one tile at the model's 48 px input" in got.stdout


def test_gradcam_maps_the_last_conv_features_and_reproduces_p(tiny_run_dir: Path, tmp_path: Path) -> None:
    from histod.trainer.explain import gradcam
    from histod.trainer.model import load_keras

    info = load_run(tiny_run_dir)
    model = load_keras(tiny_run_dir / "model.keras")
    (image,) = write_images(tmp_path, 1, size=info.image_size, seed=5)
    pixels = decode(image.read_bytes(), info.image_size)
    heat, p = gradcam(model, pixels)
    side = -(-info.image_size // 32)  # MobileNetV2's last feature map is 1/32 of the input, rounded up
    assert heat.shape == (side, side)
    assert heat.dtype == np.float32 and heat.min() >= 0.0 and heat.max() <= 1.0
    expected = float(model.predict(pixels[None].astype(np.float32), verbose=0)[0, 0])
    assert p == pytest.approx(expected, abs=1e-5)


def test_explain_refuses_an_image_that_is_not_the_one_recorded(tmp_path: Path, tiny_run_dir: Path) -> None:
    url, stored, result_id = _served(tmp_path, tiny_run_dir)
    stored.write_bytes(stored.read_bytes() + b"\0")
    got = CliRunner().invoke(cli, ["explain", str(result_id), "--png", str(tmp_path / "x.png"), "--db", url])
    assert got.exit_code == 2
    assert "sha256 differs from the record" in got.output
    assert not (tmp_path / "x.png").exists()
    got = CliRunner().invoke(cli, ["explain", "99", "--db", url])
    assert got.exit_code == 2 and "there is no result 99" in got.output
