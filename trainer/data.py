"""Find the labelled images, group them by patient, split them, decode them. Small pure functions.

DATA_DIR holds ``benign/`` and ``malignant/`` (any letter case). A patient (or slide) id parsed from each file
name keeps all of one patient's images on the same side of the split; files without an id are their own group.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from histod import imaging
from histod.errors import ConfigError, DatasetError, ImageError
from histod.settings import IMAGE_EXTENSIONS

CLASS_DIRS: tuple[str, str] = ("benign", "malignant")  # label 0, label 1 (same order as histod.LABELS)

# Built-in patient-id patterns, tried in order on the file name.
BREAKHIS = re.compile(r"^SOB_[BM]_[A-Z]+-(?P<group>\d+-[0-9A-Za-z]+)-\d+-\d+", re.IGNORECASE)  # 14-22549AB
IDC = re.compile(r"^(?P<group>\d+)_idx\d+_x\d+_y\d+_class\d", re.IGNORECASE)  # 10253
DEFAULT_PATTERNS: tuple[re.Pattern[str], ...] = (BREAKHIS, IDC)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 benign, 1 malignant
    group: str


@dataclass(frozen=True)
class Split:
    train: list[Sample]
    val: list[Sample]


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def class_dirs(data_dir: Path) -> dict[int, Path]:
    """Map label -> class folder, matching ``benign``/``malignant`` in any letter case."""
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir} is not a folder")
    found: dict[int, Path] = {}
    for child in sorted(data_dir.iterdir()):
        name = child.name.lower()
        if child.is_dir() and name in CLASS_DIRS:
            label = CLASS_DIRS.index(name)
            if label in found:
                raise DatasetError(f"{data_dir} has two {name} folders: {found[label].name} and {child.name}")
            found[label] = child
    missing = [CLASS_DIRS[i] for i in range(2) if i not in found]
    if missing:
        raise DatasetError(
            f"{data_dir} must hold the class folders benign/ and malignant/ (any letter case); "
            f"missing: {', '.join(m + '/' for m in missing)}"
        )
    return found


def compile_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """Compile a user ``--group-pattern``; it must have a named group ``group``."""
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--group-pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    if "group" not in compiled.groupindex:
        raise ConfigError(f"--group-pattern {pattern!r} needs a named group, e.g. (?P<group>\\d+)")
    return compiled


def group_of(name: str, pattern: re.Pattern[str] | str | None = None) -> str | None:
    """The patient/slide id in a file name, or None. A given pattern replaces the built-in ones."""
    patterns: Sequence[re.Pattern[str]]
    if pattern is None:
        patterns = DEFAULT_PATTERNS
    else:
        compiled = compile_pattern(pattern) if isinstance(pattern, str) else pattern
        assert compiled is not None
        patterns = (compiled,)
    for p in patterns:
        m = p.search(name)
        if m and m.group("group"):
            return m.group("group")
    return None


def discover(data_dir: Path, group_pattern: str | None = None) -> list[Sample]:
    """Every image under the class folders (recursively), with its label and group, in a stable order."""
    pattern = compile_pattern(group_pattern)
    samples: list[Sample] = []
    for label, folder in sorted(class_dirs(data_dir).items()):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p))
        if not files:
            raise DatasetError(f"class folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}, any letter case)")
        for path in files:
            group = group_of(path.name, pattern)
            # a file without an id is its own group; the prefix keeps it apart from real ids
            samples.append(Sample(path, label, group if group is not None else f"file:{path.relative_to(data_dir)}"))
    return samples


def split(samples: Sequence[Sample], val_split: float, seed: int, by: str = "patient") -> Split:
    """Stratified by label AND grouped by patient: no group is ever on both sides.

    ``by="image"`` treats every file as its own group: the paper's image-level split, which puts tiles of one
    patient on both sides and so overstates accuracy (kept only to reproduce it, see ``--preset paper``).
    """
    train_idx, val_idx = folds(samples, max(2, round(1 / val_split)), seed, by)[0]
    train = [samples[i] for i in train_idx]
    val = [samples[i] for i in val_idx]
    check_sides(train, val)
    return Split(train=train, val=val)


def folds(
    samples: Sequence[Sample], n_splits: int, seed: int, by: str = "patient"
) -> list[tuple[NDArray[np.int64], NDArray[np.int64]]]:
    """``n_splits`` patient-grouped, label-stratified folds: (train indices, validation indices) for each."""
    from sklearn.model_selection import StratifiedGroupKFold

    if by not in ("patient", "image"):
        raise ConfigError(f"split by {by!r}: use patient or image")
    labels = np.array([s.label for s in samples])
    groups = np.array([s.group if by == "patient" else str(s.path) for s in samples])
    counts = np.bincount(labels, minlength=2)
    n_groups = len(set(groups.tolist()))
    share = f"{1 / n_splits:.0%} validation split"
    if len(samples) < 2 * n_splits or counts.min() < 2:
        raise DatasetError(
            f"too few images for a {share}: {counts[0]} benign, {counts[1]} malignant "
            f"(need at least 2 of each and {2 * n_splits} in all)"
        )
    if n_groups < n_splits:
        raise DatasetError(
            f"too few patients/groups for a {share}: {n_groups} groups, need {n_splits} "
            "(check --group-pattern, or lower --val-split)"
        )
    k_fold = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [
        (np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)) for a, b in k_fold.split(labels, labels, groups)
    ]


def check_sides(train: Sequence[Sample], val: Sequence[Sample]) -> None:
    """Both sides of a split must hold both classes."""
    for side, name in ((train, "training"), (val, "validation")):
        side_counts = np.bincount([s.label for s in side], minlength=2)
        if side_counts.min() == 0:
            raise DatasetError(
                f"the {name} split has no {CLASS_DIRS[int(side_counts.argmin())]} images: the classes are spread "
                "over too few patients for this split (add data or change --val-split)"
            )


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str
    message: str


def load_images(
    samples: Sequence[Sample],
    size: int,
    *,
    workers: int = 4,
    loader: Callable[[Path, int], NDArray[np.uint8]] | None = None,
) -> tuple[NDArray[np.uint8], NDArray[np.int64], list[Sample], list[Skipped]]:
    """Decode ``samples`` with histod.imaging.load into (N, size, size, 3) uint8 and labels (N,).

    Returns the images, the labels, the samples that loaded (same order) and the ones that did not.
    """
    load = loader or (lambda p, s: imaging.load(p, s))

    def one(sample: Sample) -> NDArray[np.uint8] | Skipped:
        try:
            return load(sample.path, size)
        except ImageError as exc:
            return Skipped(sample.path, exc.reason, str(exc.args[0]))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, samples))
    kept: list[Sample] = []
    skipped: list[Skipped] = []
    images = np.zeros((len(samples), size, size, 3), dtype=np.uint8)
    n = 0
    for sample, result in zip(samples, results, strict=True):
        if isinstance(result, Skipped):
            skipped.append(result)
            continue
        images[n] = result
        kept.append(sample)
        n += 1
    labels = np.array([s.label for s in kept], dtype=np.int64)
    return images[:n], labels, kept, skipped


def counts(samples: Sequence[Sample]) -> dict[str, int]:
    c = np.bincount([s.label for s in samples], minlength=2)
    return {CLASS_DIRS[0]: int(c[0]), CLASS_DIRS[1]: int(c[1])}
