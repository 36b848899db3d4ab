"""Synthetic H&E-like tiles, for `histod demo`, the tests and the benchmarks' fallback when ../shared is absent.

Benign tiles are pink stroma with few small, regular nuclei; malignant tiles are crowded with large,
dark, irregular nuclei. A small CNN separates them in an epoch or two, so a pipeline that learns nothing
shows up as chance-level metrics. File names follow the IDC pattern (``<patient>_idx5_x.._y.._class<k>``)
so that the patient-grouped split has real groups to keep apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class SyntheticSpec:
    patients: int = 12
    tiles_per_patient: int = 10
    size: int = 64
    malignant_share: float = 0.4
    seed: int = 0


def tile(malignant: bool, size: int, rng: np.random.Generator) -> NDArray[np.uint8]:
    """One RGB tile, uint8 (size, size, 3)."""
    base = np.array([236, 180, 205], dtype=np.float64) + rng.normal(0, 8, 3)
    noise = rng.normal(0, 10, (size, size, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    count = int(rng.integers(14, 22) if malignant else rng.integers(2, 6))
    scale = size / 64
    for _ in range(count):
        r = (rng.uniform(4, 8) if malignant else rng.uniform(1.5, 3)) * scale
        x, y = rng.uniform(0, size, 2)
        stretch = rng.uniform(0.6, 1.4) if malignant else 1.0
        colour = (int(rng.integers(60, 100)), int(rng.integers(20, 50)), int(rng.integers(110, 150)))
        draw.ellipse((x - r * stretch, y - r / stretch, x + r * stretch, y + r / stretch), fill=colour)
    return np.asarray(img, dtype=np.uint8)


def make_dataset(root: Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write ``root/benign`` and ``root/malignant`` PNG tiles from ``spec.patients`` patients; return root."""
    rng = np.random.default_rng(spec.seed)
    for label in ("benign", "malignant"):
        (root / label).mkdir(parents=True, exist_ok=True)
    for patient in range(spec.patients):
        pid = 10000 + patient
        for k in range(spec.tiles_per_patient):
            malignant = bool(rng.random() < spec.malignant_share)
            # every patient gets at least one tile of each class when it has two or more tiles
            if spec.tiles_per_patient >= 2 and k < 2:
                malignant = k == 1
            label = "malignant" if malignant else "benign"
            name = f"{pid}_idx5_x{50 * k}_y{50 * patient}_class{int(malignant)}.png"
            Image.fromarray(tile(malignant, spec.size, rng)).save(root / label / name)
    return root


def write_images(folder: Path, count: int, *, size: int = 64, seed: int = 1, fmt: str = "png") -> list[Path]:
    """Write ``count`` unlabelled tiles (alternating classes) into ``folder``; return their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"tile_{seed}_{i:05d}.{fmt}"
        Image.fromarray(tile(i % 2 == 1, size, rng)).save(path)
        paths.append(path)
    return paths
