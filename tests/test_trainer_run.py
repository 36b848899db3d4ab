"""The tiny session run directory honours the RUN_DIR contract (histod.runs)."""

from __future__ import annotations

import json
from pathlib import Path

from histod.runs import load_run, sha256_file


def test_tiny_run_dir_is_a_complete_run(tiny_run_dir: Path) -> None:
    for name in ("model.keras", "model.tflite", "model.json", "metrics.json", "config.json"):
        assert (tiny_run_dir / name).is_file(), name
    info = load_run(tiny_run_dir)
    assert info.image_size == 48
    assert 0.0 <= info.threshold <= 1.0
    assert info.keras_sha256 == sha256_file(tiny_run_dir / "model.keras")
    assert info.tflite_sha256 == sha256_file(tiny_run_dir / "model.tflite")
    config = json.loads((tiny_run_dir / "config.json").read_text())
    assert config["alpha"] == 0.35
    assert config["weights"] == "none"
